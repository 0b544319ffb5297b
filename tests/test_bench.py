"""The benchmark harness: run specs, a short tiny run end to end, summaries, micro-benchmarks, refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analysis import bench
from analysis import estimate as est


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_pipe():
    from packforcing.pipeline import Pipeline

    return Pipeline.tiny_random(height=64, width=64)  # 64 tokens per block, 2 compressed


def test_parse_runs():
    runs = bench.parse_runs("packforcing, full,packforcing:score_queries=all;compile=ffn,window:window_frames=8")
    assert [r.policy for r in runs] == ["packforcing", "full", "packforcing", "window"]
    assert runs[2].options == {"score_queries": "all"} and runs[2].compile == "ffn"
    assert runs[3].options == {"window_frames": 8}
    assert bench.parse_runs("packforcing:archive_device=cpu+rope_adjust=false")[0].options == {
        "archive_device": "cpu", "rope_adjust": False}
    for bad in ("", "full,full", "packforcing:top_k", "packforcing:compile=max"):
        with pytest.raises(ValueError):
            bench.parse_runs(bad)


def test_short_run_columns_and_estimator_agreement(small_pipe):
    runs = bench.parse_runs("packforcing:sink_frames=4;top_k=1;archive_blocks=2,full")
    blocks = bench.run_benchmark(small_pipe, runs, 4, warmup=0, log=lambda *a: None)
    assert list(blocks.columns) == bench.BLOCK_COLUMNS
    assert len(blocks) == 8 and blocks.groupby("run").size().tolist() == [4, 4]
    assert (blocks["seconds"] > 0).all() and blocks["finite"].all()
    assert blocks["peak_memory_bytes"].isna().all()  # CPU: no device peak, RSS instead
    assert (blocks["rss_peak_bytes"] > 0).all()
    pf = blocks[blocks.policy == "packforcing"]
    assert (pf["compress"].iloc[1:] > 0).all() and pf["compress"].iloc[0] == 0  # 1 sink block
    assert (blocks[blocks.policy == "full"]["compress"] == 0).all()
    assert blocks["pixel_frames"].tolist()[:2] == [13, 13] and set(blocks["pixel_frames"].iloc[2:]) == {16}
    assert pf["attended_tokens"].tolist() == [64, 128, 192, 192 + 2]  # sink, +recent, +recent, +1 selected mid

    spec = est.spec_from_pipeline(small_pipe)
    summary = bench.summarize(blocks, spec, ref_block=2, runs=runs)
    assert list(summary.columns) == bench.SUMMARY_COLUMNS
    # the estimator (before running) predicts the measured KV bytes, attended tokens and FLOPs exactly
    assert summary["estimate_kv_match"].all()
    assert summary["estimate_attended_match"].all()
    assert summary["estimate_flops_match"].all()
    full = summary.set_index("policy").loc["full"]
    assert full["max_attended_tokens"] == 4 * 64
    assert full["fps"] == pytest.approx(full["pixel_frames"] / full["total_s"])
    rows = bench.ratios(blocks)
    assert [r["what"] for r in rows] == [f"{runs[0].label} / full"]
    assert all(r["blocks"] == 4 and r["total_ratio"] > 0 for r in rows)
    assert "block" in bench.format_per_block(blocks, every=2)
    assert "packforcing" in bench.format_summary(summary, torch.device("cpu"))
    assert "decode" in bench.format_phases(summary)


def test_cli_writes_csv_and_json(tmp_path):
    code = bench.main(["--preset", "tiny", "--policies", "packforcing,full", "--seconds", "1", "--warmup", "0",
                       "--out", str(tmp_path), "--name", "t", "--ref-block", "1"])
    assert code == 0
    blocks = pd.read_csv(tmp_path / "t_blocks.csv")
    summary = pd.read_csv(tmp_path / "t_summary.csv")
    assert list(blocks.columns) == bench.BLOCK_COLUMNS and len(blocks) == 2
    assert list(summary.columns) == bench.SUMMARY_COLUMNS
    data = json.loads((tmp_path / "t.json").read_text())
    for key in ("command", "date", "commit", "device", "cpu", "calibration", "ratios", "summary", "blocks"):
        assert key in data
    assert data["ratios"][0]["what"] == "packforcing / full"


def test_wan_preset_refuses_cpu(capsys):
    assert bench.main(["--preset", "wan-1.3b", "--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert bench.main(["--preset", "wan-1.3b", "--device", "cpu", "--allow-cpu", "--seconds", "10"]) == 2
    assert "at most 2 blocks" in capsys.readouterr().err


def test_memory_cap_uses_the_estimator(small_pipe):
    spec = est.spec_from_pipeline(small_pipe)
    full = bench.RunSpec("full", "full")
    per = est.allocated_kv_bytes(spec, "full", 10)["device"]
    assert bench._fit_blocks(spec, full, {}, 10, per) == 10
    assert bench._fit_blocks(spec, full, {}, 10, per - 1) == 9
    pf = bench.RunSpec("packforcing", "packforcing")
    assert bench._fit_blocks(spec, pf, {}, 1000, 1 << 40) == 1000


def test_micro_benchmarks_small():
    kv = bench.micro_kv_path(2, 16, 32, 6, repeat=1)
    assert kv["cat_over_prealloc"] > 0 and kv["naive_over_sdpa"] > 0
    sc = bench.micro_scoring(layers=1, heads=4, head_dim=32, frame_hw=(8, 8), latent_hw=(16, 16),
                             dtype=torch.float32, archive_blocks=4, top_k=2, repeat=1)
    assert sc["scoring_256_s_per_layer"] > 0 and sc["first_step_all_s_per_layer"] > 0
    assert sc["n_c"] == 8 and sc["tokens_per_block"] == 256
    assert sc["query_buffer_bytes_per_layer_all"] > sc["query_buffer_bytes_per_layer_256"]


def test_text_encoder_experiment_small():
    small = dict(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    emb, info = bench.text_encoder_experiment(torch.device("cpu"), torch.float32, text_len=24, log=lambda *a: None,
                                              **small)
    assert emb.shape == (1, 24, 16) and (emb[:, 20:] == 0).all()
    assert info["offloaded"] and "encode_s" in info
    _, kept = bench.text_encoder_experiment(torch.device("cpu"), torch.float32, text_len=24, offload=False,
                                            log=lambda *a: None, **small)
    assert "kept" in kept
