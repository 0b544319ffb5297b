"""Video arrays and files: decoded pixels to uint8 frames, frames to an H.264 mp4."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write uint8 [T, H, W, 3] to an H.264 mp4 with imageio-ffmpeg (no resizing)."""
    import imageio.v2 as imageio

    # imageio-ffmpeg starts ffmpeg with preexec_fn, which can deadlock the child in a process with
    # other threads (seen: a 20-minute hang); this switches that off.
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path
