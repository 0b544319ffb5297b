"""Short-video probe of a tiny-world model on the v2 held-out prompts, scored with the strict
object metric (`analysis.objects`): what training runs report and what "before/after" rows use.

    python -m analysis.probe --run runs/tiny-world-v2 --seconds 5 --guidance 1 3 --strip docs/eval/probe.png
    python -m analysis.probe --model assets/tiny-world --seconds 5          # an exported model

``--run`` samples the EMA weights of a training run with the cache-free sampler
(`packforcing.training.probe.sample_blocks`, guidance batched); ``--model`` generates with the
exported pipeline (cache policy `full`, the model's own sampler). Held-out prompts and seeds
(>= `EVAL_SEED_BASE_V2`) never occur in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.objects import failure_summary, object_frame_table, object_summary


def run_sampler(run: Path, guidance: float, steps: list[float] | None = None, weights: str = "ema"):
    """A function (prompt, seed, seconds) -> uint8 video from the EMA (or live) weights of a v2 run."""
    import json

    from packforcing import train_v2
    from packforcing.training.probe import sample_blocks
    from packforcing.vae import WanVAE
    from packforcing.video import to_uint8
    from packforcing.world import world_spec

    cfg = train_v2.V2Config.from_dict(json.loads((run / "config.json").read_text()))
    transformer, text, _ = train_v2.load_weights(cfg, run, weights)
    vae = WanVAE(train_v2.final_vae(cfg, run, decoder=True))
    steps = steps or cfg.inference_timesteps()

    world = world_spec(cfg.world)
    latent_hw = (world.height // vae.spatial_ratio, world.width // vae.spatial_ratio)

    def sample(prompt: str, seed: int, seconds: float) -> np.ndarray:
        blocks = max(1, round(seconds))
        emb = text.encode(prompt)
        latents = sample_blocks(transformer, emb, blocks, latent_hw, steps, guidance,
                                generator=torch.Generator().manual_seed(seed))
        return to_uint8(vae.decode(latents))

    return sample


def model_sampler(path: Path):
    from packforcing.tiny_world import load_tiny_world

    pipe = load_tiny_world(path)
    return lambda prompt, seed, seconds: pipe.generate(prompt, seconds=seconds, policy="full", seed=seed)


SEED_STRIDE = 1000  # seed of prompt k, repeat r: EVAL_SEED_BASE_V2 + k + r * SEED_STRIDE


def probe(sample, seconds: float = 5.0, every: int = 2, seeds: int = 1) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """One row per held-out prompt and seed (strict/colour fidelity, objects, stray fraction, and
    `failure_summary`'s breakdown) + the videos. ``seeds`` > 1 repeats every prompt with further
    held-out seeds (prompt-major order)."""
    from packforcing.training.v2 import EVAL_SEED_BASE_V2, HELDOUT_V2

    rows, videos = [], []
    for k, prompt in enumerate(HELDOUT_V2):
        for repeat in range(seeds):
            seed = EVAL_SEED_BASE_V2 + k + repeat * SEED_STRIDE
            video = sample(prompt, seed, seconds)
            table = object_frame_table(video, prompt, every=every)
            rows.append({"prompt": prompt, "seed": seed, **object_summary(table), **failure_summary(table)})
            videos.append(video)
    return pd.DataFrame(rows), videos


def save_strips(videos: list[np.ndarray], path: Path, count: int = 6, size: int = 96) -> Path:
    """One row of `count` evenly spread frames per video, each resized to `size` px (nearest)."""
    import imageio.v2 as imageio

    rows = []
    for video in videos:
        idx = np.linspace(0, len(video) - 1, count).round().astype(int)
        frames = []
        for i in idx:
            f = video[i]
            ys = np.arange(size) * f.shape[0] // size
            xs = np.arange(size) * f.shape[1] // size
            frames.append(np.pad(f[ys][:, xs], ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(frames, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, np.concatenate(rows, axis=0))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.probe", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="v2 training run directory (EMA weights)")
    src.add_argument("--model", type=Path, help="exported tiny-world directory")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="--run only: guidance scales")
    p.add_argument("--weights", choices=("ema", "live"), default="ema", help="--run only: which weights")
    p.add_argument("--seeds", type=int, default=1, help="held-out seeds per prompt (default 1)")
    p.add_argument("--strip", type=Path, default=None, help="PNG of frame strips (one per prompt and seed)")
    p.add_argument("--out", type=Path, default=None, help="CSV of the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tables = []
    settings = [(g, run_sampler(args.run, g, weights=args.weights)) for g in args.guidance] if args.run else [(None, model_sampler(args.model))]
    for guidance, sample in settings:
        table, videos = probe(sample, args.seconds, seeds=args.seeds)
        table.insert(0, "guidance", guidance)
        tables.append(table)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"mean (guidance {guidance}):", table.drop(columns=["prompt", "seed", "guidance"]).mean().round(3).to_dict())
        if args.strip:
            name = args.strip if len(settings) == 1 else args.strip.with_name(f"{args.strip.stem}_g{guidance:g}.png")
            print("strip:", save_strips(videos, name))
    if args.out:
        pd.concat(tables).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
