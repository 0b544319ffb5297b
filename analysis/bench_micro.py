"""Micro-benchmarks: KV path (preallocated vs torch.cat), top-k scoring, LR-branch reuse, VAE decode conv."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from packforcing.devices import synchronize
from packforcing.vae import conv3d_backend


# -- micro-benchmarks --------------------------------------------------------------------------------
def median_seconds(fns: dict, repeat: int, device) -> dict[str, float]:
    """Median wall seconds of each function over ``repeat`` interleaved rounds, after one warm-up."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def micro_kv_path(heads: int, head_dim: int, tokens: int, blocks: int, device=None, dtype=torch.float32,
                  repeat: int = 3) -> dict:
    """One layer's per-block append + attend, over a rollout of ``blocks`` blocks of ``tokens`` tokens.

    ``prealloc_sdpa``: the library's path (K/V written in place into a preallocated buffer, SDPA on a
    view); ``cat_sdpa``: K/V grown by ``torch.cat`` every block; ``prealloc_naive``: the same views
    with attention as matmul–softmax–matmul. Variants alternate, median of ``repeat`` rollouts.
    """
    device = torch.device(device or "cpu")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=gen).to(device, dtype)
    new_k = torch.randn(1, heads, tokens, head_dim, generator=gen).to(device, dtype)
    new_v = torch.randn(1, heads, tokens, head_dim, generator=gen).to(device, dtype)
    scale = 1 / math.sqrt(head_dim)

    def prealloc(naive=False):
        k = torch.empty(1, heads, tokens * blocks, head_dim, device=device, dtype=dtype)
        v = torch.empty_like(k)
        for b in range(blocks):
            k[:, :, b * tokens:(b + 1) * tokens].copy_(new_k)
            v[:, :, b * tokens:(b + 1) * tokens].copy_(new_v)
            kk, vv = k[:, :, :(b + 1) * tokens], v[:, :, :(b + 1) * tokens]
            if naive:
                torch.softmax((q @ kk.transpose(-1, -2)) * scale, dim=-1) @ vv
            else:
                F.scaled_dot_product_attention(q, kk, vv)

    def cat():
        k = v = None
        for _ in range(blocks):
            k = new_k.clone() if k is None else torch.cat([k, new_k], dim=2)
            v = new_v.clone() if v is None else torch.cat([v, new_v], dim=2)
            F.scaled_dot_product_attention(q, k, v)

    variants = {"prealloc_sdpa": prealloc, "cat_sdpa": cat, "prealloc_naive": lambda: prealloc(True)}
    med = median_seconds(variants, repeat, device)
    return {"heads": heads, "head_dim": head_dim, "tokens_per_block": tokens, "blocks": blocks,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            **{f"{k}_s": v for k, v in med.items()},
            "cat_over_prealloc": med["cat_sdpa"] / med["prealloc_sdpa"],
            "naive_over_sdpa": med["prealloc_naive"] / med["prealloc_sdpa"]}


def micro_scoring(layers: int = 2, heads: int = 12, head_dim: int = 128, frame_hw=(30, 52), block_frames: int = 4,
                  latent_hw=(60, 104), dtype=torch.bfloat16, device=None, archive_blocks: int = 24,
                  top_k: int = 16, repeat: int = 5) -> dict:
    """Top-k scoring cost per layer, query subsample (paper: 256) vs all queries, at the given geometry.

    Builds two PackForcing policies (``score_queries`` 256 and all recent + current queries), fills
    their archive with random K/V through the public lifecycle (plan, apply, contexts, commit), then
    times, per layer, (a) the scoring itself (query sample, candidate key sums re-rotated, logits; the
    store's ``_scores``) and (b) the whole first step of a new block (scoring hook + gather +
    re-rotation + ``update``).
    """
    from packforcing.cache import CacheGeometry, make_policy
    from packforcing.compressor import Compressor

    device = torch.device(device or "cpu")
    g = CacheGeometry(layers, heads, head_dim, block_frames, tuple(frame_hw), dtype=dtype, device=device)
    offsets = Compressor.token_centres(block_frames, *latent_hw)[0]
    n_c, T = len(offsets), g.tokens_per_block
    gen = torch.Generator().manual_seed(0)

    def rnd(n):
        return torch.randn(1, n, heads, head_dim, generator=gen).to(device, dtype)

    k, v, q, kc = rnd(T), rnd(T), rnd(T), rnd(n_c)
    fill = 2 + 1 + archive_blocks  # sink + recent + archive
    variants = {"256": 256, "all": 2 * T}
    runs = {}
    for name, n_q in variants.items():
        p = make_policy("packforcing", g, compressed_t_offsets=offsets, archive_blocks=archive_blocks, top_k=top_k,
                        score_queries=n_q)
        store = p.allocate(fill + 2)
        for b in range(fill):  # commit passes only: fill sink, recent and archive
            plan = p.plan(b)
            store.apply(plan)
            ctx = store.context(plan, 0, commit=True)
            for layer in range(layers):
                if ctx.wants_queries:
                    ctx.score(layer, q)
                ctx.update(layer, k, v)
                if plan.compress:
                    ctx.update_compressed(layer, kc, kc)
            store.commit(plan)
            p.commit(plan)
        plan = p.plan(fill)
        store.apply(plan)
        runs[name] = (store, plan)

    def scoring(run):
        store, _ = run
        for layer in range(layers):
            store._scores(layer, q)

    def first_step(run):  # a new selection, as at the first step of a block
        store, plan = run
        ctx = store.context(plan, 0)
        for layer in range(layers):
            ctx.score(layer, q)
            ctx.update(layer, k, v)

    times = {f"{what}_{name}": [] for name in variants for what in ("scoring", "first_step")}
    for fn, what in ((scoring, "scoring"), (first_step, "first_step")):
        for name, run in runs.items():
            fn(run)  # warm-up
        for _ in range(repeat):
            for name, run in runs.items():
                synchronize(device)
                t0 = time.perf_counter()
                fn(run)
                synchronize(device)
                times[f"{what}_{name}"].append(time.perf_counter() - t0)
    med = {k_: float(np.median(v_)) / layers for k_, v_ in times.items()}
    hs = len(range(0, heads, 2))
    out = {"layers_timed": layers, "heads": heads, "head_dim": head_dim, "tokens_per_block": T, "n_c": n_c,
           "archive_blocks": archive_blocks, "top_k": top_k, "dtype": str(dtype).removeprefix("torch."),
           "device": str(device), **{f"{k_}_s_per_layer": v_ for k_, v_ in med.items()},
           "scoring_all_over_256": med["scoring_all"] / med["scoring_256"],
           "scoring_share_of_first_step_256": med["scoring_256"] / med["first_step_256"],
           # pend_q + recent_q (one recent block), float32, per layer
           "query_buffer_bytes_per_layer_256": 4 * 2 * 128 * hs * head_dim,
           "query_buffer_bytes_per_layer_all": 4 * 2 * T * hs * head_dim}
    for store, _ in runs.values():
        store.release()
    return out


def micro_lr_reuse(pipe, repeat: int = 5) -> dict:
    """Compressor on a (non-first) block: LR branch fed the already-decoded pixels vs decoding again."""
    device = pipe.transformer.device
    gen = torch.Generator().manual_seed(0)
    h, w = pipe.latent_hw
    x0 = torch.randn(1, 16, pipe.block_frames, h, w, generator=gen).to(device)
    dec = pipe.vae.streaming_decoder()
    dec.decode_block(x0)  # first block
    pixels = dec.decode_block(x0)  # a full 4·F-frame block
    comp = pipe.compressor if pipe.compressor.mode != "hr" else pipe.compressor_for("lr")
    kw = dict(vae=pipe.vae, patch_embedding=pipe.transformer.patch_embedding, first_block=False)
    with torch.no_grad():
        fns = {"reuse_pixels": lambda: comp(x0, pixels=pixels, **kw),
               "second_decode": lambda: comp(x0, pixels=None, **kw)}
        med = median_seconds(fns, repeat, device)
    return {"compressor_mode": comp.mode, **{f"{k}_s": v for k, v in med.items()},
            "second_decode_over_reuse": med["second_decode"] / med["reuse_pixels"]}


def micro_decode_conv(pipe, repeat: int = 3) -> dict:
    """Streaming decode of one (non-first) block: default convolution backend vs oneDNN (CPU)."""
    device = pipe.transformer.device
    gen = torch.Generator().manual_seed(0)
    h, w = pipe.latent_hw
    x0 = torch.randn(1, 16, pipe.block_frames, h, w, generator=gen).to(device)
    decs = {"default": pipe.vae.streaming_decoder(), "mkldnn": pipe.vae.streaming_decoder()}
    outs = {}
    times = {k: [] for k in decs}
    with torch.no_grad():
        for name, dec in decs.items():
            with conv3d_backend(pipe.vae.vae, onednn=name == "mkldnn"):
                dec.decode_block(x0)
        for _ in range(repeat):
            for name, dec in decs.items():
                with conv3d_backend(pipe.vae.vae, onednn=name == "mkldnn"):
                    t0 = time.perf_counter()
                    outs[name] = dec.decode_block(x0)
                    times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in med.items()}, "default_over_mkldnn": med["default"] / med["mkldnn"],
            "max_abs_diff": float((outs["default"] - outs["mkldnn"]).abs().max()),
            "threads": torch.get_num_threads()}


def run_micro(pipe, preset: str, log=print) -> dict:
    device = pipe.transformer.device
    out = {}
    g = pipe.geometry()
    log("micro: KV append + attend (one layer), preallocated view vs torch.cat, SDPA vs naive")
    dtype = pipe.transformer.dtype
    out["kv_path_preset"] = micro_kv_path(g.num_heads, g.head_dim, g.tokens_per_block, 120 if preset == "tiny" else 8,
                                          device, dtype)
    if preset == "tiny":  # the full-size per-layer head shapes (12 x 128), 520 tokens per block, fp32 on the CPU
        out["kv_path_wan_heads_520"] = micro_kv_path(12, 128, 520, 16, device, torch.float32, repeat=2)
    log("micro: top-k scoring, query subsample vs all queries (full-size per-layer geometry)")
    out["scoring_wan_geometry"] = micro_scoring(device=device, dtype=torch.bfloat16 if device.type == "cuda"
                                                else torch.float32)
    log("micro: LR branch pixel reuse vs second decode")
    out["lr_reuse"] = micro_lr_reuse(pipe)
    if device.type == "cpu":
        log("micro: VAE streaming decode, default conv3d backend vs oneDNN")
        out["decode_conv"] = micro_decode_conv(pipe)
    return out
