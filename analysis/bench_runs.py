"""Benchmark runs: run specs, one policy run block by block (FLOPs counted through each block's plan), the interleaved harness, per-run summaries and ratios."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from analysis import estimate as est
from packforcing.devices import available_memory, synchronize
from analysis.bench_env import rss_bytes, rss_peak_bytes

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
        synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with self.swap.active():
                result = next(self.gen)
        except StopIteration:
            self.done = True
            return None
        synchronize(self.device)
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
    free = available_memory(device)
    budget = (free if free is not None else 1 << 62) - memory_margin
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
