"""The memory/time estimator: paper numbers, and exact agreement with what the policies report."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from analysis import estimate as est
from packforcing.cache import KVBuffer, make_policy
from packforcing.compressor import Compressor

TINY = est.PRESETS["tiny"]
WAN = est.PRESETS["wan-1.3b"]
# a smaller geometry for the policy rollouts: 1 layer, 2 heads, 16x8 latents (128 tokens, 4 compressed)
SMALL = dataclasses.replace(TINY, name="small", model=dict(TINY.model, num_layers=1, num_attention_heads=2), width=64)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- paper numbers (DESIGN §2 and §8) ------------------------------------------------------------
def test_paper_numbers_full_size():
    check = est.paper_check("wan-1.3b")
    assert check["tokens_per_frame"] == 1560
    assert check["tokens_per_block"] == 6240
    assert check["compressed_tokens_per_block"] == 182
    assert check["bytes_per_token"] == 184_320
    assert check["attended_tokens"] == 27_872
    assert check["history_tokens"] == 21_632
    assert check["history_bytes"] == 21_632 * 184_320
    assert abs(check["history_bytes"] - 4e9) < 0.05e9  # ≈ 4 GB
    assert check["full_history_tokens_120s"] == 748_800
    assert abs(check["full_history_bytes_120s"] - 138e9) < 0.5e9  # ≈ 138 GB


def test_flop_model_matches_design_section_8():
    paper = est.paper_flops_per_block()
    assert paper["linear"] == pytest.approx(16e12, rel=0.02)
    assert paper["attention"] == pytest.approx(32e12, rel=0.02)
    assert paper["block"] == pytest.approx(245e12, rel=0.02)
    e = est.estimate("wan-1.3b", "packforcing", 120, with_params=False)
    steady = e["flops"][-1]
    assert steady == pytest.approx(245e12, rel=0.03)  # the exact count agrees with the §8 approximation
    fwd = est.forward_flops(WAN, 6240, 27_872)
    assert fwd["self_attention"] == 4 * 6240 * 27_872 * 1536 * 30
    # the physical ceiling of DESIGN §8: ≈ 0.31 s per block, ≈ 51 fps at 790 TFLOP/s
    assert e["ceiling_seconds"] / e["num_blocks"] == pytest.approx(0.31, abs=0.02)
    assert e["ceiling_fps"] == pytest.approx(51, abs=3)


def test_parameter_counts_and_bytes_per_token():
    params = est.parameter_counts(WAN)
    assert params["transformer"] == 1_418_996_800
    assert params["vae"] == 126_892_531
    assert params["text_encoder"] == 5_680_910_336
    assert WAN.bytes_per_token == 184_320
    from packforcing.embedded import default_pipeline
    from packforcing.pipeline import Pipeline

    pipe = Pipeline.tiny_random()  # the "tiny" preset: the tiny architecture with random weights
    assert est.parameter_counts(TINY)["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert est.estimate(pipe, "full", 5, with_params=False)["kv_bytes"] == \
        est.estimate("tiny", "full", 5, with_params=False)["kv_bytes"]
    for pipe in (pipe, default_pipeline()):  # and whatever the embedded default model is
        spec = est.spec_from_pipeline(pipe)
        assert est.parameter_counts(spec)["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
        assert spec.tokens_per_block == pipe.geometry().tokens_per_block
        assert spec.bytes_per_token == pipe.geometry().bytes_per_token
        grid = pipe.compressor.output_grid(pipe.block_frames, *pipe.latent_hw)  # what the compressor makes
        assert spec.compressed_tokens == grid[0] * grid[1] * grid[2]
    assert TINY.compressed_tokens == 8  # 2x2x2 for the tiny preset's 16x16 latents


def test_full_history_grows_and_packforcing_is_bounded():
    full = est.estimate("wan-1.3b", "full", 120, with_params=False)
    pf = est.estimate("wan-1.3b", "packforcing", 120, with_params=False)
    assert full["attended_tokens"] == [(1 + b) * 6240 for b in range(120)]
    assert full["kv_allocated_bytes"]["device"] == 121 * 6240 * 184_320
    assert max(pf["attended_tokens"]) == 27_872
    assert pf["attended_tokens"][-1] == pf["attended_tokens"][40] == 27_872
    off = est.estimate("wan-1.3b", "packforcing", 120, archive_device="cpu", with_params=False)
    assert off["kv_allocated_bytes"]["host"] == 128 * 182 * 184_320
    assert off["kv_allocated_bytes"]["device"] + off["kv_allocated_bytes"]["host"] == pf["kv_allocated_bytes"]["device"]


# -- exact agreement with the policies -----------------------------------------------------------------
def _rollout(policy, num_blocks: int, n_c: int, steps: int = 1):
    """Drive ``policy`` like the sampler (no model): returns (attended per block, kv_bytes after each)."""
    g = policy.geometry
    gen = torch.Generator().manual_seed(0)

    def rnd(n):
        return torch.randn(g.batch_size, n, g.num_heads, g.head_dim, generator=gen)

    T = g.tokens_per_block
    attended, kv = [], []
    store = policy.allocate(num_blocks)
    for b in range(num_blocks):
        plan = policy.plan(b)
        store.apply(plan)
        seen = set()
        for step in range(steps + 1):
            commit = step == steps
            ctx = store.context(plan, step, commit)
            for layer in range(g.num_layers):
                q = rnd(T)
                if ctx.wants_queries:
                    ctx.score(layer, q)
                keys, _ = ctx.update(layer, rnd(T), rnd(T))
                seen.add(keys.shape[2])
                if commit and policy.needs_compression(b):
                    ctx.update_compressed(layer, rnd(n_c), rnd(n_c))
        assert len(seen) == 1  # every step and layer attends the same number of keys
        attended.append(seen.pop())
        store.commit(plan)
        policy.commit(plan)
        kv.append(policy.kv_bytes())
    return attended, kv


CASES = [
    ("full", {}),
    ("window", {}),
    ("window", {"window_frames": 4}),
    ("sink_window", {}),
    ("sink_window", {"sink_frames": 4, "window_frames": 8}),
    ("packforcing", {}),
    ("packforcing", {"top_k": 3, "archive_blocks": 5}),  # FIFO archive beyond capacity
    ("packforcing", {"recent_frames": 0, "top_k": 2, "archive_blocks": 4}),
    ("packforcing", {"sink_frames": 0, "top_k": 0, "archive_blocks": 3}),
    ("packforcing", {"scope": "shared", "selection": "recency", "top_k": 4}),
    ("deep_sink", {}),
    ("deep_sink", {"sink_frames": 4, "recent_frames": 8, "keep_tokens": 300}),
]


@pytest.mark.parametrize("policy,options", CASES)
def test_estimate_matches_policy_reports_exactly(policy, options):
    n = 24
    spec = SMALL
    offsets = Compressor.token_centres(spec.block_frames, *spec.latent_hw)[0]
    obj = make_policy(policy, spec.geometry(), compressed_t_offsets=offsets, **options)
    attended, kv = _rollout(obj, n, spec.compressed_tokens)
    e = est.estimate(spec, policy, num_blocks=n, with_params=False, **options)
    assert e["attended_tokens"] == attended
    assert e["kv_bytes"] == kv
    assert e["num_blocks"] == n


@pytest.mark.parametrize("policy,options", CASES)
def test_allocated_bytes_match_the_buffers(policy, options):
    n = 12
    spec = SMALL
    offsets = Compressor.token_centres(spec.block_frames, *spec.latent_hw)[0]
    obj = make_policy(policy, spec.geometry(), compressed_t_offsets=offsets, **options)
    store = obj.allocate(n)
    constants = store.CONSTANTS  # small index/position tensors, not buffers
    tensors = [t for k, t in vars(store).items() if isinstance(t, torch.Tensor) and k not in constants]
    tensors += [t for b in vars(store).values() if isinstance(b, KVBuffer) for t in (b.keys, b.values) if t is not None]
    held = sum(t.numel() * t.element_size() for t in tensors)
    alloc = est.allocated_kv_bytes(spec, policy, n, **options)
    assert alloc["device"] + alloc["host"] == held
    assert alloc["host"] == 0  # deep_sink's index tables now live on the device too (no host reads)


def test_estimate_flops_use_the_attended_tokens():
    e = est.estimate("tiny", "packforcing", 20, with_params=False)
    for b, (a, f) in enumerate(zip(e["attended_tokens"], e["flops"])):
        assert f == est.block_flops(TINY, a, compressed=b >= 2)["total"]
    assert e["total_flops"] == sum(e["flops"])
    assert sum(e["flops_breakdown"].values()) == e["total_flops"]


# -- time -----------------------------------------------------------------------------------------
def test_fit_calibration_recovers_throughput_and_fixed_cost():
    rng = np.random.default_rng(0)
    flops = np.linspace(1e9, 5e10, 40)
    seconds = 0.8 + flops / 2e10 + rng.normal(0, 1e-3, 40)
    cal = est.fit_calibration(flops, seconds)
    assert cal["flops_per_second"] == pytest.approx(2e10, rel=0.02)
    assert cal["fixed_seconds_per_block"] == pytest.approx(0.8, abs=0.01)
    assert all(type(v) in (float, int) for v in cal.values())  # plain JSON values
    flat = est.fit_calibration([1e9] * 5, [0.5] * 5)  # no spread: throughput only
    assert flat["fixed_seconds_per_block"] == 0.0 and flat["flops_per_second"] == pytest.approx(2e9)


def test_predicted_time_from_calibration():
    cal = {"flops_per_second": 1e10, "fixed_seconds_per_block": 0.5}
    e = est.estimate("tiny", "full", 10, calibration=cal, with_params=False)
    assert e["predicted_seconds"] == pytest.approx(0.5 * e["num_blocks"] + e["total_flops"] / 1e10)
    assert e["predicted_fps"] == pytest.approx(e["pixel_frames"] / e["predicted_seconds"])
    assert est.estimate("tiny", "full", 10, with_params=False)["predicted_seconds"] is None
    assert "blocks" in est.summary_line(e)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no estimate for policy"):
        est.estimate("tiny", "no_such_policy", 5)
    with pytest.raises(ValueError, match="unknown preset"):
        est.estimate("huge", "full", 5)
    with pytest.raises(ValueError):
        est.estimate("tiny", "packforcing", 5, top_k=-1)
    with pytest.raises(ValueError):
        est.estimate("tiny", "window", 5, window_frames=6)  # not a whole block


def test_estimate_is_json_serialisable_and_has_memory_bound():
    import json

    e = est.estimate("wan-1.3b", "packforcing", 120)
    json.dumps(e)
    assert e["num_blocks"] == 120 and e["pixel_frames"] == 1917
    lower = e["device_memory_lower_bound_bytes"]
    # bf16 transformer and compressor, float32 VAE (as the library loads it), text encoder off the GPU
    assert lower == e["kv_allocated_bytes"]["device"] + 2 * (1_418_996_800 + e["params"]["compressor"]) + 4 * 126_892_531
    assert math.isfinite(lower) and lower < 24e9
