"""Video arrays and files: decoded pixels to uint8 frames, frames to an H.264 mp4 written atomically
(a temporary file in the same directory, renamed when complete), and output files replaced whole."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (same suffix) to write; on success it is renamed to
    ``path`` in one step, on any failure (or Ctrl-C) it is removed: ``path`` is either its previous
    content or the complete new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _own_process_group(popen_kwargs):
    """imageio-ffmpeg's Popen arguments with ffmpeg in a process group of its own (``process_group=0``:
    set in the child without running Python there, unlike the ``preexec_fn`` imageio-ffmpeg would
    use, which can deadlock a process with other threads): a Ctrl-C at the terminal reaches this
    process, which finishes the file, and never ffmpeg, which would leave it truncated."""

    @functools.wraps(popen_kwargs)
    def kwargs(prevent_sigint=False):
        out = dict(popen_kwargs(prevent_sigint=prevent_sigint))
        if prevent_sigint and os.name == "posix" and out.get("preexec_fn") is None and sys.version_info >= (3, 11):
            out["process_group"] = 0
        return out

    kwargs.own_process_group = True
    return kwargs


def _patch_imageio_ffmpeg() -> None:
    import imageio_ffmpeg._io as ffmpeg_io

    if not getattr(ffmpeg_io._popen_kwargs, "own_process_group", False):
        ffmpeg_io._popen_kwargs = _own_process_group(ffmpeg_io._popen_kwargs)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16, quality: int = 8) -> Path:
    """Write uint8 [T, H, W, 3] to an H.264 mp4 with imageio-ffmpeg (no resizing), atomically.
    ``quality`` 0–10 (imageio's scale; 5 makes files ~5x smaller, for the shipped examples)."""
    import imageio.v2 as imageio

    # imageio-ffmpeg starts ffmpeg with preexec_fn, which can deadlock the child in a process with
    # other threads (seen: a 20-minute hang); this switches that off (its own process group instead).
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    _patch_imageio_ffmpeg()

    path = Path(path)
    with replaced_atomically(path) as tmp:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=quality,
                                pixelformat="yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)
    return path
