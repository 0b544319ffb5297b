"""The mid-token inspector: which compressed mid blocks a generation block keeps, and what their
tokens receive. Pure functions of the trace tables (`packforcing.trace`) and, optionally, block
thumbnails (uint8 [h, w, 3] per generation block, e.g. `packforcing.studio.worker.block_thumbnail`);
safe on empty or partial tables (an annotated empty figure, never an exception).

- `mid_inspector_figure`: every archived mid candidate of one block as a thumbnail of its source
  frames, with its score, rank, whether it was selected and the temporal RoPE position it was given.
- `mid_token_heatmap_figure`: for one selected mid block, the attention mass of each compressed
  token (``mid_attention``) as a heatmap over the compressed grid, laid over its thumbnail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.figures import _empty_figure

SELECTED, DROPPED = "#ff7f0e", "#9e9e9e"
MAX_SHOWN = 32  # candidates drawn (the best by score; the rest are counted in the title)
PER_ROW = 8


def _table(tables, name) -> pd.DataFrame | None:
    df = (tables or {}).get(name)
    return df if df is not None and len(df) else None


def candidates(tables: Mapping, block: int, layer: int | None = None) -> pd.DataFrame:
    """One row per mid candidate of ``block``: candidate (source block), score (mean over layers when
    ``layer`` is None), rank (1 = best), selected (in a majority of layers when averaged),
    layers_selected / layers, and position (the RoPE start it was attended at; NaN: not attended)."""
    scores = _table(tables, "scores")
    cols = ["candidate", "score", "rank", "selected", "layers_selected", "layers", "position"]
    if scores is None:
        return pd.DataFrame(columns=cols + ["position_max"])
    rows = scores[scores["block"] == block]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    if not len(rows):
        return pd.DataFrame(columns=cols + ["position_max"])
    out = rows.groupby("candidate").agg(score=("score", "mean"), layers_selected=("selected", "sum"),
                                        layers=("selected", "size")).reset_index()
    out["selected"] = out["layers_selected"] * 2 > out["layers"]
    out["rank"] = out["score"].rank(method="first", ascending=False, na_option="bottom").astype(int)
    positions = _table(tables, "positions")
    out["position"] = np.nan
    if positions is not None:
        pos = positions[(positions["block"] == block) & (positions["region"] == "mid_selected")]
        if layer is not None:
            pos = pos[pos["layer"] == layer]
        span = pos.groupby("source_block")["pos_after"].agg(["min", "max"])
        out["position"] = out["candidate"].map(span["min"])
        out["position_max"] = out["candidate"].map(span["max"])
    else:
        out["position_max"] = np.nan
    return out.sort_values("candidate").reset_index(drop=True)[cols + ["position_max"]]


def _where(r) -> str:
    """'@start' of a selected mid block's RoPE start, '@lo–hi' when layers placed it differently."""
    if pd.isna(r.position):
        return ""
    return f"@{r.position:g}" if r.position_max == r.position else f"@{r.position:g}–{r.position_max:g}"


def _tile(thumbs, source: int) -> np.ndarray:
    if thumbs and source in thumbs:
        return np.asarray(thumbs[source], dtype=np.uint8)
    return np.full((24, 24, 3), 200, dtype=np.uint8)  # no video: a grey tile


def mid_inspector_figure(tables: Mapping | None, block: int | None, layer: int | None = None,
                         thumbs: Mapping[int, np.ndarray] | None = None) -> go.Figure:
    """The archived mid blocks of generation ``block`` (see the module docstring). Selected ones get an
    orange frame and their rank; the title says k of M. ``layer=None``: mean over layers."""
    where = "mean over layers" if layer is None else f"layer {layer}"
    title = f"Mid blocks at generation block {block} ({where})"
    if block is None:
        return _empty_figure("Mid-token inspector", "No block generated (or replayed) yet.")
    cands = candidates(tables, block, layer)
    if not len(cands):
        return _empty_figure(title, "No mid blocks at this block: the policy keeps no compressed mid blocks, "
                             "or none were archived yet.")
    total, chosen = len(cands), int(cands["selected"].sum())
    shown = cands if total <= MAX_SHOWN else cands.nsmallest(MAX_SHOWN, "rank").sort_values("candidate")
    n = len(shown)
    cols = min(PER_ROW, n)
    rows = math.ceil(n / cols)
    labels = []
    for r in shown.itertuples(index=False):
        mark = f"✔ #{r.rank}" if r.selected else f"#{r.rank}"
        labels.append(f"block {int(r.candidate)} · {mark}")
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=labels, horizontal_spacing=0.02,
                        vertical_spacing=0.12 if rows > 1 else 0.02)
    for i, r in enumerate(shown.itertuples(index=False)):
        image = _tile(thumbs, int(r.candidate))
        row, col = i // cols + 1, i % cols + 1
        pos = "not attended" if pd.isna(r.position) else f"RoPE start {_where(r)[1:]}"
        layers = f"{int(r.layers_selected)}/{int(r.layers)} layers" if layer is None else ""
        hover = (f"mid block {int(r.candidate)}<br>score {r.score:.4g} (rank {r.rank} of {total})<br>"
                 f"{'selected' if r.selected else 'not selected'} {layers}<br>{pos}")
        fig.add_trace(go.Image(z=image, hovertemplate=hover + "<extra></extra>", name=f"mid {int(r.candidate)}"),
                      row=row, col=col)
        h, w = image.shape[:2]
        colour = SELECTED if r.selected else DROPPED
        fig.add_shape(type="rect", x0=-0.5, y0=-0.5, x1=w - 0.5, y1=h - 0.5, row=row, col=col,
                      line=dict(color=colour, width=4 if r.selected else 1))
        fig.add_annotation(text=f"{r.score:.3g}" + ("" if pd.isna(r.position) else f" · {_where(r)}"),
                           x=(w - 1) / 2, y=h - 0.5, yanchor="top", showarrow=False, row=row, col=col,
                           font=dict(size=10, color=colour))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    more = f"; the {MAX_SHOWN} best shown" if total > MAX_SHOWN else ""
    how = "selected" if layer is not None else "selected in most layers"
    fig.update_layout(title=dict(text=f"{title}: {chosen} of {total} {how} (✔, orange){more}"),
                      height=140 + 150 * rows, margin=dict(l=10, r=10, t=90, b=20), showlegend=False)
    for annotation in fig.layout.annotations[:n]:  # the subplot titles
        annotation.font = dict(size=10)
    return fig


def token_mass(tables: Mapping | None, block: int, source_block: int, layer: int | None = None) -> pd.DataFrame:
    """``mid_attention`` rows of one selected mid block at ``block``: token, token_t, token_y, token_x,
    mass. ``layer=None``: the mean over the block's layers, 0 in layers that did not select it."""
    att = _table(tables, "mid_attention")
    cols = ["token", "token_t", "token_y", "token_x", "mass"]
    if att is None:
        return pd.DataFrame(columns=cols)
    at_block = att[att["block"] == block]
    rows = at_block[at_block["source_block"] == source_block]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    if not len(rows):
        return pd.DataFrame(columns=cols)
    layers = 1 if layer is not None else at_block["layer"].nunique()
    out = rows.groupby(["token", "token_t", "token_y", "token_x"], as_index=False)["mass"].sum()
    out["mass"] /= layers
    return out[cols]


def busiest_mid_block(tables: Mapping | None, block: int, layer: int | None = None) -> int | None:
    """The selected mid block whose tokens receive the most attention at ``block`` (None: none)."""
    att = _table(tables, "mid_attention")
    if att is None:
        return None
    rows = att[att["block"] == block]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    if not len(rows):
        return None
    return int(rows.groupby("source_block")["mass"].sum().idxmax())  # = the mean over layers, 0 where unselected


def mid_token_heatmap_figure(tables: Mapping | None, block: int | None, source_block: int | None = None,
                             layer: int | None = None, thumbs: Mapping[int, np.ndarray] | None = None) -> go.Figure:
    """Attention mass per compressed token of mid block ``source_block`` at generation ``block``: one
    panel per temporal slice of the compressed grid (token_y × token_x cells), semi-transparent over
    the thumbnail of the source frames. ``source_block=None``: the selected one with the most mass."""
    title = "Attention on a mid block's compressed tokens"
    if block is None:
        return _empty_figure(title, "No block generated (or replayed) yet.")
    if source_block is None:
        source_block = busiest_mid_block(tables, block, layer)
        if source_block is None:
            return _empty_figure(title, f"No selected mid block at generation block {block}: nothing attended in the "
                                 "mid partition (or this policy keeps none).")
    mass = token_mass(tables, block, source_block, layer)
    if not len(mass):
        return _empty_figure(title, f"Mid block {source_block} was not selected at generation block {block}"
                             + ("" if layer is None else f", layer {layer}") + ".")
    grid_t = int(mass["token_t"].max()) + 1
    grid_h, grid_w = int(mass["token_y"].max()) + 1, int(mass["token_x"].max()) + 1
    z = np.full((grid_t, grid_h, grid_w), np.nan)
    z[mass["token_t"].to_numpy(), mass["token_y"].to_numpy(), mass["token_x"].to_numpy()] = mass["mass"].to_numpy()
    share = float(np.nansum(z))
    where = "mean over layers" if layer is None else f"layer {layer}"
    fig = make_subplots(rows=1, cols=grid_t, subplot_titles=[f"temporal slice {t}" for t in range(grid_t)],
                        horizontal_spacing=0.06)
    image = _tile(thumbs, source_block) if thumbs else None
    for t in range(grid_t):
        if image is not None:  # the source frames, stretched over the grid's extent
            h, w = image.shape[:2]
            fig.add_trace(go.Image(z=image, x0=-0.5, dx=grid_w / w, y0=-0.5, dy=grid_h / h, hoverinfo="skip",
                                   opacity=0.9), row=1, col=t + 1)
        fig.add_trace(go.Heatmap(z=z[t], x=list(range(grid_w)), y=list(range(grid_h)), zmin=0,
                                 zmax=float(np.nanmax(z)) or 1.0, colorscale="Inferno", opacity=0.6,
                                 showscale=t == grid_t - 1, colorbar=dict(title=dict(text="mass")),
                                 hovertemplate="token (t %{customdata}, y %{y}, x %{x})<br>mass %{z:.4g}<extra></extra>",
                                 customdata=np.full((grid_h, grid_w), t), texttemplate="%{z:.2%}",
                                 textfont=dict(size=14, color="white")), row=1, col=t + 1)
    fig.update_xaxes(showticklabels=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(title=dict(text=f"Mid block {source_block} at generation block {block} ({where}): "
                                      f"{share:.1%} of the block's attention"),
                      height=320, margin=dict(l=10, r=10, t=80, b=20))
    return fig
