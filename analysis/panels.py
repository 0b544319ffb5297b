"""Every Studio panel from an exported trace, without the app or a notebook:

    python -m analysis.figures TRACE [--video VIDEO] --out DIR [--block N] [--layer L] [--no-png]

writes ``occupancy``, ``topk``, ``rope``, ``latency``, ``inspector`` and ``heatmap`` as HTML (one
shared ``plotly.min.js`` beside them: no network needed to open them) and PNG (through kaleido and
the system's Chromium; skipped with a note when kaleido is missing), plus the teaching view of the
block as ``story.md``. ``--video`` defaults to ``video.mp4`` next to the trace (thumbnails for the
inspector; without it the tiles are grey). Exit status 2 with a one-line message for a file that
is not a trace of this project.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.figures import cache_occupancy_figure, latency_memory_figure, rope_position_figure, topk_heatmap_figure
from analysis.inspector import mid_inspector_figure, mid_token_heatmap_figure
from analysis.teaching import block_story


def panel_figures(tables, meta, block: int, layer: int | None = None, thumbs=None) -> dict:
    """name -> plotly figure of every panel for generation ``block`` (``layer=None``: mean over layers)."""
    switches = tables.get("switches")
    fps = float(meta.get("fps") or 16)
    return {
        "occupancy": cache_occupancy_figure(tables.get("occupancy"), layer, switches=switches),
        "topk": topk_heatmap_figure(tables.get("scores"), layer, fps=fps, switches=switches),
        "rope": rope_position_figure(tables.get("positions"), block, layer or 0),
        "latency": latency_memory_figure(tables.get("blocks"), tables.get("timing"), switches),
        "inspector": mid_inspector_figure(tables, block, layer, thumbs),
        "heatmap": mid_token_heatmap_figure(tables, block, None, layer, thumbs),
    }


def write_panels(figures: dict, out: Path, png: bool = True) -> tuple[list[Path], str | None]:
    """HTML (and PNG) files of ``figures`` in ``out``; returns the paths and a note when PNGs were skipped."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory", full_html=True)
        written.append(path)
    if not png:
        return written, None
    try:
        import kaleido  # noqa: F401
        import plotly.io as pio
    except ImportError:
        return written, "PNGs skipped: kaleido is not installed (pip install 'kaleido>=1,<2'; it uses Chromium)"
    paths = [out / f"{name}.png" for name in figures]
    try:
        pio.write_images(list(figures.values()), paths, width=1100, height=600)
    except Exception as err:  # no Chromium, or kaleido failed: the HTML files stand
        return written, f"PNGs skipped: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return written + paths, None


def main(argv=None) -> int:
    from packforcing.studio.replay import ReplayError, load_replay

    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a trace file written by a run (.parquet, .csv or .json)")
    parser.add_argument("--video", type=Path, default=None, help="its video (default: video.mp4 next to the trace)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the panels")
    parser.add_argument("--block", type=int, default=None, help="generation block (default: the last one)")
    parser.add_argument("--layer", type=int, default=None, help="layer (default: the mean over layers)")
    parser.add_argument("--no-png", action="store_true", help="HTML only")
    args = parser.parse_args(argv)
    video = args.video if args.video is not None else args.trace.with_name("video.mp4")
    try:
        loaded = load_replay(args.trace, video if video.is_file() else None)
    except ReplayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    blocks = loaded.tables["blocks"]["block"]
    block = int(blocks.max()) if args.block is None else args.block
    if block not in set(blocks):
        print(f"error: block {block} is not in the trace (blocks {int(blocks.min())}..{int(blocks.max())})",
              file=sys.stderr)
        return 2
    figures = panel_figures(loaded.tables, loaded.meta, block, args.layer, loaded.thumbnails)
    written, note = write_panels(figures, args.out, png=not args.no_png)
    story = args.out / "story.md"
    story.write_text(block_story(loaded.tables, loaded.meta, block) + "\n")
    written.append(story)
    print(f"{loaded.name}: {loaded.blocks} blocks, panels for block {block}"
          + ("" if loaded.thumbnails else " (no video: grey thumbnails)"))
    for path in written:
        print(f"wrote {path}")
    if note:
        print(note)
    return 0
