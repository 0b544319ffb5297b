"""The Studio's analysis panels (Gradio components and their events, UI only): cache occupancy,
top-k scores, the RoPE position map, latency and memory, the mid-token inspector with its
per-token heatmap, and the teaching view of one block. Live runs and the Replay tab fill them the
same way: trace tables (`tables`) and what else the run has (`view`: meta and block thumbnails),
drawn for one generation block (the `block` slider) by `render`."""

from __future__ import annotations

import gradio as gr

from packforcing.studio.view import (
    AUTO_MID, heatmap_plot, inspector_plot, last_block, latency_plot, mid_block_choices, occupancy_plot, rope_plot,
    story_markdown, topk_plot,
)

#: what `render` returns, in order (`Panels.outputs`)
OUTPUT_NAMES = ("occ_plot", "topk", "rope", "latency", "inspector", "heatmap", "story", "block", "mid_block",
                "tables", "view")


def render(tables, view, block=None, occ_layer="mean", occ_unit="tokens", topk_layer="mean", rope_layer="0",
           mid=AUTO_MID, fps=16):
    """Every panel's value for ``block`` (None: the latest), in `OUTPUT_NAMES` order."""
    block = last_block(tables, block)
    latest = last_block(tables)
    choices = mid_block_choices(tables, block, topk_layer)
    mid = mid if mid in [value for _, value in choices] else AUTO_MID
    return (occupancy_plot(tables, occ_layer, occ_unit), topk_plot(tables, topk_layer, fps),
            rope_plot(tables, block, rope_layer), latency_plot(tables),
            inspector_plot(tables, view, block, topk_layer), heatmap_plot(tables, view, block, mid, topk_layer),
            story_markdown(tables, view, block),
            gr.update(maximum=max(1, latest or 0), value=block or 0), gr.update(choices=choices, value=mid),
            tables, view)


class Panels:
    """The panels' components (built where the constructor is called, inside a ``gr.Blocks``)."""

    def __init__(self, layers: list[tuple[str, str]], fps: int, ttl: int):
        self.fps = fps
        # REST sessions never close: their tables expire with the run files
        self.tables = gr.State(None, time_to_live=ttl)
        self.view = gr.State(None, time_to_live=ttl)
        gr.Markdown("## Cache analysis (updated every block)")
        with gr.Row():
            with gr.Column():
                self.occ_plot = gr.Plot(occupancy_plot(None), label="Cache occupancy", elem_id="pf-occupancy")
                with gr.Row():
                    self.occ_layer = gr.Dropdown(layers, value="mean", label="Layer")
                    self.occ_unit = gr.Radio(["tokens", "MB"], value="tokens", label="Unit")
            with gr.Column():
                self.topk = gr.Plot(topk_plot(None), label="Top-k scores")
                self.topk_layer = gr.Dropdown(layers, value="mean", label="Layer (top-k and inspector)")
        with gr.Row():
            with gr.Column():
                self.rope = gr.Plot(rope_plot(None), label="RoPE position map")
                with gr.Row():
                    self.block = gr.Slider(0, 1, value=0, step=1, label="Generation block",
                                           info="RoPE map, inspector and walk-through; follows the latest block "
                                                "while generating")
                    self.rope_layer = gr.Dropdown(layers[1:], value="0", label="Layer")
            with gr.Column():
                self.latency = gr.Plot(latency_plot(None), label="Latency and memory per block")
        gr.Markdown("## Mid-token inspector: which compressed mid blocks are kept, and what they hold")
        self.inspector = gr.Plot(inspector_plot(None), label="Mid blocks of the generation block", elem_id="pf-inspector")
        with gr.Row():
            with gr.Column():
                self.heatmap = gr.Plot(heatmap_plot(None), label="Attention on a mid block's tokens", elem_id="pf-heatmap")
                self.mid_block = gr.Dropdown([("most attention", AUTO_MID)], value=AUTO_MID, label="Mid block",
                                             info="one of the mid blocks selected at this generation block")
            with gr.Column(elem_id="pf-story"):
                self.story = gr.Markdown(story_markdown(None), label="One block's life")

    @property
    def outputs(self) -> list:
        return [getattr(self, name) for name in OUTPUT_NAMES]

    @property
    def view_controls(self) -> list:
        return [self.block, self.occ_layer, self.occ_unit, self.topk_layer, self.rope_layer, self.mid_block]

    def redraw(self, tables, view, block, occ_layer, occ_unit, topk_layer, rope_layer, mid):
        return render(tables, view, block, occ_layer, occ_unit, topk_layer, rope_layer, mid, self.fps)

    def wire(self) -> None:
        """A control changed: redraw every panel from the session's tables (no run needed)."""
        for control in self.view_controls:
            control.input(self.redraw, [self.tables, self.view, *self.view_controls], self.outputs,
                          api_visibility="private", concurrency_limit=None, show_progress="hidden")
