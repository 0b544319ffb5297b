"""Object-level ("strict") metrics for tiny-world videos: is every prompted object there, in its
colour *and with its shape*, with no more objects than prompted, and how many pixels are painted
in colours nobody asked for. Pure numpy/scipy/pandas functions.

Per frame, every pixel gets the nearest of the palette colours (all object colours of the world
palette, and the prompted background) if it lies within `tol` RGB units of it, else "other".

=================  =============================================================  =========
column             definition                                                     ideal
=================  =============================================================  =========
found_<i>          prompted object i (colour, shape) is matched: a blob of its    1
                   colour of >= `min_area` of the frame whose shape class is the
                   prompted shape
colour_found_<i>   a blob of its colour of >= `min_area` exists (shape ignored)   1
objects            blobs of any object colour of >= `min_area` (a blob cut in     #prompted
                   two by an object drawn over it counts once)
strict_fidelity    mean of found_<i> if objects <= #prompted, else 0              1
stray_fraction     fraction of pixels that are neither the background nor a       ground
                   prompted colour ("other" or an unprompted palette colour)      truth
=================  =============================================================  =========

Shape class of a blob: the ideal circle, square and upward triangle inscribed in the blob's
bounding box are compared with the blob by IoU, ignoring pixels of other objects' colours
(they may hide part of it); the class is the best template if its IoU >= `min_iou`, else none.
A round blob therefore only counts as a circle if it is round *and* fills its box like one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from packforcing.world import BACKGROUNDS, COLOURS, MIN_CONTRAST, Scene, parse_caption
from packforcing.world.palette import colour_distance

SHAPE_NAMES = ("circle", "square", "triangle")


def prompted_objects(prompt) -> tuple[list[tuple[str, str]], str | None]:
    """([(colour, shape), ...], background name or None) of a Scene or a caption."""
    if isinstance(prompt, Scene):
        return [(o.colour, o.shape) for o in prompt.objects], prompt.background
    return parse_caption(prompt)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes inscribed in an h x w box (pixel centres), bool [h, w] each."""
    y = (np.arange(h) + 0.5)[:, None] / h  # 0..1 top to bottom
    x = (np.arange(w) + 0.5)[None, :] / w
    circle = (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1
    square = np.ones((h, w), dtype=bool)
    triangle = np.abs(2 * x - 1) <= y  # apex at the top centre, base along the bottom
    return {"circle": circle, "square": square, "triangle": np.broadcast_to(triangle, (h, w))}


def _template_iou(blob: np.ndarray, hidden: np.ndarray, box) -> dict[str, float]:
    """IoU of `blob` with each template inscribed in `box` (y0, y1, x0, x1), hidden pixels ignored."""
    y0, y1, x0, x1 = box
    b = blob[y0:y1, x0:x1]
    care = ~hidden[y0:y1, x0:x1] | b
    outside = int(blob.sum() - b.sum())  # blob pixels outside the box count against every template
    return {name: float((b & t & care).sum() / max(((b | t) & care).sum() + outside, 1))
            for name, t in _templates(y1 - y0, x1 - x0).items()}


def _box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def shape_class(blob: np.ndarray, hidden: np.ndarray, min_iou: float = 0.75) -> tuple[str | None, float]:
    """(best shape or None, its IoU) for a bool blob mask; `hidden` marks pixels to ignore.

    Candidate boxes: the blob's own, and the box of the blob with the hidden pixels touching it (an
    object drawn over an edge of the blob shrinks the blob's own box)."""
    boxes = [_box(blob)]
    if hidden.any():
        groups, _ = ndimage.label(blob | hidden)
        touching = np.unique(groups[blob])
        boxes.append(_box(np.isin(groups, touching[touching > 0])))
    best, best_iou = None, 0.0
    for box in boxes:
        for name, iou in _template_iou(blob, hidden, box).items():
            if iou > best_iou:
                best, best_iou = name, iou
    return (best if best_iou >= min_iou else None), best_iou


def best_shape(frame: np.ndarray, colour: str, background_rgb, tol: float = 60.0, min_area: float = 0.01) -> str | None:
    """The template (circle / square / triangle) that best matches the largest blob of `colour` in
    uint8 [H, W, 3] `frame`, with no IoU threshold (every blob gets a class: chance is 1/3 when the
    outline says nothing); None if no blob of `colour` covers `min_area` of the frame. For
    diagnostics of *which* shape a model draws (`scripts/measure_text_binding.py`)."""
    labels, names = classify_pixels(frame, background_rgb, tol)
    if colour not in names:
        return None
    mine = labels == names.index(colour)
    groups, n = ndimage.label(mine)
    if n == 0:
        return None
    sizes = ndimage.sum(mine, groups, range(1, n + 1))
    blob = groups == (int(np.argmax(sizes)) + 1)
    if blob.sum() < min_area * blob.size:
        return None
    ious = _template_iou(blob, np.zeros_like(blob), _box(blob))
    return max(ious, key=ious.get)


def classify_pixels(frame: np.ndarray, background_rgb, tol: float = 60.0) -> tuple[np.ndarray, list[str]]:
    """Palette index per pixel, int [H, W]: k < len(names) = that object colour, len(names) =
    background, -1 = other. Object colours too close to the background to be used on it
    (`MIN_CONTRAST`) are left out. Returns (labels, object colour names in index order)."""
    names = [n for n in COLOURS if colour_distance(COLOURS[n], background_rgb) >= MIN_CONTRAST]
    palette = np.array([COLOURS[n] for n in names] + [tuple(background_rgb)], dtype=np.int32)
    d2 = ((frame.astype(np.int32)[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # [H, W, K]
    nearest = d2.argmin(-1)
    return np.where(d2.min(-1) <= tol * tol, nearest, -1), names


def frame_objects(frame: np.ndarray, objects: list[tuple[str, str]], background_rgb, tol: float = 60.0,
                  min_area: float = 0.01, min_iou: float = 0.75) -> dict:
    """The columns of the module docstring for one uint8 [H, W, 3] frame."""
    labels, names = classify_pixels(frame, background_rgb, tol)
    n_pix = labels.size
    min_px = max(1, int(round(min_area * n_pix)))
    any_object = (labels >= 0) & (labels < len(names))
    row, count = {}, 0
    blobs: dict[str, list[np.ndarray]] = {}
    for k, name in enumerate(names):
        mine = labels == k
        if mine.sum() < min_px:
            continue
        # group this colour's pixels through other objects' pixels (an object drawn over a larger
        # one can cut it in two), then keep groups with enough pixels of this colour
        groups, n = ndimage.label(mine | (any_object & ~mine))
        found = []
        for g in range(1, n + 1):
            part = mine & (groups == g)
            if part.sum() >= min_px:
                found.append(part)
        blobs[name] = sorted(found, key=lambda m: -int(m.sum()))
        count += len(found)
    for i, (colour, shape) in enumerate(objects):
        candidates = blobs.get(colour, [])
        row[f"colour_found_{i}"] = float(bool(candidates))
        ok = False
        for blob in candidates:
            got, _ = shape_class(blob, any_object & ~blob, min_iou)
            if got == shape:
                ok = True
                break
        row[f"found_{i}"] = float(ok)
    found_mean = float(np.mean([row[f"found_{i}"] for i in range(len(objects))])) if objects else np.nan
    row["objects"] = count
    row["strict_fidelity"] = found_mean if count <= len(objects) else 0.0
    prompted = {names.index(c) for c, _ in objects if c in names} | {len(names)}
    row["stray_fraction"] = float(1.0 - np.isin(labels, list(prompted)).mean())
    return row


def object_frame_table(video: np.ndarray, prompt, fps: float = 16, tol: float = 60.0, min_area: float = 0.01,
                       min_iou: float = 0.75, every: int = 1) -> pd.DataFrame:
    """One row per evaluated frame (every `every`-th) of uint8 [T, H, W, 3] `video`."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    objects, background = prompted_objects(prompt)
    rows = []
    for t in range(0, len(video), max(1, every)):
        frame = video[t]
        bg = BACKGROUNDS[background] if background else np.median(frame.reshape(-1, 3), axis=0)
        rows.append({"frame": t, "t_s": t / fps, **frame_objects(frame, objects, bg, tol, min_area, min_iou)})
    return pd.DataFrame(rows)


def object_summary(table: pd.DataFrame, fps: float = 16, last_s: float | None = None) -> dict:
    """Means of strict_fidelity, colour fidelity (colour_found), objects and stray_fraction; with
    `last_s`, over the frames of the last `last_s` seconds only."""
    if last_s is not None and len(table):
        table = table[table["t_s"] >= table["t_s"].max() + 1 / fps - last_s]
    colour_cols = [c for c in table.columns if c.startswith("colour_found_")]
    return {"strict_fidelity": float(table["strict_fidelity"].mean()),
            "colour_fidelity": float(table[colour_cols].to_numpy().mean()) if colour_cols else np.nan,
            "objects": float(table["objects"].mean()),
            "stray_fraction": float(table["stray_fraction"].mean())}


def failure_summary(table: pd.DataFrame) -> dict:
    """Why frames fail the strict test: ``extra_object_frames`` = share of frames with more objects
    than prompted (strict 0 whatever their shapes), ``shape_found`` = share of prompted objects
    found in their colour *and* shape, counted in every frame (extra objects or not)."""
    found = [c for c in table.columns if c.startswith("found_")]
    n_objects = len(found)
    return {"extra_object_frames": float((table["objects"] > n_objects).mean()),
            "shape_found": float(table[found].to_numpy().mean()) if found else np.nan}
