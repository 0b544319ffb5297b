"""Trace replay: a trace file written by this project (and optionally its video) loaded into what the
Studio's panels draw, without a model; and the shipped instant examples (`scripts/make_examples.py`).

Files may come from anyone on a public Space, so they are checked before they are trusted: the
extension, the size (`MAX_TRACE_MB`), the number of rows a Parquet file declares (a small file
can decompress to gigabytes), the format marker (`packforcing.trace_io`), and for a video its
frame size and length; only the frames the thumbnails need are decoded, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..knobs import StudioError
from ..safety import public_text
from ..sampler import block_frame_ranges
from ..trace import TraceFormatError, load_tables, summarize
from ..trace_io import EXTENSIONS as TRACE_SUFFIXES
from .worker import block_thumbnail

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "assets" / "examples"
MAX_TRACE_MB = 64
MAX_TRACE_ROWS = 5_000_000  # a 2-minute tiny-world run: ~60 k rows; Wan with mid_attention can exceed it (docs/trace.md)
MAX_VIDEO_PIXELS = 1920 * 1088
MAX_VIDEO_FRAMES = 16 * 60 * 10  # 10 minutes at 16 fps


class ReplayError(StudioError):
    """A trace or video that cannot be replayed (the message says why, for the visitor)."""


@dataclasses.dataclass
class Replay:
    """A loaded trace: its tables and meta, one thumbnail per block (when a video came with it)."""

    tables: dict[str, pd.DataFrame]
    meta: dict
    thumbnails: dict[int, np.ndarray]
    video: Path | None
    name: str

    @property
    def blocks(self) -> int:
        return len(self.tables["blocks"])

    def summary(self) -> dict:
        return summarize(self.tables, self.meta)


def _path(value) -> Path | None:
    """A Gradio file value (a path string, a FileData-like dict or object) -> Path, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    value = getattr(value, "path", value)
    if not isinstance(value, (str, Path)):
        raise ReplayError("The replay takes a trace file (.parquet, .csv or .json) and, optionally, its video (.mp4).")
    return Path(value)


def _check_trace_file(path: Path) -> None:
    if path.suffix.lower() not in TRACE_SUFFIXES:
        raise ReplayError(f"{path.name} is not a trace: choose the trace.parquet (or .csv / .json) file a run wrote.")
    if not path.is_file():
        raise ReplayError(f"The trace file {path.name} is not there any more: upload it again.")
    if path.stat().st_size > MAX_TRACE_MB * 2**20:
        raise ReplayError(f"{path.name} is larger than {MAX_TRACE_MB} MB: not a trace of this project.")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows
        except Exception:
            raise ReplayError(f"{path.name} is not a readable Parquet file.") from None
        if rows > MAX_TRACE_ROWS:
            raise ReplayError(f"{path.name} declares {rows:,} rows (a trace of this project has at most "
                              f"{MAX_TRACE_ROWS:,}).")


def load_trace(trace) -> tuple[dict[str, pd.DataFrame], dict]:
    """Tables and meta of a trace file, checked; `ReplayError` with a visitor-facing message."""
    path = _path(trace)
    if path is None:
        raise ReplayError("Choose a trace file (.parquet, .csv or .json, as a run writes them) to replay.")
    _check_trace_file(path)
    try:
        tables, meta = load_tables(path)
    except TraceFormatError as err:
        raise ReplayError(public_text(str(err))) from None
    except (OSError, ValueError) as err:
        raise ReplayError(f"{path.name} could not be read as a trace: {public_text(str(err))[:200]}") from None
    if not len(tables["blocks"]):
        raise ReplayError(f"{path.name} holds no finished block: nothing to replay.")
    if not isinstance(meta, dict):
        meta = {}
    return tables, meta


def video_thumbnails(video, num_blocks: int, block_frames: int, temporal_ratio: int = 4) -> dict[int, np.ndarray]:
    """One thumbnail per block (its middle frame), decoding the video frame by frame and keeping only
    those frames. Raises `ReplayError` for a file that is not a readable video or is too large."""
    import imageio.v3 as iio

    path = _path(video)
    if path.suffix.lower() != ".mp4":
        raise ReplayError(f"{path.name} is not an .mp4 video: choose the video.mp4 the run wrote (or none).")
    wanted = {}
    for block, (start, end) in enumerate(block_frame_ranges(num_blocks, block_frames, temporal_ratio)):
        wanted[(start + end - 1) // 2] = block  # the middle frame of each block
    last = max(wanted) if wanted else -1
    thumbs = {}
    try:
        for index, frame in enumerate(iio.imiter(path)):
            if index == 0 and (frame.ndim != 3 or frame.shape[0] * frame.shape[1] > MAX_VIDEO_PIXELS):
                raise ReplayError(f"{path.name}: frames of {frame.shape[1]}x{frame.shape[0]} are larger than "
                                  "this Studio replays.")
            if index in wanted:
                thumbs[wanted[index]] = block_thumbnail(frame[None, ..., :3])
            if index >= last or index >= MAX_VIDEO_FRAMES:
                break
    except ReplayError:
        raise
    except Exception as err:
        raise ReplayError(f"{path.name} could not be read as a video ({type(err).__name__}).") from None
    if not thumbs:
        raise ReplayError(f"{path.name} has no frames.")
    return thumbs


def load_replay(trace, video=None, name: str | None = None) -> Replay:
    """A trace (and optionally its video) ready for the panels. A video that does not fit the trace
    (fewer frames than its blocks) still loads: blocks past its end get no thumbnail."""
    tables, meta = load_trace(trace)
    blocks = len(tables["blocks"])
    block_frames = int(meta.get("block_frames") or int(tables["blocks"]["latent_frames"].iloc[0]))
    ratio = int(meta.get("temporal_ratio") or 4)
    video_path = _path(video)
    thumbs = video_thumbnails(video_path, blocks, block_frames, ratio) if video_path is not None else {}
    return Replay(tables, meta, thumbs, video_path, name or _path(trace).name)


# ---- instant examples ------------------------------------------------------------------------------
def examples(directory: Path = EXAMPLES_DIR) -> list[dict]:
    """The shipped examples (``index.json``), each with absolute ``trace_path`` / ``video_path``;
    [] when there are none."""
    index = directory / "index.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())["examples"]
    return [dict(e, trace_path=str(directory / e["trace"]), video_path=str(directory / e["video"]))
            for e in entries if (directory / e["trace"]).is_file()]


def load_example(name: str, directory: Path = EXAMPLES_DIR) -> Replay:
    """One shipped example by name (`ReplayError` for an unknown one)."""
    for entry in examples(directory):
        if entry["name"] == name:
            return load_replay(entry["trace_path"], entry["video_path"], name=entry["label"])
    raise ReplayError(f"There is no example {name!r}.")
