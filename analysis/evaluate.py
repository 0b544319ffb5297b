"""Long-video evaluation of every cache policy on the embedded tiny-world model.

    python -m analysis.evaluate --lengths 5 30 120 --out docs/eval

For a fixed held-out set of prompts (`HELDOUT_PROMPTS`, never training captions) and seeds
(>= 1,000,000, never training seeds), generates a video per (length, policy, prompt) and scores it
per 5-second window with `analysis.metrics` (prompted colours from the caption). Writes

* ``OUT/runs.csv``   one row per video (appended as runs finish; ``--resume`` skips done ones),
* ``OUT/table.csv`` and ``OUT/table.md``  mean over prompts per (length, policy): the metrics
  (mean over windows, and in the last window), peak KV bytes, mean per-block time,
* ``OUT/strips/*.png``  a frame strip per video (8 frames evenly spread over its length).

Policies share the same model, prompts and seeds. Budgets (tiny world: 1 latent frame = 64
tokens, 1 block = 256 tokens, 1 compressed block = 8 tokens): `window` keeps 16 latent frames,
`sink_window` 8 sink + 8 window — both attend 1,280 tokens (4 cached blocks + current);
`packforcing` keeps sink 8 + recent 4 frames + top-8 of a 16-block compressed archive: it stores
at most 1,224 tokens (attends 1,088) — i.e. no more KV than the baselines; `deep_sink` (if the
library has it) keeps sink 8 + recent 4 frames + the 64 best mid tokens (the same attended budget
as packforcing). `full` grows without bound.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.metrics import evaluate_video

FPS = 16
METRIC_COLUMNS = ["fidelity", "fidelity_last", "background_similarity", "background_similarity_last",
                  "dynamics", "dynamics_last", "frozen_frac", "jump_ratio",
                  "strict_fidelity", "strict_last_60s", "objects", "stray_fraction"]
TABLE_COLUMNS = ["length_s", "policy", "prompts"] + METRIC_COLUMNS + [
    "peak_kv_tokens", "peak_kv_MB", "s_per_block", "first_block_s", "wall_s"]


GROUND_TRUTH = "ground truth (world generator)"


@dataclass
class PolicySpec:
    label: str
    policy: str
    compressor: str | None = None
    options: dict = field(default_factory=dict)


def policy_specs(quick: bool = False, available=None, trained_hr: bool = True) -> list[PolicySpec]:
    """The compared settings. Frames are latent frames (4 per block). Without a trained HR branch
    (`trained_hr=False`, e.g. the v2 model before its compressor phase) the trained rows are left
    out and the ablations use the LR branch."""
    from packforcing.cache import POLICIES

    available = set(POLICIES) if available is None else set(available)
    if quick:  # 64×64: 16 tokens per latent frame, 2 compressed tokens per block
        sink, window, recent, top_k, archive, n_c = 4, 8, 4, 1, 2, 2
    else:  # 128×128: 64 tokens per latent frame, 8 compressed tokens per block
        sink, window, recent, top_k, archive, n_c = 8, 16, 4, 8, 16, 8
    pf = dict(sink_frames=sink, recent_frames=recent, top_k=top_k, archive_blocks=archive)
    specs = [
        PolicySpec("full", "full"),
        PolicySpec(f"window ({window} frames)", "window", options=dict(window_frames=window)),
        PolicySpec(f"sink_window ({sink}+{window - sink})", "sink_window",
                   options=dict(sink_frames=sink, window_frames=window - sink)),
    ]
    if "deep_sink" in available:
        # same attended budget as packforcing: sink + recent + top_k·N_c kept tokens (+ current)
        specs.append(PolicySpec(f"deep_sink ({sink}+{recent}, keep {top_k * n_c} tok.)", "deep_sink",
                                options=dict(sink_frames=sink, recent_frames=recent, keep_tokens=top_k * n_c)))
    comp = "both" if trained_hr else "lr"
    specs.append(PolicySpec("packforcing zero-shot (LR only)", "packforcing", "lr", dict(pf)))
    if trained_hr:
        specs.append(PolicySpec("packforcing trained (HR+LR)", "packforcing", "both", dict(pf)))
    specs += [
        PolicySpec("  ablation: no RoPE adjustment", "packforcing", comp, dict(pf, rope_adjust=False)),
        PolicySpec("  ablation: FIFO mid (recency)", "packforcing", comp, dict(pf, selection="recency")),
        PolicySpec("  ablation: no sink", "packforcing", comp, dict(pf, sink_frames=0)),
        PolicySpec("  variant: mid_span=single", "packforcing", comp, dict(pf, mid_span="single")),
    ]
    return specs


def quick_pipeline():
    """A random-weight pipeline of the real architecture, small enough for a smoke test (64×64)."""
    import torch
    from diffusers import AutoencoderKLWan

    from packforcing.compressor import Compressor
    from packforcing.configs import TINY
    from packforcing.model import CausalWanTransformer
    from packforcing.pipeline import Pipeline
    from packforcing.training.data import build_text_encoder
    from packforcing.vae import WanVAE, tiny_vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CausalWanTransformer(**dict(TINY, num_attention_heads=2, attention_head_dim=32, ffn_dim=128,
                                                  num_layers=2, text_dim=16))
        vae = WanVAE(AutoencoderKLWan(**tiny_vae_config(4)).eval())
        compressor = Compressor(64, mode="both")
    return Pipeline(transformer, vae, build_text_encoder(16), compressor, 64, 64, name="quick (random weights)")


def heldout_prompts(n: int, offset: int = 0, world: str = "v1") -> list[tuple[str, int]]:
    """(prompt, seed) pairs held out from the training of `world`'s model."""
    if world == "v2":
        from packforcing.training.v2 import EVAL_SEED_BASE_V2 as base, HELDOUT_V2 as prompts
    else:
        from packforcing.training.data import EVAL_SEED_BASE as base, HELDOUT_PROMPTS as prompts
    return [(p, base + i) for i, p in enumerate(prompts)][offset : offset + n]


def model_world(path) -> str:
    """The tiny world a model directory was trained on (its manifest's "world"; v1 before v2 existed)."""
    import json

    from packforcing.tiny_world import MANIFEST

    return json.loads((Path(path) / MANIFEST).read_text()).get("world", "v1")


def run_one(pipe, spec: PolicySpec, prompt: str, seed: int, seconds: float):
    """Generate one video; returns (uint8 video [T,H,W,3], stats dict)."""
    from packforcing.pipeline import to_uint8
    from packforcing.sampler import generate_blocks

    tic = time.perf_counter()
    num_blocks = pipe.num_blocks(seconds)
    cache, compressor = pipe.build_policy(spec.policy, None, spec.compressor, **spec.options)
    text = pipe.encode_prompt(prompt)
    frames, times, peak_tokens, peak_bytes, first = [], [], 0, 0, None
    blocks = generate_blocks(pipe.transformer, text, cache, num_blocks, pipe.latent_hw, pipe.sampler, seed=seed,
                             decoder=pipe.vae.streaming_decoder(), compressor=compressor, vae=pipe.vae)
    for block in blocks:
        if first is None:
            first = time.perf_counter() - tic
        frames.append(to_uint8(block.pixels))
        times.append(block.seconds)
        peak_tokens = max(peak_tokens, cache.kv_tokens())
        peak_bytes = max(peak_bytes, cache.kv_bytes())
    video = np.concatenate(frames)
    return video, dict(blocks=num_blocks, peak_kv_tokens=peak_tokens, peak_kv_MB=peak_bytes / 2**20,
                       s_per_block=float(np.mean(times)), first_block_s=first, wall_s=time.perf_counter() - tic)


def score(video: np.ndarray, prompt: str) -> dict:
    """`analysis.metrics` (per 5 s window) plus the strict object metric (`analysis.objects`, every
    2nd frame): over the whole video and over its last 60 s."""
    from analysis.objects import object_frame_table, object_summary

    _, summary = evaluate_video(video, prompt, fps=FPS, frames_per_block=16)
    objects = object_frame_table(video, prompt, FPS, every=2)
    summary.update(object_summary(objects))
    summary["strict_last_60s"] = object_summary(objects, FPS, last_s=60.0)["strict_fidelity"]
    return {k: summary.get(k, np.nan) for k in METRIC_COLUMNS}


def ground_truth(prompt: str, seed: int, seconds: float, height: int, width: int, world: str = "v1") -> np.ndarray:
    """The world's own video for the prompt (reference row)."""
    from packforcing.world import Scene

    frames = 4 * max(1, round(seconds * FPS / 16)) * 4 - 3
    return Scene.from_caption(prompt, seed, world=world).render(frames, height, width, FPS)


def save_strip(video: np.ndarray, path: Path, count: int = 8) -> Path:
    import imageio.v2 as imageio

    idx = np.linspace(0, len(video) - 1, count).round().astype(int)
    strip = np.concatenate([np.pad(video[i], ((2, 2), (2, 2), (0, 0)), constant_values=255) for i in idx], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, strip)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.strip().lower()).strip("_")[:48]


def summarize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over prompts per (length, policy), in the order the policies were run."""
    order = list(dict.fromkeys(runs["policy"]))
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *METRIC_COLUMNS])))  # older runs.csv: NaN
    agg = {c: "mean" for c in METRIC_COLUMNS + ["peak_kv_MB", "s_per_block", "first_block_s", "wall_s"]}
    agg["peak_kv_tokens"] = "max"
    agg["prompt"] = "nunique"
    table = runs.groupby(["length_s", "policy"], sort=False).agg(agg).reset_index().rename(columns={"prompt": "prompts"})
    table["_o"] = table["policy"].map({p: i for i, p in enumerate(order)})
    table = table.sort_values(["length_s", "_o"]).drop(columns="_o")
    return table[TABLE_COLUMNS].reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    cols = ["policy", "prompts", "strict_fidelity", "strict_last_60s", "stray_fraction", "fidelity", "fidelity_last",
            "background_similarity", "background_similarity_last", "dynamics", "frozen_frac", "jump_ratio",
            "peak_kv_tokens", "peak_kv_MB", "s_per_block"]
    heads = ["policy", "n", "strict", "strict last 60 s", "stray px", "fidelity", "fid. last", "bg sim.", "bg last",
             "dynamics", "frozen", "jump", "peak KV tok.", "peak KV MB", "s/block"]
    out = []
    for length, part in table.groupby("length_s", sort=True):
        out.append(f"\n**{length:g} s** ({int(round(length * FPS / 16))} blocks)\n")
        out.append("| " + " | ".join(heads) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
        for _, r in part.iterrows():
            cells = []
            for c in cols:
                v = r[c]
                if c == "policy":
                    cells.append(str(v).strip())
                elif c in ("prompts", "peak_kv_tokens"):
                    cells.append("–" if pd.isna(v) else f"{int(v)}")
                elif c in ("peak_kv_MB",):
                    cells.append("–" if pd.isna(v) else f"{v:.2f}")
                elif c == "s_per_block":
                    cells.append("–" if pd.isna(v) else f"{v:.2f}")
                else:
                    cells.append("–" if pd.isna(v) else f"{v:.3f}")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out).lstrip("\n") + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=float, nargs="+", default=[5, 30, 120], help="video lengths in seconds")
    p.add_argument("--out", default="docs/eval")
    p.add_argument("--model", default=None, help="tiny-world directory (default: assets/tiny-world)")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts per length (max 6)")
    p.add_argument("--prompts-long", type=int, default=None,
                   help="prompts for lengths >= --long-from (default: --prompts)")
    p.add_argument("--long-from", type=float, default=60.0)
    p.add_argument("--prompt-offset", type=int, default=0, help="skip the first N held-out prompts (to split runs)")
    p.add_argument("--policies", nargs="*", default=None, help="only these labels' policy names (e.g. window)")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/runs.csv")
    p.add_argument("--no-strips", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing", type=float, default=None, metavar="SECONDS",
                   help="only time one video of this length with the app defaults (packforcing, default knobs): "
                        "model load, first-block latency, total wall time -> OUT/timing.json")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="DIR",
                   help="generate nothing: merge DIR/runs.csv of earlier (e.g. parallel) evaluations into OUT")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a small random-weight model at 64×64, one prompt, 4-block videos")
    return p


def main(argv=None) -> int:
    import torch

    from packforcing.pipeline import Pipeline

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        runs = pd.concat([pd.read_csv(Path(d) / "runs.csv") for d in args.from_runs], ignore_index=True)
        runs.to_csv(out / "runs.csv", index=False)
        return _write_table(runs, out)
    if args.timing is not None:
        return _timing(args, out)
    world = "v1"
    if args.quick:
        pipe = quick_pipeline()
        lengths, n_prompts, n_long = [4.0], 1, 1
    else:
        from packforcing.tiny_world import TINY_WORLD_DIR, load_tiny_world

        pipe = load_tiny_world(args.model or TINY_WORLD_DIR)
        world = model_world(args.model or TINY_WORLD_DIR)
        lengths, n_prompts = args.lengths, args.prompts
        n_long = args.prompts_long if args.prompts_long is not None else n_prompts
    pipe.max_seconds = max(pipe.max_seconds, max(lengths))
    specs = policy_specs(args.quick, trained_hr=getattr(pipe.compressor, "hr", None) is not None)
    if args.policies:
        specs = [s for s in specs if s.policy in args.policies or s.label in args.policies]
    runs_path = out / "runs.csv"
    done = set()
    if args.resume and runs_path.exists():
        prev = pd.read_csv(runs_path)
        done = set(zip(prev["length_s"], prev["policy"], prev["prompt"], prev["seed"]))
    elif runs_path.exists():
        runs_path.unlink()
    print(f"model: {pipe.name}; policies: {len(specs)}; lengths: {lengths}", flush=True)
    for seconds in lengths:
        prompts = heldout_prompts(n_long if seconds >= args.long_from else n_prompts, args.prompt_offset, world)
        for prompt, seed in prompts:
            rows = []
            if (float(seconds), GROUND_TRUTH, prompt, seed) not in done:
                gt = ground_truth(prompt, seed, seconds, pipe.height, pipe.width, world)
                rows.append(dict(length_s=float(seconds), policy=GROUND_TRUTH, prompt=prompt,
                                 seed=seed, **score(gt, prompt)))
                if not args.no_strips:
                    save_strip(gt, out / "strips" / f"{seconds:g}s_p{seed - 1_000_000}_{_slug(GROUND_TRUTH)}.png")
            for spec in specs:
                if (float(seconds), spec.label, prompt, seed) in done:
                    continue
                video, stats = run_one(pipe, spec, prompt, seed, seconds)
                row = dict(length_s=float(seconds), policy=spec.label, prompt=prompt, seed=seed, **score(video, prompt),
                           **stats)
                rows.append(row)
                print(f"{seconds:>5g}s | {spec.label:<34} | strict {row['strict_fidelity']:.3f} "
                      f"fid {row['fidelity']:.3f} bg "
                      f"{row['background_similarity']:.3f} dyn {row['dynamics']:.2f} jump {row['jump_ratio']:.2f} | "
                      f"{stats['s_per_block']:.2f} s/block, wall {stats['wall_s']:.0f} s", flush=True)
                if not args.no_strips:
                    save_strip(video, out / "strips" / f"{seconds:g}s_p{seed - 1_000_000}_{_slug(spec.label)}.png")
                _append(runs_path, rows)
                rows = []
            _append(runs_path, rows)
    return _write_table(pd.read_csv(runs_path), out)


def _timing(args, out: Path) -> int:
    """Time one video with the app's defaults, as a visitor would get it."""
    import json

    from packforcing.tiny_world import TINY_WORLD_DIR, load_tiny_world

    tic = time.perf_counter()
    pipe = load_tiny_world(args.model or TINY_WORLD_DIR)
    load_s = time.perf_counter() - tic
    prompt, seed = heldout_prompts(1, world=model_world(args.model or TINY_WORLD_DIR))[0]
    tic = time.perf_counter()
    first, n = None, 0
    for block in pipe.stream(prompt, args.timing, policy="packforcing", seed=seed):
        n += 1
        if first is None:
            first = time.perf_counter() - tic
    total = time.perf_counter() - tic
    result = dict(model=pipe.name, video_seconds=args.timing, blocks=n, load_s=round(load_s, 2),
                  first_block_s=round(first, 2), total_s=round(total, 1), s_per_block=round(total / n, 3),
                  torch_threads=__import__("torch").get_num_threads(), policy="packforcing (default knobs)")
    (out / "timing.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def stack_strips(paths: list[Path], dest: Path, min_rows: int = 1) -> Path | None:
    """The strip PNGs among `paths` that exist, top to bottom in one image at `dest`; nothing is
    written (None) when fewer than `min_rows` exist."""
    import imageio.v2 as imageio

    rows = [imageio.imread(path) for path in paths if path.exists()]
    if len(rows) < min_rows:
        return None
    imageio.imwrite(dest, np.concatenate(rows, axis=0))
    return dest


def compare_strips(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Per (length, prompt): the frame strips of the ground truth and of every policy that is not an
    ablation or variant, top to bottom in run order, as ``OUT/<length>s_p<k>_compare.png`` (strips
    that were not saved are left out; at least two are needed)."""
    labels = [p for p in dict.fromkeys(runs["policy"]) if not str(p).startswith(" ")]
    written = []
    for (length, seed), _ in runs.groupby(["length_s", "seed"], sort=True):
        stem = f"{length:g}s_p{seed - 1_000_000}"
        paths = [out / "strips" / f"{stem}_{_slug(label)}.png" for label in labels]
        if stack_strips(paths, out / f"{stem}_compare.png", min_rows=2):
            written.append(out / f"{stem}_compare.png")
    return written


def _write_table(runs: pd.DataFrame, out: Path) -> int:
    table = summarize_runs(runs)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(to_markdown(table))
    compare_strips(runs, out)
    print((out / "table.md").read_text())
    return 0


def _append(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    df = pd.DataFrame(rows)
    if path.exists():
        prev = pd.read_csv(path)
        df = pd.concat([prev, df], ignore_index=True)
    df.to_csv(path, index=False)


if __name__ == "__main__":
    sys.exit(main())
