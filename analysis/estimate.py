"""Memory and time estimator: what a run will cost, from the config and the length, before running.

``estimate(config, policy, seconds, **options)`` returns a plain dict (JSON-serialisable, for the app)
with, per block: the keys every query attends, the KV tokens/bytes the policy will report after the
block, and the FLOPs of the block (DESIGN §8 model, counted exactly for the attended tokens); and in
total: the KV buffers the policy allocates (device / host), the weights, the FLOPs of the whole video,
the physical-ceiling time at a peak throughput, and a predicted wall time when given a throughput
calibrated from a measurement (`fit_calibration`, or the ``calibration`` block of a bench JSON).

Token accounting (``T`` = patch tokens of one block, ``N_c`` = compressed tokens of one block; block
``b`` is 0-based and ``b`` blocks are committed while it is denoised):

=================  =======================================================================
policy             keys attended by block ``b`` (its own ``T`` included)
=================  =======================================================================
full               ``(1 + b)·T``
window             ``(1 + min(b, W))·T``
sink_window        ``(1 + min(b, S + W))·T``
packforcing        ``(1 + sink + recent)·T + min(top_k, archive)·N_c`` with ``sink = min(b, S)``,
                   ``recent = min(b − sink, R)``, ``archive = min(b − sink − recent, capacity)``
deep_sink          ``(1 + sink + recent)·T + min(C, m·T)`` with ``m = b − sink − recent`` blocks
                   that have left ``recent`` and ``C`` = keep_tokens (default 2·T)
=================  =======================================================================

``kv_tokens[b]`` follows `CachePolicy.kv_tokens` after the commit of block ``b`` (what the sampler
records): the stored history *plus the current-block slot* (and, for packforcing, every compressed
backup and archive entry, and the selected copies in the workspace).

FLOPs of one forward over ``n`` query tokens attending ``c`` keys, ``L`` text tokens, per layer
(``D`` width, ``F`` FFN width; one multiply-add = 2 FLOPs): linear ``2n(4D² + 2D² + 2DF)`` (self q,k,v,o;
cross q,o; FFN), text K/V ``4LD²``, self-attention ``4ncD``, cross-attention ``4nLD``; plus the patch
embedding, output head and text/time embedders once per forward. A block is ``steps`` forwards plus
the commit pass; a compressing policy's commit pass also runs the ``N_c`` compressed tokens through
every layer, attending the context, the block and themselves (DESIGN §3.1 default).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.model_spec import (  # noqa: F401  (re-exported)
    PRESETS, UMT5_XXL_PARAMS, ModelSpec, resolve_spec, spec_from_pipeline,
)

#: DESIGN §8: H100/H200 dense bf16 peak used for the physical ceiling.
PEAK_BF16_FLOPS = 790e12
#: DESIGN §2: Wan2.1-1.3B parameter count used by the paper-style FLOP approximation.
PAPER_PARAMS = 1.3e9

SUPPORTED_POLICIES = ("full", "window", "sink_window", "packforcing", "deep_sink")


# -- FLOP model -------------------------------------------------------------------------------------
def layer_flops(spec: ModelSpec, n_query: int, context: int, text_len: int | None = None) -> dict[str, int]:
    """FLOPs of one transformer layer for ``n_query`` tokens attending ``context`` keys."""
    D, F = spec.dim, spec.model["ffn_dim"]
    L = spec.text_len if text_len is None else text_len
    n = n_query * spec.batch
    return {
        "linear": 2 * n * (6 * D * D + 2 * D * F),
        "text_kv": 2 * L * spec.batch * 2 * D * D,
        "self_attention": 4 * n * context * D,
        "cross_attention": 4 * n * L * D,
    }


def forward_flops(spec: ModelSpec, n_query: int, context: int, *, embed: bool = True) -> dict[str, int]:
    """FLOPs of one forward over all layers. ``embed``: add patch embedding, head, text/time embedders
    (False for the compressed stream, which only runs through the blocks)."""
    per = layer_flops(spec, n_query, context)
    out = {k: v * spec.layers for k, v in per.items()}
    if embed:
        m, D = spec.model, spec.dim
        patch = math.prod(m.get("patch_size", (1, 2, 2)))
        n, L, B = n_query * spec.batch, spec.text_len, spec.batch
        out["linear"] += 2 * n * patch * (m["in_channels"] + m["out_channels"]) * D
        out["text_kv"] += 2 * L * B * (m["text_dim"] * D + D * D)
        out["linear"] += 2 * B * (m["freq_dim"] * D + D * D + 6 * D * D)
    return out


def block_flops(spec: ModelSpec, attended: int, compressed: bool) -> dict[str, int]:
    """FLOPs of one block: ``steps`` denoising forwards + the commit pass (+ compressed stream)."""
    T = spec.tokens_per_block
    total = {k: v * (spec.steps + 1) for k, v in forward_flops(spec, T, attended).items()}
    if compressed:
        n_c = spec.compressed_tokens
        for k, v in forward_flops(spec, n_c, attended + n_c, embed=False).items():
            total[k] += v
    total["total"] = sum(total.values())
    return total


def paper_flops_per_block(attended: int = 27_872, tokens: int = 6_240, params: float = PAPER_PARAMS,
                          dim: int = 1536, layers: int = 30, forwards: int = 5) -> dict[str, float]:
    """DESIGN §8's approximation: linear 2·P·T, self-attention 4·T·A·D·L, per forward."""
    linear = 2 * params * tokens
    attention = 4 * tokens * attended * dim * layers
    return {"linear": linear, "attention": attention, "forward": linear + attention,
            "block": forwards * (linear + attention)}


# -- policy plans ------------------------------------------------------------------------------------
def _build_policy(spec: ModelSpec, policy: str, options: dict):
    """The real policy object (validates options exactly like the library; allocates nothing)."""
    from packforcing.cache import make_policy
    from packforcing.compressor import Compressor

    offsets = Compressor.token_centres(spec.block_frames, *spec.latent_hw)[0]
    return make_policy(policy, spec.geometry(), compressed_t_offsets=offsets, **options)


def block_accounting(spec: ModelSpec, policy: str, options: dict, num_blocks: int) -> dict[str, list]:
    """Run the pure policy over ``num_blocks`` plans (no tensors, no model): per block the attended
    tokens (``plan.attend_tokens``), stored tokens after its commit, and whether it compresses."""
    if policy not in SUPPORTED_POLICIES:
        raise ValueError(f"no estimate for policy {policy!r}; supported: {', '.join(SUPPORTED_POLICIES)}")
    obj = _build_policy(spec, policy, options)
    obj.reset(num_blocks)
    out: dict[str, list] = {"attended": [], "kv_tokens": [], "compresses": []}
    for b in range(num_blocks):
        plan = obj.plan(b)
        obj.commit(plan)
        out["attended"].append(plan.attend_tokens)
        out["compresses"].append(plan.compress)
        out["kv_tokens"].append(obj.kv_tokens())
    return out


def allocated_kv_bytes(spec: ModelSpec, policy: str, num_blocks: int, **options) -> dict[str, int]:
    """Bytes the policy's store preallocates for ``num_blocks``: {"device": ..., "host": ...}.

    The store is built on the meta device (nothing is allocated); buffers the config places in host
    memory (PackForcing's ``archive_device="cpu"``) count as host."""
    if policy not in SUPPORTED_POLICIES:
        raise ValueError(f"no estimate for policy {policy!r}; supported: {', '.join(SUPPORTED_POLICIES)}")
    store = _build_policy(spec, policy, options).allocate(num_blocks, device=torch.device("meta"))
    out = {"device": 0, "host": 0}
    for name, tensor in store.buffers().items():
        out[store.placement(name)] += tensor.numel() * tensor.element_size()
    return out


# -- parameters --------------------------------------------------------------------------------------
def _meta_params(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Exact parameter counts (modules built on the meta device: no memory, ~0.1 s)."""
    from diffusers import AutoencoderKLWan

    from packforcing.compressor import Compressor
    from packforcing.model import CausalWanTransformer

    return {
        "transformer": _meta_params(lambda: CausalWanTransformer(**spec.model)),
        "vae": _meta_params(lambda: AutoencoderKLWan(**(spec.vae or {}))),
        "compressor": _meta_params(lambda: Compressor(spec.dim, mode=spec.compressor_mode)),
        "text_encoder": int(spec.text_encoder_params),
    }


# -- the estimate ------------------------------------------------------------------------------------
def estimate(
    config="wan-1.3b",
    policy: str = "packforcing",
    seconds: float = 120.0,
    *,
    num_blocks: int | None = None,
    calibration: dict | None = None,
    flops_per_second: float | None = None,
    fixed_seconds_per_block: float = 0.0,
    peak_flops: float = PEAK_BF16_FLOPS,
    text_encoder_on_device: bool = False,
    with_params: bool = True,
    **options,
) -> dict:
    """Predict memory and time of one run before running it.

    config: preset name ("tiny", "wan-1.3b"), `ModelSpec`, `Pipeline` or dict. policy/options: as
    `make_policy`. seconds: video length (blocks by the pipeline's rule) unless ``num_blocks``.
    calibration: ``{"flops_per_second", "fixed_seconds_per_block"}`` (see `fit_calibration`), or give
    ``flops_per_second`` / ``fixed_seconds_per_block`` directly; without a throughput the predicted
    times are None (the ceiling at ``peak_flops`` is always given).
    """
    spec = resolve_spec(config)
    options = {k: v for k, v in options.items() if v is not None}
    n = int(num_blocks) if num_blocks is not None else spec.num_blocks(seconds)
    if n <= 0:
        raise ValueError(f"num_blocks must be positive, got {n}")
    accounting = block_accounting(spec, policy, options, n)
    T, n_c, bpt = spec.tokens_per_block, spec.compressed_tokens, spec.bytes_per_token
    attended, kv_tokens = accounting["attended"], accounting["kv_tokens"]
    per_block = [block_flops(spec, a, c) for a, c in zip(attended, accounting["compresses"])]
    flops = [f["total"] for f in per_block]
    breakdown = {k: int(sum(f[k] for f in per_block)) for k in per_block[0] if k != "total"}
    alloc = allocated_kv_bytes(spec, policy, n, **options)

    if calibration:
        flops_per_second = calibration.get("flops_per_second", flops_per_second)
        fixed_seconds_per_block = calibration.get("fixed_seconds_per_block", fixed_seconds_per_block)
    block_seconds = None
    if flops_per_second:
        block_seconds = [fixed_seconds_per_block + f / flops_per_second for f in flops]
    frames = spec.pixel_frames(n)
    total_flops = int(sum(flops))

    out: dict[str, Any] = {
        "preset": spec.name, "policy": policy, "options": options, "seconds": float(seconds),
        "num_blocks": n, "pixel_frames": frames, "video_seconds": frames / spec.fps,
        "tokens_per_block": T, "compressed_tokens_per_block": n_c, "bytes_per_token": bpt,
        "attended_tokens": attended,
        "attended_history_tokens": [a - T for a in attended],
        "kv_tokens": kv_tokens,
        "kv_bytes": [k * bpt for k in kv_tokens],
        "stored_history_tokens": [k - T for k in kv_tokens],
        "flops": flops,
        "flops_breakdown": breakdown,
        "total_flops": total_flops,
        "max_attended_tokens": max(attended),
        "max_attended_history_bytes": (max(attended) - T) * bpt,
        "peak_kv_bytes": max(kv_tokens) * bpt,
        "final_kv_bytes": kv_tokens[-1] * bpt,
        "kv_allocated_bytes": alloc,
        "peak_flops": peak_flops,
        "ceiling_seconds": total_flops / peak_flops,
        "ceiling_fps": frames / (total_flops / peak_flops),
        "flops_per_second": flops_per_second,
        "fixed_seconds_per_block": fixed_seconds_per_block if flops_per_second else None,
        "predicted_block_seconds": block_seconds,
        "predicted_seconds": sum(block_seconds) if block_seconds else None,
        "predicted_fps": frames / sum(block_seconds) if block_seconds else None,
    }
    if with_params:
        params = parameter_counts(spec)
        elem = spec.element_size
        weights = {k: v * elem for k, v in params.items()}
        weights["vae"] = params["vae"] * torch.empty((), dtype=getattr(torch, spec.vae_dtype)).element_size()
        out["params"] = params
        out["weights_bytes"] = weights
        resident = weights["transformer"] + weights["vae"] + weights["compressor"]
        if text_encoder_on_device:
            resident += weights["text_encoder"]
        # Lower bound: weights + KV buffers; activations and the VAE decode working set come on top.
        out["device_memory_lower_bound_bytes"] = resident + alloc["device"]
    return out


def fit_calibration(flops, seconds) -> dict:
    """Least squares ``seconds = fixed + flops / throughput`` over measured blocks.

    Returns ``{"flops_per_second", "fixed_seconds_per_block", "r2", "n"}``; with too little spread in
    ``flops`` (one policy of constant cost) only the mean is fitted (fixed = 0 is not assumed:
    throughput = total flops / total seconds, fixed = 0).
    """
    x = np.asarray(flops, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("need equal, non-empty flops and seconds")
    if len(x) >= 3 and x.std() > 0.05 * max(x.mean(), 1.0):
        slope, intercept = np.polyfit(x, y, 1)
        if slope > 0 and intercept >= 0:
            pred = intercept + slope * x
            ss = float(((y - y.mean()) ** 2).sum())
            r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss else float("nan")
            return {"flops_per_second": float(1.0 / slope), "fixed_seconds_per_block": float(intercept), "r2": r2,
                    "n": int(len(x))}
    return {"flops_per_second": float(x.sum() / y.sum()), "fixed_seconds_per_block": 0.0, "r2": float("nan"),
            "n": int(len(x))}


def load_calibration(path, preset: str | None = None) -> dict | None:
    """The ``calibration`` block of a bench JSON (``python -m analysis.bench --out DIR``)."""
    data = json.loads(Path(path).read_text())
    if preset is not None and data.get("preset") != preset:
        return None
    return data.get("calibration")


def paper_check(spec: ModelSpec | str = "wan-1.3b") -> dict:
    """The DESIGN §2 numbers recomputed from the config (attended, history, bytes)."""
    spec = resolve_spec(spec)
    pf = estimate(spec, "packforcing", 120, with_params=False)
    full = estimate(spec, "full", 120, with_params=False)
    T = spec.tokens_per_block
    return {
        "tokens_per_frame": spec.tokens_per_frame,
        "tokens_per_block": T,
        "compressed_tokens_per_block": spec.compressed_tokens,
        "bytes_per_token": spec.bytes_per_token,
        "attended_tokens": pf["max_attended_tokens"],
        "history_tokens": pf["max_attended_tokens"] - T,
        "history_bytes": pf["max_attended_history_bytes"],
        "full_history_tokens_120s": full["stored_history_tokens"][-1],
        "full_history_bytes_120s": full["stored_history_tokens"][-1] * spec.bytes_per_token,
        "paper_flops_per_block": paper_flops_per_block(pf["max_attended_tokens"], T, dim=spec.dim,
                                                       layers=spec.layers, forwards=spec.steps + 1)["block"],
        "model_flops_per_block_steady": pf["flops"][-1],
    }


def summary_line(est: dict) -> str:
    """One human line for the app: KV, attended, FLOPs, time."""
    gb = 1e9
    text = (f"{est['policy']}: {est['num_blocks']} blocks, attends ≤ {est['max_attended_tokens']:,} tokens, "
            f"KV {est['peak_kv_bytes'] / gb:.2f} GB stored (attended history {est['max_attended_history_bytes'] / gb:.2f} GB), "
            f"{est['total_flops'] / 1e15:.2f} PFLOP")
    if est.get("predicted_seconds"):
        text += f", ≈{est['predicted_seconds']:.0f} s ({est['predicted_fps']:.1f} fps)"
    return text


__all__ = [
    "ModelSpec", "PRESETS", "PEAK_BF16_FLOPS", "estimate", "fit_calibration", "load_calibration", "paper_check",
    "block_flops", "forward_flops", "layer_flops", "paper_flops_per_block", "allocated_kv_bytes", "parameter_counts",
    "resolve_spec", "spec_from_pipeline", "summary_line",
]

