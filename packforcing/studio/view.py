"""What the Studio page shows, without Gradio: policy notes, example prompts, the progress bar's
HTML, and the analysis figures sized for half-width panels (from `analysis.figures`)."""

from __future__ import annotations

import html
from pathlib import Path

from analysis.figures import (
    cache_occupancy_figure,
    latency_memory_figure,
    rope_position_figure,
    summary_table,
    topk_heatmap_figure,
)

from ..safety import public_text
from .worker import Update

ROOT = Path(__file__).resolve().parents[2]  # the repository
EXAMPLES_FILE = ROOT / "assets" / "example_prompts.txt"

POLICY_NOTES = {
    "packforcing": "**PackForcing** (this paper): sink + compressed top-k mid blocks + recent, "
                   "with temporal RoPE adjustment. Bounded memory at any length.",
    "sink_window": "**Sink + window** (LongLive, StreamingLLM): the first frames and a sliding window.",
    "window": "**Window**: the last frames of history only, FIFO. Self-Forcing's `local_attn_size` also counts the "
              "current block: window frames = local_attn_size − block frames.",
    "deep_sink": "**Deep sink** (Deep Forcing): a large sink + the top tokens by recent-query attention, "
                 "RoPE re-aligned, training-free.",
    "full": "**Full**: every block is kept; memory grows linearly with the video.",
}

# the page's styles: the progress bar (its HTML is `progress_html`) and notes
CSS = """
.pf-progress {padding: 6px 2px;}
.pf-bar {height: 12px; border-radius: 6px; background: var(--neutral-200, #e5e7eb); overflow: hidden;}
.pf-fill {height: 100%; background: linear-gradient(90deg, #6366f1, #22c55e); transition: width .3s;}
.pf-fill.pf-stopped {background: #f59e0b;} .pf-fill.pf-error {background: #ef4444;}
.pf-text {margin-top: 4px; font-size: 0.95em;}
.pf-note {font-size: 0.9em; opacity: 0.8;}
"""


def load_examples() -> list[str]:
    if not EXAMPLES_FILE.exists():
        return []
    return [line.strip() for line in EXAMPLES_FILE.read_text().splitlines() if line.strip()]


def progress_html(fraction: float, text: str, state: str = "") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="pf-progress"><div class="pf-bar"><div class="pf-fill {state}" '
            f'style="width:{pct:.1f}%"></div></div><div class="pf-text">{html.escape(text)}</div></div>')


IDLE = progress_html(0, "Ready. Enter a prompt and press Generate.")


def model_note(name: str) -> str:
    """What a visitor should expect from the embedded model (honest, one sentence or two)."""
    if "random" in name:
        return ("Its weights are random, so videos look like noise; the cache behaviour, timings and "
                "analysis are real.")
    if "tiny-world" in name and "world v2" in name:
        return ("A 5-million-parameter model trained here on a CPU in about 7 CPU-hours, on 5-second 64×64 clips of "
                "one or two large shapes (red, yellow, green, blue, white) over black, dark grey, navy or white, "
                "and of shapes that leave the frame and come back: it draws the prompted background and objects in "
                "the prompted colours, as soft blobs rather than clean circles, squares or triangles. Leave the "
                "colour out (\"a square bouncing over a black background\") for the memory test: will it come "
                "back in the same colour? (see docs/tiny_world.md). The cache behaviour, timings and analysis "
                "are real.")
    if "tiny-world" in name:
        return ("A 5-million-parameter model trained here on a CPU, on 5-second clips of bouncing shapes: it "
                "draws the prompted background and moving blobs, often not in the prompted colours and not "
                "yet as clean shapes (see docs/tiny_world_v1.md). The cache behaviour, timings and analysis are real.")
    return ""


def update_html(update: Update, prefix: str = "") -> str:
    text = prefix + update.progress_text()
    if update.kind == "block":
        return progress_html(update.fraction, "Generating… " + text)
    if update.kind == "error":
        return progress_html(update.fraction, f"Error: {update.message} ({text})", "pf-error")
    if update.stopped:
        return progress_html(update.fraction, f"Stopped: kept {text}", "pf-stopped")
    return progress_html(1.0, f"Done in {update.elapsed:.1f} s: {text}")


# ---- analysis figures --------------------------------------------------------------------------
def _layer(value) -> int | None:
    return None if value in (None, "", "mean") else int(value)


def _fit(fig):
    """Half-width panels: smaller titles and axis titles so the figures' long titles fit."""
    fig.update_layout(title=dict(font=dict(size=13)), margin=dict(l=50, r=20, t=60, b=50))
    fig.update_xaxes(title_font=dict(size=11))
    fig.update_yaxes(title_font=dict(size=11))
    return fig


def occupancy_plot(tables, layer="mean", unit="tokens"):
    tables = tables or {}
    return _fit(cache_occupancy_figure(tables.get("occupancy"), _layer(layer), unit, switches=tables.get("switches")))


def topk_plot(tables, layer="mean", fps=16):
    tables = tables or {}
    fig = _fit(topk_heatmap_figure(tables.get("scores"), _layer(layer), fps=fps, switches=tables.get("switches")))
    heat = next((t for t in fig.data if t.type == "heatmap"), None)
    if heat is not None:  # block indices are integers: no 3.6, 3.8, … ticks on short runs
        for axis, values in (("xaxis", heat.x), ("yaxis", heat.y)):
            if values is not None and len(values) <= 24:
                fig.update_layout({axis: dict(tickmode="array", tickvals=list(values))})
    return fig


def rope_plot(tables, block=None, layer="0"):
    positions = (tables or {}).get("positions")
    if positions is not None and len(positions) and block is not None:
        block = min(int(block), int(positions["block"].max()))
    return _fit(rope_position_figure(positions, None if block is None else int(block), _layer(layer) or 0))


def latency_plot(tables):
    tables = tables or {}
    return _fit(latency_memory_figure(tables.get("blocks"), tables.get("timing"), tables.get("switches")))


def compare_frame(results: dict[str, Update]):
    """One summary row per compared policy (the policy is the row's first column)."""
    table = summary_table({p: {**u.tables, "meta": u.meta} for p, u in results.items()})
    return table.drop(columns=["policy"], errors="ignore").round(4)


def toast_text(message) -> str:
    """A message for a toast or an API error (Gradio renders them as HTML): server paths masked
    (`packforcing.safety.public_text`), markup shown as text."""
    return html.escape(public_text(str(message)), quote=False)


def summary_frame(update: Update):
    return run_summary_frame(update.request.policy, update.tables, update.meta)


def run_summary_frame(policy: str, tables, meta):
    """The one-row summary of a run (live, or a replayed trace)."""
    table = summary_table({policy: {**tables, "meta": meta}})
    keep = [c for c in ("run", "blocks", "video_seconds", "total_seconds", "mean_block_seconds",
                        "latency_slope_s_per_block", "peak_kv_mb", "peak_context_tokens",
                        "peak_stored_tokens") if c in table]
    return table[keep].round(4)


# ---- the mid-token inspector and the teaching view ---------------------------------------------
AUTO_MID = "auto"  # the heatmap's default mid block: the selected one with the most attention


def last_block(tables, block=None) -> int | None:
    """``block`` clipped to the recorded blocks (None: the latest one); None when nothing is recorded."""
    blocks = (tables or {}).get("blocks")
    if blocks is None or not len(blocks):
        return None
    latest = int(blocks["block"].max())
    return latest if block is None else max(0, min(int(block), latest))


def _thumbs(view):
    return (view or {}).get("thumbs") or None


def inspector_plot(tables, view=None, block=None, layer="mean"):
    from analysis.inspector import mid_inspector_figure

    return _fit(mid_inspector_figure(tables or {}, last_block(tables, block), _layer(layer), _thumbs(view)))


def heatmap_plot(tables, view=None, block=None, source=AUTO_MID, layer="mean"):
    from analysis.inspector import mid_token_heatmap_figure

    source = None if source in (None, "", AUTO_MID) else int(source)
    return _fit(mid_token_heatmap_figure(tables or {}, last_block(tables, block), source, _layer(layer),
                                         _thumbs(view)))


def mid_block_choices(tables, block=None, layer="mean") -> list[tuple[str, str]]:
    """Choices of the heatmap's mid block: "most attention", then every mid block selected at ``block``."""
    block = last_block(tables, block)
    scores = (tables or {}).get("scores")
    choices = [("most attention", AUTO_MID)]
    if block is None or scores is None or not len(scores):
        return choices
    rows = scores[(scores["block"] == block) & scores["selected"]]
    if _layer(layer) is not None:
        rows = rows[rows["layer"] == _layer(layer)]
    for source in sorted(rows["candidate"].unique()):
        choices.append((f"mid block {int(source)}", str(int(source))))
    return choices


def story_markdown(tables, view=None, block=None) -> str:
    from analysis.teaching import block_story

    block = last_block(tables, block)
    if block is None:
        return "*The walk-through of a block appears here once a block has been generated (or a trace replayed).*"
    return block_story(tables or {}, (view or {}).get("meta") or {}, block)
