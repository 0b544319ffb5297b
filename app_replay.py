"""The Studio's Replay tab (UI only): one click on a shipped instant example, or an uploaded trace and
its video, drives every analysis panel (`app_panels`) without a model. Loading and checking the
files is `packforcing.studio.replay`."""

from __future__ import annotations

import functools

import gradio as gr

import app_panels
from packforcing import safety, studio
from packforcing.studio import replay
from packforcing.studio.view import progress_html, run_summary_frame, toast_text


def _result(loaded: replay.Replay):
    """What a loaded replay shows: status, video, summary, and every panel at its last block."""
    view = {"meta": loaded.meta, "thumbs": loaded.thumbnails}
    summary = run_summary_frame(loaded.meta.get("policy") or "run", loaded.tables, loaded.meta)
    status = progress_html(1.0, f"Replaying {loaded.name}: {loaded.blocks} blocks, "
                                f"{loaded.tables['blocks']['video_seconds'].sum():.1f} s of video"
                                + ("" if loaded.video else " (no video: no thumbnails)"))
    fps = int(loaded.meta.get("fps") or 16)
    return (status, str(loaded.video) if loaded.video else None, summary,
            *app_panels.render(loaded.tables, view, None, fps=fps))


def replay_files(trace, video):
    """Replay an uploaded trace (and its video) in every panel, without a model."""
    studio.cleanup_runs()  # uploads count against the disk cap
    try:
        return _result(replay.load_replay(trace, video))
    except replay.ReplayError as err:
        raise gr.Error(toast_text(err), title="Cannot replay this file") from None


def replay_example(name):
    """Replay a shipped instant example (a 2-minute run of the embedded model)."""
    try:
        return _result(replay.load_example(name))
    except replay.ReplayError as err:
        raise gr.Error(toast_text(err), title="Cannot replay this example") from None


class ReplayTab:
    """The tab's components (built where the constructor is called, inside a ``gr.Tab``)."""

    def __init__(self):
        gr.Markdown("Replay a finished run in every panel below, without a model: pick an instant example (2-minute "
                    "runs of the embedded model, same prompt and seed) or load a trace a run wrote (trace.parquet, "
                    "with its video.mp4 for thumbnails).", elem_classes="pf-note")
        self.examples = []
        shipped = replay.examples()
        if shipped:
            with gr.Row(elem_id="pf-examples"):
                for entry in shipped:
                    self.examples.append((entry["name"], gr.Button(entry["label"], size="sm")))
        with gr.Row():
            self.trace = gr.File(label="Trace (.parquet, .csv or .json)", type="filepath",
                                 file_types=list(replay.TRACE_SUFFIXES), height=120)
            self.video = gr.File(label="Its video (.mp4, optional)", type="filepath", file_types=[".mp4"], height=120)
        self.button = gr.Button("Replay files", variant="primary", interactive=safety.uploads_enabled())
        self.status = gr.HTML(progress_html(0, "Nothing replayed yet."))
        self.player = gr.Video(label="Replayed video", interactive=False, height=260)
        self.summary = gr.Dataframe(label="Run summary", interactive=False)

    def wire(self, panels: app_panels.Panels) -> None:
        outputs = [self.status, self.player, self.summary, *panels.outputs]
        self.button.click(replay_files, [self.trace, self.video], outputs, api_name="replay", concurrency_id="replay",
                          concurrency_limit=2)
        for name, button in self.examples:
            button.click(functools.partial(replay_example, name), None, outputs, api_visibility="private",
                         concurrency_id="replay", concurrency_limit=2)
