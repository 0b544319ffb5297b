"""Plotly figures and tables from recorded traces (see :mod:`packforcing.trace`).

Pure functions of the recorder's DataFrames, safe on partial tables (a run in progress) and
on empty or missing ones (an annotated empty figure, never an exception). Only long-standing
trace attributes are used, because Gradio's front end bundles plotly.js 3.x.
Memory in "MB" means bytes / 2**20.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from packforcing.trace import PARTITIONS, PHASES, summarize

MB = 2**20
PARTITION_COLORS = {"sink": "#1f77b4", "mid_archive": "#ffbb78", "mid_selected": "#ff7f0e",
                    "recent": "#2ca02c", "current": "#d62728"}
PARTITION_LABELS = {"sink": "sink", "mid_archive": "mid archive (not selected)",
                    "mid_selected": "mid selected (top-k)", "recent": "recent",
                    "current": "current"}
PHASE_COLORS = {"denoise": "#1f77b4", "commit": "#9467bd", "compress": "#8c564b",
                "select": "#e377c2", "rope": "#bcbd22", "decode": "#17becf", "recache": "#ff9896",
                "other": "#c7c7c7"}
OTHER_COLOR = "#7f7f7f"


def _usable(df, columns) -> bool:
    return df is not None and len(df) > 0 and set(columns) <= set(df.columns)


def _ordered(names, order) -> list[str]:
    """Known names in their fixed order, then unknown ones sorted."""
    names = set(names)
    return [n for n in order if n in names] + sorted(names - set(order))


def _empty_figure(title: str, message: str) -> go.Figure:
    """A figure with no data and a centred explanatory annotation."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, font=dict(size=14))
    fig.update_layout(title=dict(text=title), xaxis=dict(visible=False),
                      yaxis=dict(visible=False))
    return fig


def mark_switches(fig: go.Figure, switches: pd.DataFrame | None, x_of_block=lambda b: b) -> go.Figure:
    """A dashed vertical line at each prompt switch (``switches`` table), labelled "prompt i (mode)";
    ``x_of_block`` maps a block index to the figure's x. No table: the figure unchanged."""
    if not _usable(switches, ["block", "prompt_index", "mode"]):
        return fig
    for row in switches.itertuples(index=False):
        fig.add_vline(x=x_of_block(int(row.block)) - 0.5, line=dict(color="#444444", dash="dash", width=1.5),
                      annotation_text=f"prompt {int(row.prompt_index)} ({row.mode})", annotation_position="top",
                      annotation_font_size=10)
    return fig


def _segments(starts, ends, texts):
    """x values [start, end, None, ...] (and matching hover texts): many segments, one trace."""
    xs, ts = [], []
    for s, e, t in zip(starts, ends, texts):
        xs += [s, e, None]
        ts += [t, t, ""]
    return xs, ts


# ---- cache occupancy ----------------------------------------------------------------------
def cache_occupancy_figure(occupancy_df: pd.DataFrame | None, layer: int | None = None,
                           unit: str = "tokens", switches: pd.DataFrame | None = None) -> go.Figure:
    """Stacked areas of KV tokens (or MB) per partition over generation steps.

    x = block * S + step with S = steps per block incl. the commit pass (inferred from the
    data). ``layer=None`` averages over layers. ``mid_archive`` is drawn minus
    ``mid_selected`` so the stack total is what is stored and the attended part is visible.
    """
    if unit not in ("tokens", "MB"):
        raise ValueError(f"unit must be 'tokens' or 'MB', not {unit!r}")
    where = "mean over layers" if layer is None else f"layer {layer}"
    title = f"KV cache occupancy by partition ({where})"
    cols = ["block", "step", "layer", "partition", "tokens", "bytes"]
    if not _usable(occupancy_df, cols):
        return _empty_figure(title, "No cache occupancy recorded yet.")
    df = occupancy_df if layer is None else occupancy_df[occupancy_df["layer"] == layer]
    if df.empty:
        return _empty_figure(title, f"No cache occupancy recorded for layer {layer}.")
    value = "tokens" if unit == "tokens" else "bytes"
    per_layer = df.groupby(["block", "step", "layer", "partition"])[value].last()
    wide = per_layer.unstack("partition", fill_value=0).groupby(["block", "step"]).mean()
    if unit == "MB":
        wide = wide / MB
    if "mid_archive" in wide and "mid_selected" in wide:
        wide["mid_archive"] = (wide["mid_archive"] - wide["mid_selected"]).clip(lower=0)
    blocks = wide.index.get_level_values("block").to_numpy()
    steps = wide.index.get_level_values("step").to_numpy()
    per_block = int(df["step"].max()) + 1
    x = blocks * per_block + steps
    fmt = "%{y:,.0f} tokens" if unit == "tokens" else "%{y:,.2f} MB"
    fig = go.Figure()
    for part in _ordered(wide.columns, PARTITIONS):
        color = PARTITION_COLORS.get(part, OTHER_COLOR)
        label = PARTITION_LABELS.get(part, part)
        fig.add_trace(go.Scatter(
            x=x, y=wide[part].to_numpy(), name=label, legendgroup=part, stackgroup="occupancy",
            mode="lines", line=dict(width=0.5, color=color, shape="hv"), fillcolor=color,
            customdata=np.column_stack([blocks, steps]),
            hovertemplate=f"{label}<br>block %{{customdata[0]}}, step %{{customdata[1]}}"
                          f"<br>{fmt}<extra></extra>"))
    fig.update_layout(title=dict(text=title), hovermode="x unified",
                      xaxis=dict(title=dict(text=f"generation step (block × {per_block} + step)")),
                      yaxis=dict(title=dict(text="KV cache (tokens)" if unit == "tokens"
                                            else "KV cache (MB = 2^20 bytes)")))
    return mark_switches(fig, switches, lambda b: b * per_block + 0.5)


# ---- top-k scores ----------------------------------------------------------------------------
def topk_heatmap_figure(scores_df: pd.DataFrame | None, layer: int | None = None, fps: float = 16,
                        frames_per_latent: int = 4, switches: pd.DataFrame | None = None) -> go.Figure:
    """Heatmap of mid-block scores: x = generation block, y = mid block, selected cells marked.

    Hover gives the mid block's time range in the video: latent frame f ≈ pixel frame
    ``frames_per_latent * f``, seconds = pixel frame / ``fps``. ``layer=None`` shows the mean
    score over layers and marks blocks selected in a majority of layers.
    """
    if layer is None:
        title = "Top-k mid selection: mean score over layers, marked = selected in most layers"
    else:
        title = f"Top-k mid selection: layer {layer}, marked = selected"
    cols = ["block", "layer", "candidate", "frame_start", "frame_end", "score", "selected"]
    if not _usable(scores_df, cols):
        return _empty_figure(title, "No mid-block scores recorded (yet): no mid archive, "
                                    "or a policy without top-k selection.")
    df = scores_df if layer is None else scores_df[scores_df["layer"] == layer]
    if df.empty:
        return _empty_figure(title, f"No mid-block scores recorded for layer {layer}.")
    agg = df.groupby(["block", "candidate"]).agg(
        score=("score", "mean"), n_sel=("selected", "sum"), n=("selected", "size"),
        frame_start=("frame_start", "first"), frame_end=("frame_end", "first"))
    agg["selected"] = agg["n_sel"] * 2 > agg["n"]
    spans = agg.groupby("candidate")[["frame_start", "frame_end"]].first()
    spans = spans.sort_values(["frame_start", "frame_end"])
    cands = spans.index.to_list()
    blocks = sorted(agg.index.get_level_values("block").unique())
    z = agg["score"].unstack("block").reindex(index=cands, columns=blocks)
    picked = agg[agg["selected"]].reset_index()
    chosen = set(zip(picked["block"], picked["candidate"]))
    sec = frames_per_latent / fps
    text = []
    for c, (fs, fe) in zip(cands, spans.itertuples(index=False, name=None)):
        row = []
        for b in blocks:
            s = z.at[c, b]
            if pd.isna(s):
                row.append("")
                continue
            mark = " (selected)" if (b, c) in chosen else ""
            row.append(f"generation block {b}<br>mid block {c}: latent frames {fs}–{fe}, "
                       f"≈ {fs * sec:.2f}–{fe * sec:.2f} s<br>score {s:.4g}{mark}")
        text.append(row)
    fig = go.Figure(go.Heatmap(
        x=blocks, y=cands, z=z.to_numpy(dtype=float), text=text, name="score",
        hovertemplate="%{text}<extra></extra>", hoverongaps=False, colorscale="Viridis",
        colorbar=dict(title=dict(text="score" if layer is not None else "mean score"))))
    fig.add_trace(go.Scatter(
        x=picked["block"].to_numpy(), y=picked["candidate"].to_numpy(), mode="markers",
        name="selected", hoverinfo="skip", showlegend=True,
        marker=dict(symbol="square-open", size=12, color="#ff2b2b", line=dict(width=2))))
    fig.update_layout(title=dict(text=title), legend=dict(orientation="h", y=-0.15),
                      xaxis=dict(title=dict(text="generation block")),
                      yaxis=dict(title=dict(text="mid block (source block, by origin time)")))
    return mark_switches(fig, switches)


# ---- RoPE positions --------------------------------------------------------------------------
def rope_position_figure(positions_df: pd.DataFrame | None, block: int | None = None,
                         layer: int = 0, position_span: float | None = None) -> go.Figure:
    """Each cached block's temporal RoPE positions before | after adjustment, by region.

    One generation block (default: the latest recorded). Grey bars are the block's original
    latent-frame span; coloured bars start at the assigned position and are
    ``position_span`` positions wide (default: as many as its latent frames).
    """
    cols = ["block", "layer", "region", "source_block", "frame_start", "frame_end",
            "pos_before", "pos_after"]
    title = "RoPE temporal positions of the cached blocks"
    if not _usable(positions_df, cols):
        return _empty_figure(title, "No RoPE positions recorded yet.")
    df = positions_df[positions_df["layer"] == layer]
    if df.empty:
        return _empty_figure(title, f"No RoPE positions recorded for layer {layer}.")
    block = int(df["block"].max()) if block is None else block
    df = df[df["block"] == block]
    if df.empty:
        return _empty_figure(title, f"No RoPE positions recorded for block {block}.")
    df = df.drop_duplicates("source_block", keep="last")
    df = df.sort_values(["frame_start", "source_block"])
    df = df.assign(label=[f"block {b}" for b in df["source_block"]])
    width = (df["frame_end"] - df["frame_start"]) if position_span is None else position_span
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("before adjustment", "after adjustment"))
    for col, pos in ((1, "pos_before"), (2, "pos_after")):
        ys = [v for y in df["label"] for v in (y, y, None)]
        xs, texts = _segments(df["frame_start"], df["frame_end"],
                              [f"{lab}: original latent frames {s}–{e}" for lab, s, e in
                               zip(df["label"], df["frame_start"], df["frame_end"])])
        fig.add_trace(go.Scatter(x=xs, y=ys, text=texts, mode="lines", name="original frames",
                                 legendgroup="original", showlegend=col == 1,
                                 line=dict(color="#d9d9d9", width=16),
                                 hovertemplate="%{text}<extra></extra>"), row=1, col=col)
        ends = df[pos] + width
        for region in _ordered(df["region"], PARTITIONS):
            m = (df["region"] == region).to_numpy()
            sub = df[m]
            xs, texts = _segments(sub[pos], ends[m], [
                f"{lab} ({region}): frames {s}–{e}, position {p:g} → {q:g}" for lab, s, e, p, q in
                zip(sub["label"], sub["frame_start"], sub["frame_end"], sub["pos_before"],
                    sub["pos_after"])])
            fig.add_trace(go.Scatter(
                x=xs, y=[v for y in sub["label"] for v in (y, y, None)], text=texts,
                mode="lines+markers", name=region, legendgroup=region, showlegend=col == 1,
                line=dict(color=PARTITION_COLORS.get(region, OTHER_COLOR), width=6),
                marker=dict(size=5), hovertemplate="%{text}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title=dict(text="temporal position (latent frames)"), row=1, col=col)
    fig.update_yaxes(title=dict(text="cached block (by origin time)"), categoryorder="array",
                     categoryarray=df["label"].to_list(), autorange="reversed", row=1, col=1)
    fig.update_layout(title=dict(text=f"{title} at generation block {block} (layer {layer})"))
    return fig


# ---- latency and memory ----------------------------------------------------------------------
def latency_memory_figure(blocks_df: pd.DataFrame | None,
                          timing_df: pd.DataFrame | None = None, switches: pd.DataFrame | None = None) -> go.Figure:
    """Seconds per block (stacked phases when ``timing_df`` is given) and KV MB (right axis).

    Both curves should be flat for a bounded cache. "other" = block seconds not covered by
    the recorded phases.
    """
    title = "Latency and KV memory per block"
    have_blocks = _usable(blocks_df, ["block", "seconds", "kv_bytes"])
    have_timing = _usable(timing_df, ["block", "phase", "seconds"])
    if not (have_blocks or have_timing):
        return _empty_figure(title, "No finished blocks recorded yet.")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if have_timing:
        per = timing_df.groupby(["block", "phase"])["seconds"].sum().unstack(fill_value=0.0)
        if have_blocks:
            total = blocks_df.groupby("block")["seconds"].last()
            other = (total - per.sum(axis=1).reindex(total.index, fill_value=0.0)).clip(lower=0)
            per = per.reindex(per.index.union(total.index), fill_value=0.0)
            if (other > 1e-9).any():
                per["other"] = other.reindex(per.index, fill_value=0.0)
        for phase in _ordered(per.columns, PHASES + ("other",)):
            fig.add_trace(go.Bar(x=per.index.to_numpy(), y=per[phase].to_numpy(), name=phase,
                                 legendgroup="phase", marker=dict(color=PHASE_COLORS.get(
                                     phase, OTHER_COLOR)),
                                 hovertemplate=f"{phase}: %{{y:.3f}} s<extra></extra>"),
                          secondary_y=False)
    if have_blocks:
        b = blocks_df.sort_values("block")
        fig.add_trace(go.Scatter(x=b["block"], y=b["seconds"], name="block wall time",
                                 mode="lines+markers", line=dict(color="#222222"),
                                 hovertemplate="block %{x}: %{y:.3f} s<extra></extra>"),
                      secondary_y=False)
        fig.add_trace(go.Scatter(x=b["block"], y=b["kv_bytes"] / MB, name="KV cache (MB)",
                                 mode="lines+markers", line=dict(color="#d62728", dash="dash"),
                                 hovertemplate="block %{x}: KV %{y:,.2f} MB<extra></extra>"),
                      secondary_y=True)
        if "peak_memory_bytes" in b and b["peak_memory_bytes"].notna().any():
            peak = b["peak_memory_bytes"].astype("float64") / MB
            fig.add_trace(go.Scatter(x=b["block"], y=peak, name="peak device memory (MB)",
                                     mode="lines", line=dict(color="#9467bd", dash="dot"),
                                     hovertemplate="block %{x}: peak %{y:,.1f} MB<extra></extra>"),
                          secondary_y=True)
    fig.update_layout(title=dict(text=title), barmode="stack", hovermode="x unified")
    fig.update_xaxes(title=dict(text="generation block"))
    fig.update_yaxes(title=dict(text="seconds per block"), secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title=dict(text="memory (MB = 2^20 bytes)"), secondary_y=True,
                     rangemode="tozero")
    return mark_switches(fig, switches)


def compare_figure(blocks_by_policy: Mapping[str, pd.DataFrame] | None) -> go.Figure:
    """KV MB (top) and seconds per block (bottom) of several policies, one colour each."""
    title = "Policy comparison: KV memory and latency per block"
    runs = {k: v for k, v in (blocks_by_policy or {}).items()
            if _usable(v, ["block", "seconds", "kv_bytes"])}
    if not runs:
        return _empty_figure(title, "No finished blocks to compare yet.")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("KV cache (MB)", "seconds per block"))
    palette = qualitative.Plotly
    for i, (name, df) in enumerate(runs.items()):
        df = df.sort_values("block")
        color = palette[i % len(palette)]
        for row, y, fmt in ((1, df["kv_bytes"] / MB, "%{y:,.2f} MB"),
                            (2, df["seconds"], "%{y:.3f} s")):
            fig.add_trace(go.Scatter(x=df["block"], y=y, name=str(name), legendgroup=str(name),
                                     showlegend=row == 1, mode="lines+markers",
                                     line=dict(color=color),
                                     hovertemplate=f"{name}, block %{{x}}: {fmt}<extra></extra>"),
                          row=row, col=1)
    fig.update_layout(title=dict(text=title), hovermode="x unified")
    fig.update_xaxes(title=dict(text="generation block"), row=2, col=1)
    fig.update_yaxes(title=dict(text="KV cache (MB = 2^20 bytes)"), rangemode="tozero",
                     row=1, col=1)
    fig.update_yaxes(title=dict(text="seconds per block"), rangemode="tozero", row=2, col=1)
    return fig


# ---- tables ----------------------------------------------------------------------------------
def summary_table(tables) -> pd.DataFrame:
    """One row per run of :func:`packforcing.trace.summarize` numbers.

    ``tables`` is one run's tables (optionally with a ``"meta"`` dict entry), a mapping
    run name -> such tables, or a mapping run name -> blocks DataFrame (as for
    :func:`compare_figure`).
    """
    tables = dict(tables or {})
    if "blocks" in tables and isinstance(tables["blocks"], pd.DataFrame):
        meta = dict(tables.get("meta") or {})
        runs = {meta.get("policy") or "run": tables}
    else:
        runs = {name: (t if isinstance(t, Mapping) else {"blocks": t})
                for name, t in tables.items()}
    rows = []
    for name, t in runs.items():
        meta = dict(t.get("meta") or {})
        meta.setdefault("policy", str(name))
        rows.append({"run": str(name), **summarize(t, meta)})
    if not rows:
        return pd.DataFrame({"run": pd.Series([], dtype="str")})
    return pd.DataFrame(rows)
