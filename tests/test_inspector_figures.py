"""The mid-token inspector, the heatmap, the walk-through, switch marks, the panels CLI and the replay
loader: properties of what they draw from a trace (synthetic tables, and a real tiny run)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import inspector, teaching
from analysis.figures import cache_occupancy_figure, latency_memory_figure, topk_heatmap_figure
from packforcing.trace import TraceRecorder, empty_tables


@pytest.fixture(scope="module")
def run():
    """A 6-block PackForcing run of the tiny random pipeline (64x64: 2 compressed tokens a block) with a
    prompt switch at block 4: (tables, meta, frames [T, H, W, 3])."""
    import torch

    from packforcing.pipeline import Pipeline
    from packforcing.schedule import PromptSchedule
    from packforcing.video import to_uint8

    torch.set_num_threads(1)
    pipe = Pipeline.tiny_random(height=64, width=64)
    recorder = TraceRecorder()
    schedule = PromptSchedule.from_items(["0: red circle black", "3: blue square white"])
    frames = np.concatenate([to_uint8(b.pixels) for b in pipe.stream(
        schedule, 6, "packforcing", 1, recorder, sink_frames=4, recent_frames=4, top_k=2, compressor_mode="lr",
        prompt_switch="recache")])
    return recorder.tables(), dict(recorder.meta), frames


def test_candidates_are_exactly_the_recorded_ones(run):
    tables, _, _ = run
    scores = tables["scores"]
    block = int(scores["block"].max())
    for layer in (0, None):
        cands = inspector.candidates(tables, block, layer)
        rows = scores[(scores["block"] == block) & ((scores["layer"] == layer) if layer is not None else True)]
        assert sorted(cands["candidate"]) == sorted(rows["candidate"].unique())
        mean = rows.groupby("candidate")["score"].mean()
        assert cands.set_index("candidate")["score"].to_dict() == pytest.approx(mean.to_dict())
        assert sorted(cands["rank"]) == list(range(1, len(cands) + 1))
        if layer is not None:  # per layer: selected as recorded, ranks as recorded
            assert cands.set_index("candidate")["selected"].to_dict() == rows.set_index("candidate")["selected"].to_dict()
            assert cands.set_index("candidate")["rank"].to_dict() == rows.set_index("candidate")["rank"].to_dict()
            attended = cands[cands["selected"]]
            assert attended["position"].notna().all() and cands[~cands["selected"]]["position"].isna().all()


def test_inspector_draws_every_candidate_and_marks_the_selected(run):
    tables, _, frames = run
    block = int(tables["scores"]["block"].max())
    cands = inspector.candidates(tables, block, 0)
    thumbs = {b: frames[0] for b in range(6)}
    fig = inspector.mid_inspector_figure(tables, block, 0, thumbs)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == len(cands)
    frames_drawn = [s for s in fig.layout.shapes if s.line.width == 4]
    assert len(frames_drawn) == int(cands["selected"].sum()) == 2  # top_k = 2
    titles = [a.text for a in fig.layout.annotations]
    for r in cands.itertuples():
        assert f"block {r.candidate} · {'✔ ' if r.selected else ''}#{r.rank}" in titles
    assert "2 of" in fig.layout.title.text


def test_heatmap_z_is_the_recorded_mass_on_the_grid(run):
    tables, meta, _ = run
    att = tables["mid_attention"]
    block = int(att["block"].max())
    source = int(att[(att["block"] == block) & (att["layer"] == 1)]["source_block"].iloc[0])
    fig = inspector.mid_token_heatmap_figure(tables, block, source, layer=1)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == meta["compressed_grid"][0]  # one panel per temporal slice
    rows = att[(att["block"] == block) & (att["layer"] == 1) & (att["source_block"] == source)]
    for t, trace in enumerate(heat):
        expected = rows[rows["token_t"] == t].sort_values(["token_y", "token_x"])["mass"].to_numpy()
        assert np.asarray(trace.z, dtype=float).ravel() == pytest.approx(expected)
    assert f"{rows['mass'].sum():.1%}" in fig.layout.title.text
    unselected = inspector.mid_token_heatmap_figure(tables, block, 10_000, layer=1)
    assert "was not selected" in unselected.layout.annotations[0].text
    assert inspector.busiest_mid_block(tables, block, 1) in set(rows["source_block"]) | set(att["source_block"])


def test_thumbnails_come_from_the_middle_frame_of_each_block(tmp_path, run):
    from packforcing.sampler import block_frame_ranges
    from packforcing.studio.replay import video_thumbnails
    from packforcing.video import write_video

    ranges = block_frame_ranges(4, 4)
    assert ranges == [(0, 13), (13, 29), (29, 45), (45, 61)]
    frames = np.zeros((61, 32, 32, 3), dtype=np.uint8)
    for i in range(61):
        frames[i] = 4 * i  # frame i has value 4·i
    path = write_video(frames, tmp_path / "video.mp4", fps=16, quality=10)
    thumbs = video_thumbnails(path, 4, 4)
    assert sorted(thumbs) == [0, 1, 2, 3]
    for block, (start, end) in enumerate(ranges):
        assert abs(float(thumbs[block].mean()) - 4 * ((start + end - 1) // 2)) < 6  # H.264 rounding


def test_story_tells_the_run_numbers_and_degrades(run):
    tables, meta, _ = run
    block = int(tables["blocks"]["block"].max())
    story = teaching.block_story(tables, meta, block)
    k = int(tables["scores"].query("block == @block").groupby("layer")["selected"].sum().max())
    assert f"the top {k} of the" in story and "2 compressed tokens (a 2×1×1 grid)" in story
    switch_block = int(tables["switches"]["block"].iloc[0])
    told = teaching.block_story(tables, meta, switch_block)
    assert "Prompt switch." in told and "blue square white" in told and "re-cached" in told
    window = {name: df for name, df in tables.items()}
    window["scores"] = window["scores"].iloc[0:0]
    window["mid_attention"] = window["mid_attention"].iloc[0:0]
    assert "No mid candidates" in teaching.block_story(window, {**meta, "policy": "window"}, block)
    assert "not been recorded" in teaching.block_story(empty_tables(), {}, 3)
    evil = teaching.block_story(tables, {**meta, "prompts": [{"prompt": "a"}, {"prompt": "<b>x</b> *y*"}]},
                                switch_block)
    assert "<b>" not in evil and "\\*y\\*" in evil


def test_switch_marks_appear_only_with_switches(run):
    tables, _, _ = run
    for make in (lambda s: cache_occupancy_figure(tables["occupancy"], switches=s),
                 lambda s: topk_heatmap_figure(tables["scores"], switches=s),
                 lambda s: latency_memory_figure(tables["blocks"], tables["timing"], switches=s)):
        marked, plain = make(tables["switches"]), make(None)
        assert [a.text for a in marked.layout.annotations if "prompt 1" in (a.text or "")] == ["prompt 1 (recache)"]
        assert not [a for a in plain.layout.annotations if "prompt" in (a.text or "")]


def test_empty_and_missing_tables_never_raise():
    for tables in (None, {}, empty_tables()):
        assert inspector.mid_inspector_figure(tables, None).layout.annotations
        assert inspector.mid_inspector_figure(tables, 3, 1).layout.annotations
        assert inspector.mid_token_heatmap_figure(tables, 3).layout.annotations
        assert inspector.mid_token_heatmap_figure(tables, 3, 2, 0, {}).layout.annotations


def test_panels_cli_writes_every_panel_and_refuses_a_foreign_file(run, tmp_path, capsys):
    from analysis.panels import main
    from packforcing.trace import save_tables

    tables, meta, _ = run
    trace = save_tables(tables, tmp_path / "trace.parquet", meta)
    assert main([str(trace), "--out", str(tmp_path / "panels"), "--no-png"]) == 0
    names = {p.name for p in (tmp_path / "panels").iterdir()}
    assert {"occupancy.html", "topk.html", "rope.html", "latency.html", "inspector.html", "heatmap.html",
            "story.md", "plotly.min.js"} <= names
    assert "Block 5:" in (tmp_path / "panels" / "story.md").read_text()
    foreign = tmp_path / "sales.parquet"
    pd.DataFrame({"region": ["north"], "revenue": [3.5]}).to_parquet(foreign)
    assert main([str(foreign), "--out", str(tmp_path / "x")]) == 2
    assert "not a PackForcing trace" in capsys.readouterr().err
    assert main([str(trace), "--out", str(tmp_path / "y"), "--block", "99", "--no-png"]) == 2


# ---- replay loader ---------------------------------------------------------------------------------------
def test_replay_refuses_bad_files_with_a_reason(tmp_path, run):
    from packforcing.studio import replay
    from packforcing.trace import save_tables

    tables, meta, _ = run
    trace = save_tables(tables, tmp_path / "trace.parquet", meta)
    cases = {
        "notes.txt": (b"hello", "is not a trace"),
        "empty.json": (json.dumps({"format": "packforcing-trace", "version": 2, "meta": {}, "tables": {}}).encode(),
                       "no finished block"),
        "garbage.parquet": (b"PAR1" + b"\0" * 100, "not a readable Parquet"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(replay.ReplayError, match=message):
            replay.load_replay(tmp_path / name)
    with pytest.raises(replay.ReplayError, match="not an .mp4"):
        replay.load_replay(trace, trace)
    (tmp_path / "fake.mp4").write_bytes(b"\0" * 2048)
    with pytest.raises(replay.ReplayError, match="could not be read as a video"):
        replay.load_replay(trace, tmp_path / "fake.mp4")
    with pytest.raises(replay.ReplayError, match="not there"):
        replay.load_replay(tmp_path / "gone.parquet")


def test_replay_refuses_a_parquet_declaring_too_many_rows(tmp_path, monkeypatch):
    from packforcing.studio import replay

    path = tmp_path / "bomb.parquet"
    pd.DataFrame({"table": ["occupancy"] * 1000, "meta": [None] * 1000}).to_parquet(path)
    monkeypatch.setattr(replay, "MAX_TRACE_ROWS", 999)
    with pytest.raises(replay.ReplayError, match="declares 1,000 rows"):
        replay.load_replay(path)


def test_shipped_examples_are_small_complete_and_made_by_the_shipped_model():
    """Each policy's 2-minute example is there, replays, and matches the embedded model's weights
    (after a model change: `scripts/make_examples.py`)."""
    import importlib.util

    from packforcing.cache import POLICIES
    from packforcing.studio import replay

    spec = importlib.util.spec_from_file_location("make_examples", replay.ROOT / "scripts" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    index = json.loads((replay.EXAMPLES_DIR / "index.json").read_text())
    assert index["model_fingerprint"] == make_examples.model_fingerprint(), "re-run scripts/make_examples.py"
    entries = replay.examples()
    assert {e["policy"] for e in entries} == set(POLICIES)
    assert index["total_bytes"] < 4 * 2**20
    for entry in entries:
        loaded = replay.load_replay(entry["trace_path"], entry["video_path"])
        assert loaded.blocks == 120 and len(loaded.thumbnails) == 120 and entry["seconds"] == 120
    scheduled = replay.load_example("packforcing_schedule")
    assert len(scheduled.tables["switches"]) == 2 and len(scheduled.meta["prompts"]) == 3
