"""Long-video quality metrics for tiny-world videos (pure numpy/pandas functions).

Input: a video, uint8 [T, H, W, 3], and the prompt (a `Scene`, a caption string, or a list
of colour names / RGB triples). Per-frame measurements (`frame_table`) are aggregated over
non-overlapping windows of `window_s` seconds (`window_table`: one row per window; a
remainder shorter than half a window is merged into the last window). `summarize` turns a
window table into one row for a table comparing policies. Colour distances are Euclidean
in RGB units (0..441); pixel changes are in RGB levels (0..255).

=====================  ==========================================================  =========
column                 definition                                                  ideal
=====================  ==========================================================  =========
presence_<colour>      fraction of the window's frames whose mask of <colour>      1
                       (pixels within `tol` = 60 of its RGB) covers at least
                       `min_area` = 0.2 % of the frame
fidelity               mean of presence_<colour> over the distinct prompted        1
                       colours (NaN without a prompt)
bg_r, bg_g, bg_b       background estimate: per-channel median over the window's   --
                       frames of the per-frame per-channel median of the pixels
                       matching no prompted colour (all pixels if < 10 % remain)
background_similarity  1 - ||bg - bg of window 0|| / `bg_scale` (= 150), clipped   1
                       to [0, 1]
dynamics               mean over the window's frames t >= 1 of diff[t], the mean   > 0
                       over pixels and channels of max(|x[t] - x[t-1]| - 1, 0)
                       (the 1-level dead zone ignores uint8 rounding flicker)
frozen_frac            fraction of those frames with diff[t] < `freeze_level`      0
                       (= 0.1 levels); 1 = frozen video
jump_ratio             (mean diff at block-boundary frames + eps) / (median diff   ~1
                       at the other frames + eps), eps = 0.05; boundary frames
                       are t = first_block_frames + k * frames_per_block (13, 29,
                       45, ... for 4-latent-frame blocks); NaN if none in window
=====================  ==========================================================  =========

Window bookkeeping columns: window, frame_start, frame_end (exclusive), t_start_s, t_end_s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from packforcing.world import COLOURS, Scene, parse_caption

METRICS = ["fidelity", "background_similarity", "dynamics", "frozen_frac", "jump_ratio"]
_CHUNK = 64  # frames processed at once (bounds memory)


def prompt_colours(prompt) -> dict[str, tuple[int, int, int]]:
    """Distinct prompted object colours, name -> RGB, in prompt order.

    prompt: None, a Scene, a caption, a dict name -> RGB, or a sequence of colour names or
    RGB triples (named "rgb(r,g,b)").
    """
    if prompt is None:
        return {}
    if isinstance(prompt, Scene):
        names = [o.colour for o in prompt.objects]
    elif isinstance(prompt, str):
        names = [c for c, _ in parse_caption(prompt)[0]]
    elif isinstance(prompt, dict):
        return {str(k): tuple(int(x) for x in v) for k, v in prompt.items()}
    else:
        out = {}
        for c in prompt:
            if isinstance(c, str):
                out[c] = COLOURS[c]
            else:
                rgb = tuple(int(x) for x in c)
                out["rgb(%d,%d,%d)" % rgb] = rgb
        return out
    return {c: COLOURS[c] for c in dict.fromkeys(names)}


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def _channel_medians(chunk: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per-frame per-channel median of kept pixels: chunk uint8 [n, P, 3], keep bool [n, P]
    -> float [n, 3]. Exact, via 256-bin histograms."""
    n = chunk.shape[0]
    frame = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], keep.shape)[keep]
    base = (frame * 3)[:, None] + np.arange(3, dtype=np.int32)  # [K, 3] (frame, channel) ids
    idx = base * 256 + chunk[keep]
    hist = np.bincount(idx.ravel(), minlength=n * 3 * 256).reshape(n, 3, 256)
    cdf = np.cumsum(hist, axis=-1)
    return np.argmax(2 * cdf >= cdf[..., -1:], axis=-1).astype(np.float64)


def frame_table(video: np.ndarray, prompt=None, tol: float = 60.0, fps: float = 16,
                dead_zone: int = 1) -> pd.DataFrame:
    """Per-frame measurements: frame, t_s, diff (NaN at frame 0), bg_r, bg_g, bg_b and
    area_<colour> (fraction of pixels within `tol` RGB units of each prompted colour).
    diff[t] = mean over pixels and channels of max(|x[t] - x[t-1]| - dead_zone, 0), levels."""
    video = _check_video(video)
    t, h, w, _ = video.shape
    colours = prompt_colours(prompt)
    rgbs = np.array(list(colours.values()), dtype=np.int32).reshape(-1, 3)
    areas = np.zeros((t, len(colours)))
    bg = np.zeros((t, 3))
    diff = np.full(t, np.nan)
    for c0 in range(0, t, _CHUNK):
        c1 = min(c0 + _CHUNK, t)
        x = video[c0:c1].reshape(c1 - c0, h * w, 3)
        xi = x.astype(np.int32)
        matched = np.zeros(x.shape[:2], dtype=bool)
        for k, rgb in enumerate(rgbs):
            m = ((xi - rgb) ** 2).sum(-1) <= tol * tol
            areas[c0:c1, k] = m.mean(1)
            matched |= m
        keep = ~matched
        keep[keep.mean(1) < 0.10] = True  # too few background pixels left: use all
        bg[c0:c1] = _channel_medians(x, keep)
        lo = max(c0, 1)
        if lo < c1:
            d = np.abs(video[lo:c1].astype(np.int16) - video[lo - 1 : c1 - 1].astype(np.int16))
            diff[lo:c1] = np.maximum(d - dead_zone, 0).reshape(c1 - lo, -1).mean(1)
    df = pd.DataFrame({"frame": np.arange(t), "t_s": np.arange(t) / fps, "diff": diff,
                       "bg_r": bg[:, 0], "bg_g": bg[:, 1], "bg_b": bg[:, 2]})
    for k, name in enumerate(colours):
        df[f"area_{name}"] = areas[:, k]
    return df


def window_bounds(num_frames: int, fps: float = 16, window_s: float = 5.0) -> list[tuple[int, int]]:
    """[(start, end)) frame ranges of consecutive windows of round(window_s * fps) frames;
    a remainder shorter than half a window is merged into the last window."""
    wf = max(1, int(round(window_s * fps)))
    starts = list(range(0, num_frames, wf))
    if len(starts) > 1 and num_frames - starts[-1] < wf / 2:
        starts.pop()
    return [(s, e) for s, e in zip(starts, starts[1:] + [num_frames])]


def block_boundaries(num_frames: int, frames_per_block: int = 16,
                     first_block_frames: int | None = None) -> np.ndarray:
    """First pixel frame of every block after the first: first_block_frames + k *
    frames_per_block (default first block = frames_per_block - 3, the causal VAE's 4F-3)."""
    first = frames_per_block - 3 if first_block_frames is None else first_block_frames
    return np.arange(first, num_frames, frames_per_block)


def window_table(frames: pd.DataFrame, fps: float = 16, window_s: float = 5.0, *,
                 min_area: float = 0.002, bg_scale: float = 150.0, freeze_level: float = 0.1,
                 frames_per_block: int = 16, first_block_frames: int | None = None,
                 eps: float = 0.05) -> pd.DataFrame:
    """One row per window from a `frame_table`; columns as in the module docstring."""
    n = len(frames)
    area_cols = [c for c in frames.columns if c.startswith("area_")]
    diff = frames["diff"].to_numpy()
    bg = frames[["bg_r", "bg_g", "bg_b"]].to_numpy()
    is_boundary = np.zeros(n, dtype=bool)
    is_boundary[block_boundaries(n, frames_per_block, first_block_frames)] = True
    rows, ref = [], None
    for k, (s, e) in enumerate(window_bounds(n, fps, window_s)):
        row = {"window": k, "frame_start": s, "frame_end": e, "t_start_s": s / fps, "t_end_s": e / fps}
        present = [(frames[c].to_numpy()[s:e] >= min_area).mean() for c in area_cols]
        for c, p in zip(area_cols, present):
            row["presence_" + c[5:]] = float(p)
        row["fidelity"] = float(np.mean(present)) if present else np.nan
        wbg = np.median(bg[s:e], axis=0)
        ref = wbg if ref is None else ref
        row.update(bg_r=wbg[0], bg_g=wbg[1], bg_b=wbg[2])
        row["background_similarity"] = float(np.clip(1 - np.linalg.norm(wbg - ref) / bg_scale, 0, 1))
        d, b = diff[s:e], is_boundary[s:e]
        valid = ~np.isnan(d)
        row["dynamics"] = float(d[valid].mean()) if valid.any() else np.nan
        row["frozen_frac"] = float((d[valid] < freeze_level).mean()) if valid.any() else np.nan
        nb, bd = d[valid & ~b], d[valid & b]
        ok = len(bd) and len(nb)
        row["jump_ratio"] = float((bd.mean() + eps) / (np.median(nb) + eps)) if ok else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_video(video: np.ndarray, prompt=None, fps: float = 16, window_s: float = 5.0,
                   tol: float = 60.0, dead_zone: int = 1, **window_kw) -> tuple[pd.DataFrame, dict]:
    """All metrics: (window table, summary dict = `summarize(table)` as a dict).
    `window_kw` go to `window_table` (min_area, bg_scale, frames_per_block, ...)."""
    df = window_table(frame_table(video, prompt, tol, fps, dead_zone), fps, window_s, **window_kw)
    return df, summarize(df).iloc[0].to_dict()


def _select(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Bookkeeping columns plus `cols` (an entry ending in "_" selects by prefix)."""
    def wanted(c: str) -> bool:
        return any(c == k or (k.endswith("_") and c.startswith(k)) for k in cols)

    picked = [c for c in df.columns if wanted(c)]
    return df[["window", "t_start_s", "t_end_s"] + picked]


def prompt_fidelity(video, prompt, fps: float = 16, window_s: float = 5.0, tol: float = 60.0,
                    min_area: float = 0.002) -> pd.DataFrame:
    """(a) Per window: presence_<colour> and fidelity (see module docstring)."""
    df = window_table(frame_table(video, prompt, tol, fps), fps, window_s, min_area=min_area)
    return _select(df, ["presence_", "fidelity"])


def background_consistency(video, prompt=None, fps: float = 16, window_s: float = 5.0,
                           tol: float = 60.0, bg_scale: float = 150.0) -> pd.DataFrame:
    """(b) Per window: bg_r, bg_g, bg_b and background_similarity to window 0."""
    df = window_table(frame_table(video, prompt, tol, fps), fps, window_s, bg_scale=bg_scale)
    return _select(df, ["bg_r", "bg_g", "bg_b", "background_similarity"])


def dynamics(video, fps: float = 16, window_s: float = 5.0, freeze_level: float = 0.1) -> pd.DataFrame:
    """(c) Per window: dynamics (mean |frame change|, RGB levels) and frozen_frac."""
    df = window_table(frame_table(video, None, fps=fps), fps, window_s, freeze_level=freeze_level)
    return _select(df, ["dynamics", "frozen_frac"])


def jump_artifacts(video, fps: float = 16, window_s: float = 5.0, frames_per_block: int = 16,
                   first_block_frames: int | None = None, eps: float = 0.05) -> pd.DataFrame:
    """(d) Per window: jump_ratio of block-boundary to ordinary frame changes."""
    df = window_table(frame_table(video, None, fps=fps), fps, window_s, eps=eps,
                      frames_per_block=frames_per_block, first_block_frames=first_block_frames)
    return _select(df, ["jump_ratio"])


def summarize(df: pd.DataFrame, label: str | None = None) -> pd.DataFrame:
    """One row: windows, duration_s, the mean over windows of each metric (NaN skipped)
    and <metric>_last (its value in the last window, where long-video drift shows)."""
    row = {"windows": len(df), "duration_s": float(df["t_end_s"].max()) if len(df) else 0.0}
    for m in METRICS:
        row[m] = float(df[m].mean()) if m in df else np.nan
    for m in METRICS:
        row[m + "_last"] = float(df[m].iloc[-1]) if m in df and len(df) else np.nan
    return pd.DataFrame([row], index=[label] if label is not None else None)
