"""Benchmark harness: per-block wall time, per-phase time, KV bytes and memory as a video grows.

    python -m analysis.bench --preset tiny --policies packforcing,full --seconds 120 --out docs/bench
    python -m analysis.bench --preset wan-1.3b --policies packforcing,full --seconds 120 --out docs/bench

Presets:

- ``tiny``: the embedded pipeline (`Pipeline.default()`) on the CPU.
- ``wan-1.3b``: the full Wan2.1-T2V-1.3B architecture (30 layers, dim 1536) with RANDOM bf16 weights
  at 832×480, 4-latent-frame blocks, 4 steps + commit, the full-size random-weight
  `AutoencoderKLWan` decoding every block, and (on CUDA) a random-weight UMT5-XXL text encoder that
  is moved off the GPU after encoding. Needs CUDA; on a CPU it refuses unless ``--allow-cpu`` (one
  or two blocks, for smoke tests; ``--layers/--height/--width`` shrink it further).

Policies are specs ``name[:key=value,...]``: options go to the policy (e.g.
``packforcing:score_queries=all`` or ``packforcing:archive_device=cpu``), except ``compile=ffn|block``
(torch.compile of the transformer blocks' FFN + cross-attention, or of the whole blocks, for that run
only), so before/after pairs run in the same process. By default on the CPU the runs are
*interleaved* block by block (run A block 0, run B block 0, run A block 1, …) so that load from other
processes hits every run alike; on CUDA they run one after the other and each gets its own peak
memory (``torch.cuda.max_memory_allocated``). A run whose KV buffers would not fit in the device
memory (estimated with `analysis.estimate` before running) is capped to the blocks that fit, and
ratios are taken over the blocks every run completed.

Timed phases (seconds per block): ``denoise`` (the 4 steps), ``commit`` (clean pass), ``compress``,
``decode`` (streaming VAE), from the sampler's synced timers; ``select`` (top-k scoring) and ``rope``
(temporal re-rotation) as measured by the PackForcing policy — nested *inside* denoise (and
``rope`` partly in ``other`` = block time minus the four timed phases). On CUDA the policy's select/rope
timers are not synchronised (they end on a host sync that may also wait for queued kernels): measure
their true cost by the block-time difference against ``packforcing:selection=recency`` /
``packforcing:rope_adjust=0`` in the same run.

FLOPs per block come from `analysis.estimate.forward_flops` applied to the *measured* number of query
and context tokens of every forward (recorded at layer 0), so the achieved FLOP/s is
``flops / (denoise + commit)``. Generation fps = output pixel frames / wall seconds, decode included.

Outputs in ``--out``: ``<name>_blocks.csv`` (one row per run and block), ``<name>_summary.csv`` (one
row per run) and ``<name>.json`` (both, plus ratios, micro-benchmarks, calibration and the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import estimate as est
from packforcing.vae import conv3d_backend

PHASES = ("denoise", "commit", "compress", "select", "rope", "decode")
RANDOM_WEIGHTS_NOTE = "RANDOM weights (speed/memory benchmark only; the video is noise)"
BLOCK_COLUMNS = [
    "run", "policy", "block", "seconds", "cpu_seconds", "sampler_seconds", *PHASES, "other", "pixel_frames",
    "attended_tokens", "kv_tokens", "kv_bytes", "flops", "attention_flops", "peak_memory_bytes", "rss_bytes",
    "rss_peak_bytes", "finite",
]
SUMMARY_COLUMNS = [
    "run", "policy", "blocks", "total_s", "cpu_total_s", "mean_block_s", "ref_block", "ref_block_s", "last_block_s",
    "last_over_ref", "last_over_ref_median5", "transformer_last_over_ref_median5", "cpu_last_over_ref_median5",
    "load_normalized_last_over_ref_median5",
    *[f"{p}_s" for p in PHASES], "other_s", "overhead_frac", "pixel_frames", "fps", "transformer_fps",
    "max_attended_tokens", "final_kv_bytes", "peak_kv_bytes", "total_flops", "achieved_tflops",
    "overall_tflops", "peak_memory_bytes", "rss_peak_bytes", "estimate_kv_match", "estimate_attended_match",
    "estimate_flops_match", "predicted_s",
]


# -- run specs -----------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One benchmarked configuration: a policy with options (and a compile mode)."""

    label: str
    policy: str
    options: dict = field(default_factory=dict)
    compile: str = "off"


def _value(text: str):
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_runs(text: str) -> list[RunSpec]:
    """``"packforcing,full,packforcing:score_queries=all;compile=ffn"`` -> run specs.

    Runs are separated by commas; a run's options follow a colon, separated by ``;`` (or ``+``).
    """
    runs = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, _, rest = item.partition(":")
        options, mode = {}, "off"
        for kv in [s for s in rest.replace("+", ";").split(";") if s]:
            key, eq, val = kv.partition("=")
            if not eq:
                raise ValueError(f"bad option {kv!r} in run {item!r}: expected key=value")
            if key == "compile":
                if val not in ("off", "ffn", "block"):
                    raise ValueError(f"compile must be off, ffn or block, got {val!r}")
                mode = val
            else:
                options[key.strip()] = _value(val.strip())
        runs.append(RunSpec(item, name.strip(), options, mode))
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate runs in {text!r}")
    if not runs:
        raise ValueError("no policies given")
    return runs


def _resolve_options(spec: RunSpec, pipe) -> dict:
    """Bench-level option values: ``score_queries=all`` = every query of recent + current blocks."""
    options = dict(spec.options)
    if options.get("score_queries") == "all":
        recent = options.get("recent_frames", 4) // pipe.block_frames
        options["score_queries"] = pipe.geometry().tokens_per_block * (1 + recent)
    if "rope_adjust" in options:
        options["rope_adjust"] = bool(options["rope_adjust"])
    return options


# -- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- presets -------------------------------------------------------------------------------------
class StubTextEncoder:
    """Fixed random text embeddings [1, L, text_dim] (20 'prompt' tokens, zero padding like Wan)."""

    def __init__(self, text_dim: int, max_length: int = 512, tokens: int = 20, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        emb = torch.randn(1, max_length, text_dim, generator=gen) * 0.1
        emb[:, tokens:] = 0
        self.emb, self.max_length = emb, max_length

    def encode(self, prompts):
        return self.emb.expand(len(prompts), -1, -1).clone()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


UMT5_XXL = dict(vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0)


def build_umt5_xxl(device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A random-weight UMT5-XXL encoder (Wan2.1's text encoder, 5.7 B parameters) on ``device``."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**{**UMT5_XXL, **overrides})
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = UMT5EncoderModel(cfg)
    return model.eval()


def text_encoder_experiment(device: torch.device, dtype: torch.dtype, text_len: int = 512, offload: bool = True,
                            log=print, **overrides) -> tuple[torch.Tensor, dict]:
    """Encode with a random UMT5-XXL on the device; measure its resident bytes; move it off if ``offload``."""
    info = {"text_encoder": "umt5-xxl (random weights)"}
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    t0 = time.perf_counter()
    model = build_umt5_xxl(device, dtype, **overrides)
    _sync(device)
    info["build_s"] = time.perf_counter() - t0
    resident = (torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()) - before
    info["resident_bytes"] = int(resident)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, text_len), generator=gen).to(device)
    mask = torch.zeros(1, text_len, dtype=torch.long, device=device)
    mask[:, :20] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        emb = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    emb = emb.masked_fill(mask[..., None] == 0, 0.0)
    _sync(device)
    info["encode_s"] = time.perf_counter() - t0
    info["offloaded"] = bool(offload)
    if offload:
        t0 = time.perf_counter()
        model.to("cpu")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        info["offload_s"] = time.perf_counter() - t0
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
        info["freed_bytes"] = int(before + resident - after)
    else:
        info["kept"] = model  # keep it resident for the whole run (the "before" case)
    log(f"text encoder: {info['text_encoder']}, resident {resident / 2**30:.2f} GiB, encode {info['encode_s']:.2f} s,"
        f" {'moved to CPU' if offload else 'kept on the device'}")
    return emb, info


def build_wan(device: torch.device, dtype: torch.dtype = torch.bfloat16, layers: int | None = None,
              height: int = 480, width: int = 832, vae_dtype: torch.dtype | None = None, seed: int = 0):
    """The full Wan2.1-T2V-1.3B architecture with random weights, as a `Pipeline` (text encoder: stub)."""
    from diffusers import AutoencoderKLWan

    from packforcing.compressor import Compressor
    from packforcing.configs import WAN21_T2V_1P3B
    from packforcing.model import CausalWanTransformer
    from packforcing.pipeline import Pipeline
    from packforcing.vae import WanVAE

    cfg = dict(WAN21_T2V_1P3B)
    if layers is not None:
        cfg["num_layers"] = int(layers)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the device (no host copy of 1.4 B params)
        transformer = CausalWanTransformer(**cfg)
        vae_model = AutoencoderKLWan()  # diffusers defaults = the Wan2.1 VAE (127 M params)
        compressor = Compressor(cfg["num_attention_heads"] * cfg["attention_head_dim"], mode="both")
    # as `packforcing.loading` / diffusers' from_pretrained: cast, but keep `_keep_in_fp32_modules` in fp32
    keep = getattr(type(transformer), "_keep_in_fp32_modules", None) or []
    for pname, param in transformer.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if any(m in pname.split(".") for m in keep) else dtype)
    if vae_dtype not in (None, torch.float32):  # the library loads the VAE in float32 by default
        vae_model.to(vae_dtype)
    vae_model.eval()
    compressor.to(dtype)
    text = StubTextEncoder(cfg["text_dim"], 512, seed=seed)
    name = "wan-1.3b (RANDOM weights)" if layers is None else f"wan-1.3b with {layers} layers (RANDOM weights)"
    return Pipeline(transformer, WanVAE(vae_model), text, compressor, height, width, name=name)


# -- one run ---------------------------------------------------------------------------------------
class _CompileSwap:
    """Swaps compiled modules into the shared transformer for one run's blocks, and back."""

    def __init__(self, model, mode: str):
        self.model, self.mode = model, mode
        self.saved = None
        self.compiled = None

    def _build(self):
        if self.mode == "block":
            self.compiled = [torch.compile(b) for b in self.model.blocks]
        else:
            self.compiled = [(torch.compile(b.ffn), torch.compile(b.attn2)) for b in self.model.blocks]

    @contextlib.contextmanager
    def active(self):
        if self.mode == "off":
            yield
            return
        if self.compiled is None:
            self._build()
        blocks = self.model.blocks
        if self.mode == "block":
            saved = list(blocks)
            for i, c in enumerate(self.compiled):
                blocks[i] = c
        else:
            saved = [(b.ffn, b.attn2) for b in blocks]
            for b, (ffn, attn2) in zip(blocks, self.compiled):
                b.ffn, b.attn2 = ffn, attn2
        try:
            yield
        finally:
            if self.mode == "block":
                for i, b in enumerate(saved):
                    blocks[i] = b
            else:
                for b, (ffn, attn2) in zip(blocks, saved):
                    b.ffn, b.attn2 = ffn, attn2


class BlockRun:
    """One policy run as a generator of blocks, with the FLOP hook and the per-block measurements."""

    def __init__(self, pipe, spec: RunSpec, text: torch.Tensor, num_blocks: int, seed: int, model_spec):
        from packforcing.sampler import generate_blocks

        self.pipe, self.spec, self.model_spec = pipe, spec, model_spec
        self.options = _resolve_options(spec, pipe)
        self.policy, compressor = pipe.build_policy(spec.policy, **self.options)
        self.num_blocks = num_blocks
        self.device = pipe.transformer.device
        self.steps = len(pipe.sampler.timesteps)
        self.swap = _CompileSwap(pipe.transformer, spec.compile)
        self.gen = generate_blocks(
            pipe.transformer, text, self.policy, num_blocks, pipe.latent_hw, pipe.sampler, seed=seed,
            decoder=pipe.vae.streaming_decoder(), compressor=compressor, vae=pipe.vae, recorder=None,
        )
        self.rows: list[dict] = []
        self.done = False

    def forwards(self, plan) -> list[tuple[str, int, int]]:
        """(stream, query tokens, attended keys) of every forward of a block, read from its plan:
        ``steps`` denoising forwards and the commit pass, plus the compressed stream when it rides along."""
        T = self.pipe.geometry().tokens_per_block
        out = [("block", T, plan.attend_tokens)] * (self.steps + 1)
        if plan.compress:
            n_c = self.policy.compressed_tokens
            out.append(("compressed", n_c, plan.attend_tokens + n_c))
        return out

    def step(self) -> dict | None:
        if self.done:
            return None
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with self.swap.active():
                result = next(self.gen)
        except StopIteration:
            self.done = True
            return None
        _sync(self.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = self._row(result, seconds, cpu)
        self.rows.append(row)
        if result.index + 1 >= self.num_blocks:
            self.close()
        return row

    def _row(self, result, seconds: float, cpu: float) -> dict:
        spec, ms = self.spec, self.model_spec
        flops = attn = 0
        forwards = self.forwards(result.plan)
        for kind, n_q, ctx in forwards:
            f = est.forward_flops(ms, n_q, ctx, embed=kind == "block")
            flops += sum(f.values())
            attn += f["self_attention"] + f["cross_attention"]
        block_ctx = [c for kind, _, c in forwards if kind == "block"]
        phases = dict(result.phases)  # select / rope included (the store's clock)
        timed = sum(phases.get(p, 0.0) for p in ("denoise", "commit", "compress", "decode"))
        pixels = result.pixels.shape[2] if result.pixels is not None else 0
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {
            "run": spec.label, "policy": spec.policy, "block": result.index, "seconds": seconds, "cpu_seconds": cpu,
            "sampler_seconds": result.seconds, **{p: phases.get(p, 0.0) for p in PHASES},
            "other": max(0.0, seconds - timed), "pixel_frames": pixels,
            "attended_tokens": max(block_ctx) if block_ctx else 0,
            "kv_tokens": self.policy.kv_tokens(), "kv_bytes": self.policy.kv_bytes(),
            "flops": flops, "attention_flops": attn, "peak_memory_bytes": peak,
            "rss_bytes": rss_bytes(), "rss_peak_bytes": rss_peak_bytes(),
            "finite": bool(torch.isfinite(result.latents).all()),
        }

    def close(self):
        self.done = True
        self.gen.close()  # releases the policy's buffers


def _fit_blocks(model_spec, spec: RunSpec, options: dict, num_blocks: int, budget: int) -> int:
    """Largest n <= num_blocks whose preallocated device KV fits ``budget`` bytes (estimated)."""
    def need(n):
        return est.allocated_kv_bytes(model_spec, spec.policy, n, **options)["device"]

    if spec.policy not in est.SUPPORTED_POLICIES or need(num_blocks) <= budget:
        return num_blocks
    lo, hi = 0, num_blocks
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def run_benchmark(pipe, runs: list[RunSpec], num_blocks: int, *, model_spec=None, prompt: str = "a red ball",
                  seed: int = 0, interleave: bool | None = None, warmup: int = 1, text: torch.Tensor | None = None,
                  memory_margin: int = 4 << 30, log=print) -> pd.DataFrame:
    """Run every spec for ``num_blocks`` blocks; one row per (run, block) (see `BLOCK_COLUMNS`)."""
    device = pipe.transformer.device
    model_spec = model_spec or est.spec_from_pipeline(pipe)
    if interleave is None:
        interleave = device.type != "cuda"
    if text is None:
        text = pipe.encode_prompt(prompt)
    if warmup > 0:
        w = BlockRun(pipe, runs[0], text, max(1, min(warmup, num_blocks)), seed, model_spec)
        while w.step() is not None:
            pass
        log(f"warm-up: {len(w.rows)} block(s) of {runs[0].label} ({sum(r['seconds'] for r in w.rows):.2f} s, discarded)")
    budget = available_memory(device) - memory_margin
    lengths = {}
    for spec in runs:
        n = _fit_blocks(model_spec, spec, _resolve_options(spec, pipe), num_blocks, budget)
        if n < num_blocks:
            log(f"{spec.label}: KV buffers for {num_blocks} blocks would not fit ({budget / 2**30:.1f} GiB free "
                f"after a {memory_margin / 2**30:.0f} GiB margin): capped at {n} blocks")
        lengths[spec.label] = n
    rows: list[dict] = []

    def report(row):
        if row["block"] in (0, 9) or (row["block"] + 1) % 10 == 0:
            log(f"  {row['run']:<28} block {row['block'] + 1:>4}: {row['seconds']:7.3f} s  kv {row['kv_bytes'] / 2**20:9.1f} MiB"
                f"  attended {row['attended_tokens']:>8}")

    if interleave:
        active = [BlockRun(pipe, s, text, lengths[s.label], seed, model_spec) for s in runs if lengths[s.label] > 0]
        while active:
            for r in list(active):
                row = r.step()
                if row is None:
                    active.remove(r)
                    continue
                rows.append(row)
                report(row)
                if r.done:
                    active.remove(r)
    else:
        for spec in runs:
            if lengths[spec.label] == 0:
                continue
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            r = BlockRun(pipe, spec, text, lengths[spec.label], seed, model_spec)
            while (row := r.step()) is not None:
                rows.append(row)
                report(row)
    df = pd.DataFrame(rows, columns=BLOCK_COLUMNS)
    if interleave and device.type == "cuda":
        df["peak_memory_bytes"] = np.nan  # shared by all runs: not per run
    return df


# -- summaries -------------------------------------------------------------------------------------
def _median_around(x: np.ndarray, index: int, width: int = 5) -> float:
    lo = max(0, min(index - width // 2, len(x) - width))
    return float(np.median(x[lo: lo + width]))


def _per_decode(g: pd.DataFrame):
    dec = g["decode"].to_numpy(float)
    if len(dec) < 2 or (dec[1:] <= 0).any():
        return None
    ratio = g["seconds"].to_numpy(float) / np.where(dec > 0, dec, np.nan)
    # the first block decodes 1 + 4·(F−1) frames, not 4·F: use the second block's ratio for it
    ratio[0] = ratio[1]
    return ratio


def summarize(blocks: pd.DataFrame, model_spec, ref_block: int = 10, calibration: dict | None = None,
              runs: list[RunSpec] | None = None) -> pd.DataFrame:
    """One row per run (see `SUMMARY_COLUMNS`). ``ref_block`` is 1-based ("block 10")."""
    out = []
    options = {r.label: r.options for r in runs or []}
    for label, g in blocks.groupby("run", sort=False):
        g = g.sort_values("block")
        n = len(g)
        ref = min(ref_block, n) - 1
        sec, cpu = g["seconds"].to_numpy(), g["cpu_seconds"].to_numpy()
        transformer = (g["denoise"] + g["commit"]).to_numpy()
        total = float(sec.sum())
        tr_total = float(transformer.sum())
        row = {
            "run": label, "policy": g["policy"].iloc[0], "blocks": n, "total_s": total,
            "cpu_total_s": float(cpu.sum()), "mean_block_s": float(sec.mean()), "ref_block": ref + 1,
            "ref_block_s": float(sec[ref]), "last_block_s": float(sec[-1]),
            "last_over_ref": float(sec[-1] / sec[ref]),
            "last_over_ref_median5": _median_around(sec, n - 1) / _median_around(sec, ref),
            "transformer_last_over_ref_median5": _median_around(transformer, n - 1) / _median_around(transformer, ref),
            "cpu_last_over_ref_median5": _median_around(cpu, n - 1) / _median_around(cpu, ref),
            # block seconds / decode seconds: decode is the same work every block, so this cancels the
            # momentary speed of a shared machine (NaN without decode)
            "load_normalized_last_over_ref_median5": (
                _median_around(norm, n - 1) / _median_around(norm, ref) if (norm := _per_decode(g)) is not None
                else float("nan")),
            **{f"{p}_s": float(g[p].sum()) for p in PHASES}, "other_s": float(g["other"].sum()),
            "overhead_frac": float((g["compress"] + g["select"] + g["rope"]).sum() / total),
            "pixel_frames": int(g["pixel_frames"].sum()),
            "fps": float(g["pixel_frames"].sum() / total),
            "transformer_fps": float(g["pixel_frames"].sum() / tr_total) if tr_total else float("nan"),
            "max_attended_tokens": int(g["attended_tokens"].max()), "final_kv_bytes": int(g["kv_bytes"].iloc[-1]),
            "peak_kv_bytes": int(g["kv_bytes"].max()), "total_flops": float(g["flops"].sum()),
            "achieved_tflops": float(g["flops"].sum() / tr_total / 1e12) if tr_total else float("nan"),
            "overall_tflops": float(g["flops"].sum() / total / 1e12),
            "peak_memory_bytes": float(g["peak_memory_bytes"].max()) if g["peak_memory_bytes"].notna().any() else np.nan,
            "rss_peak_bytes": int(g["rss_peak_bytes"].max()),
        }
        # the estimator, before running, must predict what was measured
        policy = row["policy"]
        if policy in est.SUPPORTED_POLICIES:
            opts = {k: v for k, v in (options.get(label) or {}).items()}
            if opts.get("score_queries") == "all":
                opts.pop("score_queries")
            e = est.estimate(model_spec, policy, num_blocks=n, calibration=calibration, with_params=False, **opts)
            row["estimate_kv_match"] = bool(list(g["kv_bytes"]) == e["kv_bytes"])
            row["estimate_attended_match"] = bool(list(g["attended_tokens"]) == e["attended_tokens"])
            row["estimate_flops_match"] = bool(np.allclose(g["flops"].to_numpy(float), e["flops"], rtol=1e-9))
            row["predicted_s"] = e["predicted_seconds"]
        out.append(row)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def ratios(blocks: pd.DataFrame, baseline: str = "full") -> list[dict]:
    """Total-time ratios of every run against ``baseline`` (and eager twins), over common blocks."""
    out = []
    labels = list(dict.fromkeys(blocks["run"]))
    base = baseline if baseline in labels else None

    def pair(a, b, what):
        ga, gb = blocks[blocks.run == a], blocks[blocks.run == b]
        n = min(len(ga), len(gb))
        ga, gb = ga.sort_values("block").iloc[:n], gb.sort_values("block").iloc[:n]
        tr_a, tr_b = (ga.denoise + ga.commit).sum(), (gb.denoise + gb.commit).sum()
        out.append({"what": what, "a": a, "b": b, "blocks": n,
                    "total_ratio": float(ga.seconds.sum() / gb.seconds.sum()),
                    "cpu_ratio": float(ga.cpu_seconds.sum() / gb.cpu_seconds.sum()),
                    "transformer_ratio": float(tr_a / tr_b) if tr_b else float("nan")})

    for label in labels:
        if base and label != base:
            pair(label, base, f"{label} / {base}")
    for label in labels:  # "x:...compile=..." vs "x" and other option variants vs their plain policy
        plain = label.split(":", 1)[0]
        if ":" in label and plain in labels and plain != base:
            pair(label, plain, f"{label} / {plain}")
    return out


# -- micro-benchmarks --------------------------------------------------------------------------------
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
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
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
                _sync(device)
                t0 = time.perf_counter()
                fn(run)
                _sync(device)
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
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(repeat):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
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


# -- printing / writing ----------------------------------------------------------------------------
def _fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "n/a"
    b = float(b)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def format_summary(summary: pd.DataFrame, device: torch.device) -> str:
    mem_label = "peak GPU mem" if device.type == "cuda" else "RSS peak (process)"
    head = (f"{'run':<32} {'blocks':>6} {'total s':>9} {'blk ref s':>9} {'blk N s':>8} {'N/ref':>6} {'N/ref med5':>10} "
            f"{'tr N/ref':>8} {'fps':>7} {'TFLOP/s':>8} {'ovh %':>6} {'KV final':>10} {'attended':>9} {mem_label:>18}")
    lines = [head, "-" * len(head)]
    for r in summary.itertuples(index=False):
        mem = r.peak_memory_bytes if device.type == "cuda" else r.rss_peak_bytes
        lines.append(
            f"{r.run:<32} {r.blocks:>6} {r.total_s:>9.2f} {r.ref_block_s:>9.3f} {r.last_block_s:>8.3f} "
            f"{r.last_over_ref:>6.2f} {r.last_over_ref_median5:>10.2f} {r.transformer_last_over_ref_median5:>8.2f} "
            f"{r.fps:>7.2f} {r.achieved_tflops:>8.4f} {100 * r.overhead_frac:>6.2f} {_fmt_bytes(r.final_kv_bytes):>10} "
            f"{r.max_attended_tokens:>9} {_fmt_bytes(mem):>18}")
    return "\n".join(lines)


def format_phases(summary: pd.DataFrame) -> str:
    head = f"{'run':<32} " + " ".join(f"{p + ' s':>10}" for p in (*PHASES, "other")) + f" {'total s':>10}"
    lines = [head, "-" * len(head)]
    for r in summary.to_dict("records"):
        lines.append(f"{r['run']:<32} " + " ".join(f"{r[p + '_s']:>10.2f}" for p in (*PHASES, "other"))
                     + f" {r['total_s']:>10.2f}")
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    lines = [f"{'ratio (same run)':<60} {'blocks':>6} {'wall':>7} {'cpu':>7} {'transformer':>11}"]
    for r in rows:
        lines.append(f"{r['what']:<60} {r['blocks']:>6} {r['total_ratio']:>7.3f} {r['cpu_ratio']:>7.3f} "
                     f"{r['transformer_ratio']:>11.3f}")
    return "\n".join(lines)


def format_per_block(blocks: pd.DataFrame, every: int = 10) -> str:
    pick = blocks[(blocks.block == 0) | ((blocks.block + 1) % every == 0)]
    table = pick.pivot(index="block", columns="run", values="seconds")
    table.index = table.index + 1
    return "per-block wall seconds (block numbers 1-based)\n" + table.to_string(float_format=lambda x: f"{x:.3f}")


def _num(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_report(data: dict, every: int = 20) -> str:
    """Markdown tables (summary, phases, ratios, sampled per-block seconds) from a bench JSON."""
    summary = pd.DataFrame(data["summary"])
    blocks = pd.DataFrame(data["blocks"])
    gpu = "cuda" in str(data.get("device", "")).lower() or "nvidia" in str(data.get("device", "")).lower()
    lines = [f"Device: {data['device']}; torch {data['torch']}, {data['threads']} thread(s); commit `{data['commit']}`; "
             f"{data['date']}; pipeline: {data['pipeline']}; interleaved: {data.get('interleaved')}.", "",
             "| run | blocks | total s | block ref s | block N s | N/ref | N/ref (median of 5) | transformer N/ref "
             "(median of 5) | load-normalized N/ref (median of 5) | fps | TFLOP/s (denoise+commit) | "
             "compress+select+rope % | KV final | attended | " + ("peak GPU memory" if gpu else "process RSS peak") + " |",
             "|" + "---|" * 15]
    for r in summary.to_dict("records"):
        mem = r["peak_memory_bytes"] if gpu else r["rss_peak_bytes"]
        lines.append(
            f"| {r['run']} | {r['blocks']} | {r['total_s']:.1f} | {r['ref_block_s']:.3f} (#{r['ref_block']}) | "
            f"{r['last_block_s']:.3f} | {r['last_over_ref']:.2f} | {r['last_over_ref_median5']:.2f} | "
            f"{r['transformer_last_over_ref_median5']:.2f} | {_num(r.get('load_normalized_last_over_ref_median5'))} | "
            f"{r['fps']:.2f} | {r['achieved_tflops']:.4f} | "
            f"{100 * r['overhead_frac']:.2f} | {_fmt_bytes(r['final_kv_bytes'])} | {r['max_attended_tokens']:,} | "
            f"{_fmt_bytes(mem)} |")
    lines += ["", "| run | " + " | ".join(f"{p} s" for p in (*PHASES, "other")) + " | total s |",
              "|" + "---|" * (len(PHASES) + 3)]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['run']} | " + " | ".join(f"{r[p + '_s']:.2f}" for p in (*PHASES, "other"))
                     + f" | {r['total_s']:.1f} |")
    if data.get("ratios"):
        lines += ["", "| ratio (same run, common blocks) | blocks | wall | CPU time | transformer (denoise+commit) |",
                  "|---|---|---|---|---|"]
        for r in data["ratios"]:
            lines.append(f"| {r['what']} | {r['blocks']} | {r['total_ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                         f"{r['transformer_ratio']:.3f} |")
    pick = blocks[(blocks.block == 0) | ((blocks.block + 1) % every == 0) | (blocks.block == 9)]
    table = pick.pivot(index="block", columns="run", values="seconds")
    runs = list(table.columns)
    lines += ["", "| block | " + " | ".join(f"{r} s" for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for b, row in table.iterrows():
        lines.append(f"| {b + 1} | " + " | ".join(f"{row[r]:.3f}" for r in runs) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def write_outputs(out_dir, name: str, blocks: pd.DataFrame, summary: pd.DataFrame, payload: dict) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}_blocks.csv", out / f"{name}_summary.csv", out / f"{name}.json"]
    blocks.to_csv(paths[0], index=False)
    summary.to_csv(paths[1], index=False)
    data = dict(payload)
    data["summary"] = summary.to_dict("records")
    data["blocks"] = blocks.to_dict("list")
    paths[2].write_text(json.dumps(_jsonable(data), indent=1))
    return paths


# -- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "wan-1.3b"], default="tiny")
    p.add_argument("--policies", default="packforcing,full",
                   help="comma-separated run specs name[:key=value;...] (see the module doc)")
    p.add_argument("--seconds", type=float, default=None, help="video length (default: 120 s on CUDA or tiny, "
                                                                  "one block with --allow-cpu)")
    p.add_argument("--out", default="docs/bench", help="output folder (CSV + JSON)")
    p.add_argument("--name", default=None, help="output file stem (default: <preset>_<seconds>s)")
    p.add_argument("--device", default=None, help="default: cuda for wan-1.3b when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="wan-1.3b weights/KV dtype (default bfloat16)")
    p.add_argument("--vae-dtype", default="float32", choices=["bfloat16", "float32", "float16"],
                   help="wan-1.3b VAE dtype (default float32, as the library loads it)")
    p.add_argument("--allow-cpu", action="store_true", help="wan-1.3b on the CPU: smoke test of <= 2 blocks")
    p.add_argument("--layers", type=int, default=None, help="wan-1.3b: fewer layers (smoke tests; not the preset)")
    p.add_argument("--height", type=int, default=None, help="wan-1.3b: pixel height (default 480)")
    p.add_argument("--width", type=int, default=None, help="wan-1.3b: pixel width (default 832)")
    p.add_argument("--text-encoder", choices=["auto", "stub", "umt5-xxl"], default="auto",
                   help="wan-1.3b: random UMT5-XXL on the device (auto on CUDA) or fixed random embeddings")
    p.add_argument("--keep-text-encoder", action="store_true",
                   help="keep the text encoder on the device during generation (the un-optimised case)")
    p.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                   help="alternate runs block by block (default on the CPU)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false")
    p.add_argument("--warmup", type=int, default=1, help="blocks run and discarded before timing (default 1)")
    p.add_argument("--ref-block", type=int, default=10, help="1-based reference block for ratios (default 10)")
    p.add_argument("--micro", action="store_true", help="also run the micro-benchmarks")
    p.add_argument("--micro-only", action="store_true", help="only the micro-benchmarks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a red ball bouncing on a blue floor")
    p.add_argument("--fast-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: VAE Conv3d through oneDNN (the library default); --no-fast-conv measures ATen's path")
    p.add_argument("--report", default=None, metavar="JSON", help="print markdown tables of a bench JSON and exit")
    return p


def _refuse_cpu(args, num_blocks: int) -> str | None:
    if args.preset != "wan-1.3b":
        return None
    if not args.allow_cpu:
        spec = est.PRESETS["wan-1.3b"]
        per_block = est.estimate(spec, "packforcing", 120, with_params=False)["flops"][-1]
        return (f"the wan-1.3b preset needs a CUDA GPU: one 832x480 block is ~{per_block / 1e12:.0f} TFLOP, hours on a "
                f"CPU. Run it on an H100/H200, or pass --allow-cpu (at most 2 blocks, e.g. --seconds 1, optionally "
                f"with --layers 1 --height 64 --width 64) for a smoke test.")
    if num_blocks > 2:
        return f"--allow-cpu is for smoke tests: at most 2 blocks (asked for {num_blocks}); use --seconds 1 or 2"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.report:
        print(markdown_report(json.loads(Path(args.report).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        runs = parse_runs(args.policies)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    want_cuda = args.preset == "wan-1.3b" and torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if want_cuda else "cpu"))
    if args.seconds is None:
        args.seconds = 1.0 if (args.preset == "wan-1.3b" and device.type != "cuda") else 120.0
    spec0 = est.PRESETS[args.preset]
    num_blocks = spec0.num_blocks(args.seconds)
    if device.type != "cuda":
        msg = _refuse_cpu(args, num_blocks)
        if msg:
            print(f"error: {msg}", file=sys.stderr)
            return 2
    elif args.preset == "tiny":
        log("note: the tiny preset is defined on the CPU; running it on CUDA as asked")

    t_build = time.perf_counter()
    text_info = None
    text = None
    if args.preset == "tiny":
        from packforcing.pipeline import Pipeline

        pipe = Pipeline.default()
        if device.type != "cpu":
            pipe.transformer.to(device)
            pipe.vae.vae.to(device)
            pipe.compressor.to(device)
        log(f"preset tiny: {pipe.name}")
    else:
        dtype = getattr(torch, args.dtype or "bfloat16")
        height, width = args.height or 480, args.width or 832
        log(f"preset wan-1.3b: Wan2.1-T2V-1.3B architecture with {RANDOM_WEIGHTS_NOTE}")
        pipe = build_wan(device, dtype, args.layers, height, width, vae_dtype=getattr(torch, args.vae_dtype),
                         seed=args.seed)
        if args.layers or args.height or args.width:
            log(f"NOTE: shrunk for a smoke test (layers={args.layers or 30}, {width}x{height}): NOT the preset")
        choice = args.text_encoder
        if choice == "auto":
            choice = "umt5-xxl" if device.type == "cuda" else "stub"
        if choice == "umt5-xxl":
            text, text_info = text_encoder_experiment(device, dtype, offload=not args.keep_text_encoder, log=log)
            text = text.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        else:
            text_info = {"text_encoder": "stub (fixed random embeddings, no encoder on the device)"}
    build_s = time.perf_counter() - t_build
    model_spec = est.spec_from_pipeline(pipe, name=args.preset)
    log(f"device: {device_description(device)}; build {build_s:.1f} s; {num_blocks} blocks of "
        f"{model_spec.tokens_per_block} tokens (+{model_spec.compressed_tokens} compressed)")

    name = args.name or f"{args.preset}_{args.seconds:g}s"
    payload = {
        "preset": args.preset, "pipeline": pipe.name, "weights": RANDOM_WEIGHTS_NOTE,
        "command": "python -m analysis.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "device": device_description(device), "cpu": cpu_model(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": args.seconds, "num_blocks": num_blocks,
        "build_s": build_s, "text_encoder": {k: v for k, v in (text_info or {}).items() if k != "kept"},
        "model_spec": {"tokens_per_block": model_spec.tokens_per_block, "n_c": model_spec.compressed_tokens,
                       "bytes_per_token": model_spec.bytes_per_token, "dtype": model_spec.dtype,
                       "layers": model_spec.layers, "dim": model_spec.dim, "height": model_spec.height,
                       "width": model_spec.width},
    }
    if args.micro or args.micro_only:
        payload["micro"] = run_micro(pipe, args.preset, log=log)
        log(json.dumps(_jsonable(payload["micro"]), indent=1))
    if args.micro_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.name or args.preset + '_micro'}.json"
        path.write_text(json.dumps(_jsonable(payload), indent=1))
        log(f"wrote {path}")
        return 0

    payload["fast_conv"] = bool(args.fast_conv)
    conv_ctx = conv3d_backend(pipe.vae.vae, onednn=args.fast_conv)
    if not args.fast_conv:
        log("NOTE: --no-fast-conv: VAE Conv3d on ATen's default CPU path (the library routes it to oneDNN)")
    t0 = time.perf_counter()
    try:
        with conv_ctx:
                blocks = run_benchmark(pipe, runs, num_blocks, model_spec=model_spec, prompt=args.prompt, seed=args.seed,
                                   interleave=args.interleave, warmup=args.warmup, text=text, log=log)
    except ValueError as err:  # bad policy options
        print(f"error: {err}", file=sys.stderr)
        return 2
    payload["bench_wall_s"] = time.perf_counter() - t0
    calibration = est.fit_calibration(blocks["flops"], blocks["seconds"])
    calibration.update(device=device_description(device), preset=args.preset)
    payload["calibration"] = calibration
    summary = summarize(blocks, model_spec, args.ref_block, calibration, runs)
    payload["ratios"] = ratios(blocks)
    payload["interleaved"] = bool(args.interleave if args.interleave is not None else device.type != "cuda")

    log("")
    log(f"== {args.preset}: {pipe.name} on {device_description(device)}, commit {payload['commit']}")
    log(format_summary(summary, device))
    log("")
    log(format_phases(summary))
    log("")
    log(format_ratios(payload["ratios"]))
    log("")
    log(format_per_block(blocks))
    log("")
    log(f"calibration: {calibration['flops_per_second'] / 1e9:.2f} GFLOP/s + {calibration['fixed_seconds_per_block']:.3f}"
        f" s/block (r2 {calibration['r2']:.3f}); estimator matches measured KV bytes: "
        f"{bool(summary['estimate_kv_match'].all())}, attended tokens: {bool(summary['estimate_attended_match'].all())}")
    if args.preset == "wan-1.3b":
        log(f"NOTE: {RANDOM_WEIGHTS_NOTE}")
    for path in write_outputs(args.out, name, blocks, summary, payload):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
