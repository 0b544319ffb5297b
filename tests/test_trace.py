"""TraceRecorder / NullRecorder: tables, dtypes, persistence round trips, overhead."""

import math
import time
import timeit

import numpy as np
import pandas as pd
import pytest

from packforcing.trace import SCHEMA, NullRecorder, TraceRecorder, empty_tables

# Synthetic run shape: 10 blocks of 4 latent frames, 2 layers, 4 denoising steps + commit.
BLOCKS, LAYERS, STEPS, FRAMES, TOKENS_PER_FRAME = 10, 2, 4, 4, 60
SINK_BLOCKS, MID_CAPACITY, TOP_K, MID_TOKENS, BYTES_PER_TOKEN = 2, 4, 2, 8, 4096
META = {"policy": "packforcing", "fps": 16, "block_frames": FRAMES, "steps": STEPS,
        "layers": LAYERS, "top_k": TOP_K, "config": {"sink_blocks": SINK_BLOCKS,
                                                    "mid_capacity": MID_CAPACITY}}


def synthetic_run(blocks: int = BLOCKS, rec: TraceRecorder | None = None, seed: int = 0):
    """Record a realistic PackForcing-like run: sink of 2 blocks, one recent block, a mid
    archive that grows to 4 blocks then stays bounded (FIFO), per-layer top-2 selection,
    RoPE positions packed contiguously from 0, and a timing per phase."""
    rng = np.random.default_rng(seed)
    rec = rec if rec is not None else TraceRecorder(META)
    block_tokens = FRAMES * TOKENS_PER_FRAME
    for b in range(blocks):
        sink = [i for i in range(SINK_BLOCKS) if i < b]
        recent = [b - 1] if b - 1 >= SINK_BLOCKS else []
        archive = list(range(SINK_BLOCKS, b - 1))[-MID_CAPACITY:]
        selected = {}
        for layer in range(LAYERS):
            scores = rng.normal(size=len(archive))
            top = set(np.argsort(-scores)[:TOP_K].tolist())
            selected[layer] = [c for i, c in enumerate(archive) if i in top]
            if archive:
                rec.mid_scores(b, layer, archive, [c * FRAMES for c in archive],
                               [(c + 1) * FRAMES for c in archive], scores,
                               [i in top for i in range(len(archive))])
            chosen = selected[layer]
            if chosen:  # 8 compressed tokens per block on a 2x2x2 grid
                masses = rng.dirichlet(np.ones(MID_TOKENS * len(chosen) + 1))[:-1]
                rec.mid_attention(b, layer, np.repeat(chosen, MID_TOKENS), list(range(MID_TOKENS)) * len(chosen),
                                  [t // 4 for t in range(MID_TOKENS)] * len(chosen),
                                  [t // 2 % 2 for t in range(MID_TOKENS)] * len(chosen),
                                  [t % 2 for t in range(MID_TOKENS)] * len(chosen), masses)
            kept = [("sink", c) for c in sink] + [("mid_selected", c) for c in selected[layer]]
            kept += [("recent", c) for c in recent] + [("current", b)]
            pos = 0
            for region, c in kept:
                span = FRAMES if region != "mid_selected" else FRAMES // 2
                rec.positions(b, layer, region, c, c * FRAMES, (c + 1) * FRAMES, float(c * FRAMES),
                              float(pos))
                pos += span
        for step in range(STEPS + 1):
            for layer in range(LAYERS):
                parts = {"sink": len(sink) * block_tokens, "mid_archive": len(archive) * MID_TOKENS,
                         "mid_selected": len(selected[layer]) * MID_TOKENS,
                         "recent": len(recent) * block_tokens,
                         "current": block_tokens + (MID_TOKENS if step == STEPS else 0)}
                for part, tokens in parts.items():
                    rec.occupancy(b, step, layer, part, tokens, tokens * BYTES_PER_TOKEN)
        if b == 5:
            rec.prompt_switch(b, 4.8, 1, "recache", b, 0.3)
        for _ in range(STEPS):
            rec.phase(b, "denoise", 0.02 + 0.001 * rng.random())
        rec.phase(b, "commit", 0.02)
        rec.phase(b, "compress", 0.005)
        if archive:
            rec.phase(b, "select", 0.001)
        rec.phase(b, "rope", 0.0005)
        rec.phase(b, "decode", 0.03)
        stored = (len(sink) + len(recent) + 1) * block_tokens + len(archive) * MID_TOKENS
        rec.block_done(b, 0.145 + 0.002 * rng.random(), FRAMES, FRAMES * 4 / 16, stored,
                       stored * BYTES_PER_TOKEN * LAYERS, None if b == 0 else 10**9 + b)
    return rec


def assert_tables_equal(a: dict, b: dict):
    assert set(a) == set(b) == set(SCHEMA)
    for name in SCHEMA:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True, obj=name)


def test_empty_tables_have_stable_columns_and_dtypes():
    for tables in (TraceRecorder().tables(), NullRecorder().tables(), empty_tables()):
        assert list(tables) == ["occupancy", "scores", "positions", "timing", "blocks", "mid_attention", "switches"]
        for name, df in tables.items():
            assert df.empty
            assert {c: str(t) for c, t in df.dtypes.items()} == SCHEMA[name]


def test_recorded_tables_shape_dtypes_and_rank():
    t = synthetic_run().tables()
    assert len(t["occupancy"]) == BLOCKS * (STEPS + 1) * LAYERS * 5
    assert len(t["blocks"]) == BLOCKS
    for name, df in t.items():
        assert {c: str(d) for c, d in df.dtypes.items()} == SCHEMA[name]
    # phases accumulate rows, one per call (4 denoise rows per block)
    assert (t["timing"].query("phase == 'denoise'").groupby("block").size() == STEPS).all()
    s = t["scores"]
    for _, g in s.groupby(["block", "layer"]):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1))
        assert g.sort_values("rank")["score"].is_monotonic_decreasing
        assert set(g.loc[g["selected"], "rank"]) == set(range(1, min(TOP_K, len(g)) + 1))
    assert s.groupby(["block", "layer"]).size().max() == MID_CAPACITY  # bounded archive
    assert t["blocks"]["peak_memory_bytes"].isna().tolist() == [True] + [False] * (BLOCKS - 1)


def test_tables_cached_until_next_append():
    rec = synthetic_run(blocks=3)
    first = rec.tables()
    cached = {name: frame for name, (_, frame) in rec._cache.items()}
    rec.tables()
    assert all(rec._cache[name][1] is frame for name, frame in cached.items())
    rec.phase(3, "decode", 0.5)
    after = rec.tables()
    assert rec._cache["timing"][1] is not cached["timing"]
    assert rec._cache["blocks"][1] is cached["blocks"]  # untouched tables stay cached
    assert len(after["timing"]) == len(first["timing"]) + 1
    after["timing"].loc[0, "seconds"] = -1.0  # callers' edits never reach the cache
    assert rec.tables()["timing"].loc[0, "seconds"] != -1.0


@pytest.mark.parametrize("ext", ["parquet", "csv", "json"])
def test_round_trip(tmp_path, ext):
    rec = synthetic_run()
    rec.meta["note"] = 'quotes " and, commas; ünïcode'
    rec.mid_scores(BLOCKS, 0, [2, 3], [8, 12], [12, 16], [float("nan"), 0.1 + 0.2], [False, True])
    path = rec.save(tmp_path / f"trace.{ext}")
    assert path.exists() and path.suffix == f".{ext}"
    loaded = TraceRecorder.load(path)
    assert loaded.meta == rec.meta
    assert_tables_equal(loaded.tables(), rec.tables())
    assert loaded.summary() == rec.summary()


@pytest.mark.parametrize("ext", ["parquet", "csv", "json"])
def test_round_trip_empty(tmp_path, ext):
    rec = TraceRecorder({"policy": "window"})
    loaded = TraceRecorder.load(rec.save(tmp_path / f"empty.{ext}"))
    assert loaded.meta == {"policy": "window"}
    assert_tables_equal(loaded.tables(), rec.tables())


def test_loaded_recorder_keeps_recording(tmp_path):
    rec = synthetic_run(blocks=4)
    loaded = TraceRecorder.load(rec.save(tmp_path / "t.parquet"))
    synthetic_run(blocks=6, rec=rec)
    synthetic_run(blocks=6, rec=loaded)
    assert_tables_equal(loaded.tables(), rec.tables())


def test_unsupported_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        TraceRecorder().save(tmp_path / "trace.xlsx")
    with pytest.raises(ValueError, match="extension"):
        TraceRecorder.load(tmp_path / "trace.txt")


def test_mid_scores_accepts_arrays_and_checks_lengths():
    rec = TraceRecorder()
    rec.mid_scores(5, 1, np.array([2, 3]), (8, 12), [12, 16], np.array([0.5, 0.7]),
                   np.array([False, True]))
    s = rec.tables()["scores"]
    assert s["rank"].tolist() == [2, 1] and s["selected"].tolist() == [False, True]
    with pytest.raises(ValueError, match="unequal"):
        rec.mid_scores(5, 1, [2, 3], [8], [12, 16], [0.5, 0.7], [False, True])


def test_clear_keeps_meta_unless_asked():
    rec = synthetic_run(blocks=2)
    rec.clear()
    assert all(df.empty for df in rec.tables().values()) and rec.meta == META
    rec.clear(meta=True)
    assert rec.meta == {}


def test_summary_numbers():
    rec = synthetic_run()
    s = rec.summary()
    b = rec.tables()["blocks"]
    assert s["policy"] == "packforcing" and s["blocks"] == BLOCKS
    assert s["peak_kv_bytes"] == b["kv_bytes"].max() and s["peak_kv_tokens"] == b["kv_tokens"].max()
    assert math.isclose(s["mean_block_seconds"], b["seconds"].mean())
    assert math.isclose(s["video_seconds"], BLOCKS * 1.0)
    assert abs(s["latency_slope_s_per_block"]) < 1e-3  # flat
    block_tokens = FRAMES * TOKENS_PER_FRAME
    assert s["peak_context_tokens"] == 4 * block_tokens + TOP_K * MID_TOKENS + MID_TOKENS
    assert s["peak_stored_tokens"] == 4 * block_tokens + MID_CAPACITY * MID_TOKENS + MID_TOKENS
    assert s["peak_memory_bytes"] == 10**9 + BLOCKS - 1
    assert s["denoise_seconds"] > 0 and s["decode_seconds"] == pytest.approx(0.3)
    assert NullRecorder().summary()["blocks"] == 0


def test_null_recorder_is_a_noop(tmp_path):
    rec = NullRecorder()
    assert rec.enabled is False and TraceRecorder.enabled is True
    assert rec.occupancy(0, 0, 0, "sink", 1, 2) is None
    assert rec.mid_scores(0, 0, [1], [0], [4], [0.1], [True]) is None
    assert rec.positions(0, 0, "sink", 0, 0, 4, 0.0, 0.0) is None
    assert rec.phase(0, "denoise", 0.1) is None
    assert rec.block_done(0, 1.0, 4, 1.0, 10, 20) is None
    assert rec.clear() is None
    assert_tables_equal(rec.tables(), TraceRecorder().tables())
    loaded = NullRecorder.load(rec.save(tmp_path / "null.json"))
    assert isinstance(loaded, TraceRecorder)
    assert all(df.empty for df in loaded.tables().values())


def test_recorder_overhead_is_measured():
    """Measures (does not assert) the cost per call; run with -s to see it."""
    cands, starts, ends = list(range(16)), list(range(0, 64, 4)), list(range(4, 68, 4))
    scores, sel = [0.5] * 16, [True] * 8 + [False] * 8
    for rec in (TraceRecorder(), NullRecorder()):
        occ = min(timeit.repeat(lambda: rec.occupancy(3, 0, 0, "sink", 1560, 287_539_200),
                                number=5_000, repeat=5)) / 5_000
        mid = min(timeit.repeat(lambda: rec.mid_scores(3, 0, cands, starts, ends, scores, sel),
                                number=1_000, repeat=5)) / 1_000
        t0 = time.perf_counter()
        rows = len(rec.tables()["scores"])
        build = time.perf_counter() - t0
        print(f"\n{type(rec).__name__}: occupancy {occ * 1e9:.0f} ns/call, "
              f"mid_scores(16 candidates) {mid * 1e9:.0f} ns/call, "
              f"tables() {build * 1e3:.1f} ms for {rows} score rows")


def test_new_tables_are_recorded_and_round_trip(tmp_path):
    rec = synthetic_run()
    tables = rec.tables()
    att, sw = tables["mid_attention"], tables["switches"]
    assert len(att) and set(att["token"]) == set(range(MID_TOKENS))
    assert (att.groupby(["block", "layer"])["mass"].sum() < 1).all()  # the rest goes to sink/recent/current
    assert sw.to_dict("records") == [dict(block=5, video_seconds=4.8, prompt_index=1, mode="recache",
                                          recached_blocks=5, seconds=0.3)]
    with pytest.raises(ValueError, match="unequal"):
        rec.mid_attention(1, 0, [2, 2], [0], [0, 0], [0, 0], [0, 0], [0.1, 0.2])


def _write_long(path, frame):
    frame.to_parquet(path, index=False) if path.suffix == ".parquet" else frame.to_csv(path, index=False)


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_foreign_and_damaged_files_get_a_clear_error(tmp_path, ext):
    from packforcing.trace import TraceFormatError, load_tables

    foreign = tmp_path / f"sales.{ext}"
    _write_long(foreign, pd.DataFrame({"region": ["north"], "revenue": [3.5]}))
    with pytest.raises(TraceFormatError, match="not a PackForcing trace"):
        load_tables(foreign)
    damaged = tmp_path / f"cut.{ext}"
    good = synthetic_run().save(tmp_path / f"good.{ext}")
    damaged.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(TraceFormatError):
        load_tables(damaged)
    other = tmp_path / f"other.{ext}"
    _write_long(other, pd.DataFrame({"table": ["meta"], "meta": ['{"format": "someone-else", "meta": {}}']}))
    with pytest.raises(TraceFormatError, match="someone-else"):
        load_tables(other)
    newer = tmp_path / f"newer.{ext}"
    _write_long(newer, pd.DataFrame({"table": ["meta"], "meta": ['{"format": "packforcing-trace", "version": 99}']}))
    with pytest.raises(TraceFormatError, match="version 99"):
        load_tables(newer)
    with pytest.raises(FileNotFoundError):
        load_tables(tmp_path / f"missing.{ext}")


def test_version_1_files_still_load(tmp_path):
    """A trace written before mid_attention / switches (meta row = the meta itself) loads, those empty."""
    from packforcing.trace import load_tables
    from packforcing.trace_io import _long_frame

    rec = synthetic_run()
    tables = rec.tables()
    long = _long_frame(tables, {})
    long = long[~long["table"].isin(["mid_attention", "switches"])].drop(
        columns=["token", "token_t", "token_y", "token_x", "mass", "prompt_index", "mode",
                 "recached_blocks"])
    long.loc[long["table"] == "meta", "meta"] = '{"policy": "packforcing"}'
    path = tmp_path / "v1.parquet"
    long.to_parquet(path, index=False)
    loaded, meta = load_tables(path)
    assert meta == {"policy": "packforcing"}
    assert len(loaded["mid_attention"]) == 0 and len(loaded["switches"]) == 0
    pd.testing.assert_frame_equal(loaded["scores"], tables["scores"])
