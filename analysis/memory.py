"""The memory metric for videos of `packforcing.world.memory` scenes: when the object comes back
after an absence, is it the object that left — same colour, same shape? Pure numpy/pandas.

Per frame (`memory_frame_table`): the largest blob of one palette colour (`analysis.objects`
pixel classes, background given by the caption) of at least `min_area` of the frame, its colour,
and its shape class when the blob does not touch the frame's border (an object half out of view
has no shape). Frames without such a blob are "empty".

`appearances` groups the frames into episodes in view, separated by at least `min_gap_s` of empty
frames (shorter dropouts belong to the episode), each with its majority colour and shape. The
first episode fixes the identity; every later one is a **return**. `memory_summary`:

=================  ======================================================  =====
column             definition                                              ideal
=================  ======================================================  =====
returns            episodes after the first                                the scene's
colour_kept        fraction of returns in the first episode's colour       1
identity_kept      fraction of returns in its colour *and* shape           1
=================  ======================================================  =====

Episodes in which the object is never wholly in view (cut off by the end of the video) are left
out: they have no shape. With no return (a video whose object never leaves, or never appears) both fractions are NaN —
the test did not happen, which is reported, never scored as a pass.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from analysis.objects import classify_pixels, shape_class
from packforcing.world import BACKGROUNDS


def largest_blob(frame: np.ndarray, background_rgb, tol: float = 60.0, min_area: float = 0.01,
                 min_iou: float = 0.75) -> tuple[str | None, str | None, float, bool]:
    """(colour, shape, area fraction, inside) of the largest single-colour blob of uint8 [H, W, 3]
    `frame`; (None, None, 0.0, False) when there is none of `min_area`. ``inside``: the blob does not
    touch the border; only then is its shape classified (else None)."""
    labels, names = classify_pixels(frame, background_rgb, tol)
    any_object = (labels >= 0) & (labels < len(names))
    best, best_px, best_colour = None, max(1, int(round(min_area * labels.size))) - 1, None
    for k, name in enumerate(names):
        groups, n = ndimage.label(labels == k)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(groups), groups, index=np.arange(1, n + 1))
        g = int(np.argmax(sizes))
        if sizes[g] > best_px:
            best, best_px, best_colour = groups == g + 1, int(sizes[g]), name
    if best is None:
        return None, None, 0.0, False
    inside = not (best[0].any() or best[-1].any() or best[:, 0].any() or best[:, -1].any())
    shape = shape_class(best, any_object & ~best, min_iou)[0] if inside else None
    return best_colour, shape, best_px / labels.size, inside


def memory_frame_table(video: np.ndarray, background: str, fps: float = 16, every: int = 1, **blob) -> pd.DataFrame:
    """One row per evaluated frame of uint8 [T, H, W, 3] `video`: frame, t_s, colour, shape, area, inside."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {list(BACKGROUNDS)}")
    rows = []
    for t in range(0, len(video), max(1, every)):
        colour, shape, area, inside = largest_blob(video[t], BACKGROUNDS[background], **blob)
        rows.append({"frame": t, "t_s": t / fps, "colour": colour, "shape": shape, "area": area, "inside": inside})
    return pd.DataFrame(rows)


def _majority(values: pd.Series):
    values = values.dropna()
    return values.mode().iloc[0] if len(values) else None


def appearances(table: pd.DataFrame, min_gap_s: float = 1.0) -> pd.DataFrame:
    """Episodes in view: start_s, end_s, gap_before_s (NaN for the first), colour, shape (majority over
    the frames where the object is wholly in view), whole (it was wholly in view at least once)."""
    shown = table[table["colour"].notna()]
    if shown.empty:
        return pd.DataFrame(columns=["start_s", "end_s", "gap_before_s", "colour", "shape", "whole"])
    times = shown["t_s"].to_numpy()
    cut = np.flatnonzero(np.diff(times) >= min_gap_s) + 1  # an empty stretch of >= min_gap_s ends an episode
    rows = []
    for k, part in enumerate(np.split(np.arange(len(shown)), cut)):
        frames = shown.iloc[part]
        start, end = float(frames["t_s"].iloc[0]), float(frames["t_s"].iloc[-1])
        rows.append({"start_s": start, "end_s": end, "gap_before_s": start - rows[-1]["end_s"] if k else np.nan,
                     "colour": _majority(frames["colour"]), "shape": _majority(frames["shape"][frames["inside"]]),
                     "whole": bool(frames["inside"].any())})
    return pd.DataFrame(rows)


def memory_summary(episodes: pd.DataFrame) -> dict:
    """returns, colour_kept, identity_kept (see the module docstring), and the first identity.
    Episodes never wholly in view (an object cut off by the end of the video) are left out."""
    episodes = episodes[episodes["whole"].astype(bool)] if len(episodes) else episodes
    if len(episodes) < 2:
        first = episodes.iloc[0] if len(episodes) else None
        return {"returns": 0, "colour_kept": np.nan, "identity_kept": np.nan,
                "first_colour": None if first is None else first["colour"],
                "first_shape": None if first is None else first["shape"]}
    first, later = episodes.iloc[0], episodes.iloc[1:]
    same_colour = later["colour"] == first["colour"]
    same_shape = later["shape"] == first["shape"]
    return {"returns": int(len(later)), "colour_kept": float(same_colour.mean()),
            "identity_kept": float((same_colour & same_shape).mean()),
            "first_colour": first["colour"], "first_shape": first["shape"]}


def memory_score(video: np.ndarray, background: str, fps: float = 16, every: int = 2, min_gap_s: float = 1.0) -> dict:
    """`memory_summary` of a video of a memory scene over `background` (every `every`-th frame)."""
    return memory_summary(appearances(memory_frame_table(video, background, fps, every), min_gap_s))
