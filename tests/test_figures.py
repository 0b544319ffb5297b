"""analysis.figures on a synthetic 10-block trace (see tests.test_trace.synthetic_run)."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from analysis.figures import (
    PARTITION_LABELS,
    cache_occupancy_figure,
    compare_figure,
    latency_memory_figure,
    rope_position_figure,
    summary_table,
    topk_heatmap_figure,
)
from packforcing.trace import PARTITIONS, empty_tables
from tests.test_trace import BLOCKS, BYTES_PER_TOKEN, LAYERS, STEPS, synthetic_run


@pytest.fixture(scope="module")
def tables():
    return synthetic_run().tables()


def names(fig):
    return [t.name for t in fig.data]


def mean_over_layers(occ, value="tokens"):
    """(block, step) x partition table of the layer mean of ``value``."""
    return occ.pivot_table(index=["block", "step"], columns="partition", values=value,
                           aggfunc="mean")


# ---- occupancy ------------------------------------------------------------------------------
def test_occupancy_traces_order_names_and_axes(tables):
    fig = cache_occupancy_figure(tables["occupancy"])
    assert isinstance(fig, go.Figure)
    assert names(fig) == [PARTITION_LABELS[p] for p in PARTITIONS]
    assert [t.legendgroup for t in fig.data] == list(PARTITIONS)
    assert all(t.stackgroup == "occupancy" for t in fig.data)
    assert len({t.fillcolor for t in fig.data}) == len(PARTITIONS)
    np.testing.assert_array_equal(fig.data[0].x, np.arange(BLOCKS * (STEPS + 1)))
    assert "generation step" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text == "KV cache (tokens)"
    assert "mean over layers" in fig.layout.title.text


def test_occupancy_stack_is_stored_total_and_selected_part(tables):
    fig = cache_occupancy_figure(tables["occupancy"])
    want = mean_over_layers(tables["occupancy"])
    stack = np.sum([t.y for t in fig.data], axis=0)
    stored = want[["sink", "mid_archive", "recent", "current"]].sum(axis=1).to_numpy()
    np.testing.assert_allclose(stack, stored)
    by_group = {t.legendgroup: t for t in fig.data}
    np.testing.assert_allclose(by_group["mid_selected"].y, want["mid_selected"].to_numpy())
    np.testing.assert_allclose(by_group["mid_archive"].y,
                               (want["mid_archive"] - want["mid_selected"]).to_numpy())


def test_occupancy_mb_scales_bytes(tables):
    tok = cache_occupancy_figure(tables["occupancy"], unit="tokens")
    mb = cache_occupancy_figure(tables["occupancy"], unit="MB")
    want = mean_over_layers(tables["occupancy"], "bytes") / 2**20
    for t_tok, t_mb in zip(tok.data, mb.data):
        np.testing.assert_allclose(t_mb.y, np.asarray(t_tok.y) * BYTES_PER_TOKEN / 2**20)
    np.testing.assert_allclose(mb.data[0].y, want["sink"].to_numpy())
    assert "MB" in mb.layout.yaxis.title.text
    with pytest.raises(ValueError):
        cache_occupancy_figure(tables["occupancy"], unit="GB")


def test_occupancy_layer_selection_filters(tables):
    occ = tables["occupancy"].copy()
    occ.loc[occ["layer"] == 1, "tokens"] *= 3  # make the layers differ
    sink = occ[occ["partition"] == "sink"].sort_values(["block", "step", "layer"])
    layer0 = sink[sink["layer"] == 0]["tokens"].to_numpy()
    fig0 = cache_occupancy_figure(occ, layer=0)
    fig1 = cache_occupancy_figure(occ, layer=1)
    mean = cache_occupancy_figure(occ)
    np.testing.assert_allclose(fig0.data[0].y, layer0)
    np.testing.assert_allclose(fig1.data[0].y, 3 * layer0)
    np.testing.assert_allclose(mean.data[0].y, 2 * layer0)
    assert "layer 1" in fig1.layout.title.text
    empty = cache_occupancy_figure(occ, layer=7)
    assert len(empty.data) == 0 and "layer 7" in empty.layout.annotations[0].text


# ---- top-k heatmap --------------------------------------------------------------------------
def test_topk_heatmap_cells_and_selected_markers(tables):
    scores = tables["scores"]
    s0 = scores[scores["layer"] == 0]
    fig = topk_heatmap_figure(scores, layer=0)
    heat, marks = fig.data
    assert isinstance(heat, go.Heatmap) and isinstance(marks, go.Scatter)
    assert names(fig) == ["score", "selected"]
    assert list(heat.x) == sorted(s0["block"].unique())
    assert list(heat.y) == sorted(s0["candidate"].unique())  # origin order = block order here
    z = np.asarray(heat.z, dtype=float)
    for row in s0.itertuples():
        assert z[list(heat.y).index(row.candidate), list(heat.x).index(row.block)] == row.score
    assert np.isnan(z).sum() == z.size - len(s0)  # cells never scored stay empty
    marked = set(zip(marks.x.tolist(), marks.y.tolist()))
    selected = set(zip(s0.loc[s0["selected"], "block"], s0.loc[s0["selected"], "candidate"]))
    assert marked == selected and len(marked) == len(marks.x)
    assert fig.layout.xaxis.title.text == "generation block"
    assert fig.layout.yaxis.title.text.startswith("mid block")
    assert "layer 0" in fig.layout.title.text


def test_topk_heatmap_mean_and_majority_over_layers(tables):
    scores = tables["scores"]
    fig = topk_heatmap_figure(scores)
    heat, marks = fig.data
    mean = scores.pivot_table(index="candidate", columns="block", values="score", aggfunc="mean")
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), mean.to_numpy())
    votes = scores.groupby(["block", "candidate"])["selected"].sum()
    majority = {k for k, v in votes.items() if 2 * v > LAYERS}
    assert set(zip(marks.x.tolist(), marks.y.tolist())) == majority
    assert "mean score" in fig.layout.title.text and "most layers" in fig.layout.title.text


def test_topk_hover_gives_time_range_in_seconds(tables):
    fig = topk_heatmap_figure(tables["scores"], layer=0, fps=16, frames_per_latent=4)
    heat = fig.data[0]
    row = list(heat.y).index(3)  # mid block 3 = latent frames 12-16 = pixel frames 48-64
    text = next(t for t in heat.text[row] if t)
    assert "latent frames 12–16" in text and "3.00–4.00 s" in text
    slow = topk_heatmap_figure(tables["scores"], layer=0, fps=8).data[0]
    assert "6.00–8.00 s" in next(t for t in slow.text[row] if t)
    assert heat.hovertemplate == "%{text}<extra></extra>"


# ---- RoPE positions -------------------------------------------------------------------------
def test_rope_positions_default_latest_block(tables):
    pos = tables["positions"]
    fig = rope_position_figure(pos)
    regions = ["sink", "mid_selected", "recent", "current"]
    assert names(fig) == (["original frames"] + regions) * 2
    assert [t.showlegend for t in fig.data] == [True] * 5 + [False] * 5
    assert f"block {BLOCKS - 1}" in fig.layout.title.text and "layer 0" in fig.layout.title.text
    want = pos[(pos["block"] == BLOCKS - 1) & (pos["layer"] == 0)]
    for trace in fig.data[1:5]:  # before panel: starts at pos_before
        assert trace.xaxis == "x"
        sub = want[want["region"] == trace.name]
        assert list(trace.x[0::3]) == sub["pos_before"].tolist()
    for trace in fig.data[6:]:  # after panel: starts at pos_after, 4 positions wide
        assert trace.xaxis == "x2"
        sub = want[want["region"] == trace.name]
        assert list(trace.x[0::3]) == sub["pos_after"].tolist()
        assert list(trace.x[1::3]) == (sub["pos_after"] + 4).tolist()
    assert list(fig.layout.yaxis.categoryarray) == [
        f"block {b}" for b in want.sort_values("frame_start")["source_block"]]
    assert fig.layout.xaxis2.title.text.startswith("temporal position")


def test_rope_positions_choose_block_and_layer(tables):
    pos = tables["positions"]
    fig = rope_position_figure(pos, block=5, layer=1, position_span=2)
    assert "block 5" in fig.layout.title.text and "layer 1" in fig.layout.title.text
    after = [t for t in fig.data if t.xaxis == "x2" and t.name != "original frames"]
    starts = np.asarray([v for t in after for v in t.x[0::3]])
    ends = np.asarray([v for t in after for v in t.x[1::3]])
    np.testing.assert_allclose(ends - starts, 2)
    missing = rope_position_figure(pos, block=99)
    assert len(missing.data) == 0 and "block 99" in missing.layout.annotations[0].text


# ---- latency, memory, comparison, summary ------------------------------------------------------
def test_latency_memory_with_phases(tables):
    fig = latency_memory_figure(tables["blocks"], tables["timing"])
    phases = ["denoise", "commit", "compress", "select", "rope", "decode", "other"]
    assert names(fig) == phases + ["block wall time", "KV cache (MB)", "peak device memory (MB)"]
    assert all(isinstance(t, go.Bar) for t in fig.data[:7]) and fig.layout.barmode == "stack"
    bars = np.sum([t.y for t in fig.data[:7]], axis=0)
    np.testing.assert_allclose(bars, tables["blocks"]["seconds"])  # phases + other = wall time
    kv = fig.data[8]
    assert kv.yaxis == "y2" and fig.data[7].yaxis == "y"
    np.testing.assert_allclose(kv.y, tables["blocks"]["kv_bytes"] / 2**20)
    assert fig.layout.yaxis.title.text == "seconds per block"
    assert "MB" in fig.layout.yaxis2.title.text
    assert fig.layout.xaxis.title.text == "generation block"


def test_latency_memory_without_timing_or_blocks(tables):
    fig = latency_memory_figure(tables["blocks"])
    assert names(fig) == ["block wall time", "KV cache (MB)", "peak device memory (MB)"]
    live = latency_memory_figure(empty_tables()["blocks"], tables["timing"])
    assert names(live) == ["denoise", "commit", "compress", "select", "rope", "decode"]


def test_compare_figure_two_policies(tables):
    full = tables["blocks"].assign(kv_bytes=lambda d: (d["block"] + 1) * 2**24,
                                   seconds=lambda d: 0.1 + 0.02 * d["block"])
    fig = compare_figure({"packforcing": tables["blocks"], "full": full})
    assert names(fig) == ["packforcing", "packforcing", "full", "full"]
    assert [t.showlegend for t in fig.data] == [True, False, True, False]
    assert [t.yaxis for t in fig.data] == ["y", "y2", "y", "y2"]
    np.testing.assert_allclose(fig.data[2].y, (np.arange(BLOCKS) + 1) * 16.0)
    assert fig.data[0].line.color != fig.data[2].line.color
    assert fig.layout.xaxis2.title.text == "generation block"
    assert "MB" in fig.layout.yaxis.title.text
    assert fig.layout.yaxis2.title.text == "seconds per block"


def test_summary_table_one_row_per_run(tables):
    rec = synthetic_run()
    one = summary_table({**tables, "meta": rec.meta})
    assert len(one) == 1 and one.loc[0, "run"] == "packforcing"
    assert one.loc[0, "peak_kv_bytes"] == tables["blocks"]["kv_bytes"].max()
    many = summary_table({"a": tables, "b": {"blocks": tables["blocks"].head(3)}})
    assert many["run"].tolist() == ["a", "b"] and many["blocks"].tolist() == [BLOCKS, 3]
    blocks_only = summary_table({"a": tables["blocks"], "b": tables["blocks"]})
    assert len(blocks_only) == 2 and blocks_only["mean_block_seconds"].notna().all()
    assert summary_table({}).empty


# ---- empty and partial inputs --------------------------------------------------------------
EMPTY = empty_tables()


@pytest.mark.parametrize("make", [
    lambda: cache_occupancy_figure(None),
    lambda: cache_occupancy_figure(EMPTY["occupancy"], unit="MB"),
    lambda: topk_heatmap_figure(EMPTY["scores"]),
    lambda: topk_heatmap_figure(pd.DataFrame()),
    lambda: rope_position_figure(EMPTY["positions"]),
    lambda: latency_memory_figure(EMPTY["blocks"], EMPTY["timing"]),
    lambda: latency_memory_figure(None),
    lambda: compare_figure({}),
    lambda: compare_figure({"window": EMPTY["blocks"]}),
], ids=["occ-none", "occ-empty", "topk", "topk-no-columns", "rope", "latency", "latency-none",
        "compare", "compare-empty"])
def test_empty_inputs_give_annotated_empty_figure(make):
    fig = make()
    assert isinstance(fig, go.Figure) and len(fig.data) == 0
    assert len(fig.layout.annotations) == 1 and fig.layout.annotations[0].text
    assert fig.layout.title.text
    fig.to_json()


def test_partial_live_trace_builds_every_figure():
    rec = synthetic_run(blocks=5)
    for layer in range(LAYERS):  # block 5 has started: first step only, no block_done yet
        rec.occupancy(5, 0, layer, "sink", 480, 480 * BYTES_PER_TOKEN)
        rec.occupancy(5, 0, layer, "current", 240, 240 * BYTES_PER_TOKEN)
    rec.phase(5, "denoise", 0.02)
    t = rec.tables()
    figs = [cache_occupancy_figure(t["occupancy"]), topk_heatmap_figure(t["scores"]),
            rope_position_figure(t["positions"]), latency_memory_figure(t["blocks"], t["timing"]),
            compare_figure({"live": t["blocks"]})]
    for fig in figs:
        assert len(fig.data) > 0
        fig.to_json()
    assert figs[0].data[0].x[-1] == 5 * (STEPS + 1)  # the new step is on the x axis
    assert figs[2].layout.title.text.endswith("block 4 (layer 0)")  # latest with positions
