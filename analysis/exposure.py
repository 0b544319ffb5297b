"""Where does shape fidelity get lost: per block, free rollout vs teacher forcing vs the VAE.

For each held-out v2 prompt and seed, the ground-truth scene of that caption and seed is encoded
with the model's VAE; then, block by block (1 block = 4 latent frames = 1 s at 16 fps):

- ``recon``: the VAE's reconstruction of the ground truth (the ceiling the transformer can reach);
- ``teacher``: block k generated from ground-truth context blocks 0..k−1 (what training shows it);
- ``free``: block k of the model's own rollout (what visitors see).

Scored with the strict object metric (`analysis.objects`). The gap ``teacher − free`` is what the
model's own context costs (exposure bias); ``recon − teacher`` what the transformer cannot draw
even from true context. Cache-free sampler (`training.probe.sample_blocks`), the model's steps,
shift and guidance: the same maths as the `full` cache policy.

    python -m analysis.exposure --model assets/tiny-world --seconds 5 --seeds 4 --out docs/eval/exposure/round4_5s.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.objects import object_frame_table, object_summary

SOURCES = ("recon", "teacher", "free")


def block_scores(video: np.ndarray, prompt: str, blocks: list[int], block_frames: int = 4) -> list[dict]:
    """Strict-metric summary of each listed block of uint8 video [T, H, W, 3]."""
    from packforcing.sampler import block_frame_ranges

    ranges = block_frame_ranges(max(blocks) + 1, block_frames)
    return [{"block": b, **object_summary(object_frame_table(video[ranges[b][0]:ranges[b][1]], prompt))}
            for b in blocks]


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean strict fidelity per block (rows) and source (columns), plus the mean over blocks ≥ 1."""
    wide = table.pivot_table(index="block", columns="source", values="strict_fidelity", aggfunc="mean")
    wide = wide.reindex(columns=[s for s in SOURCES if s in wide.columns])
    later = table[table["block"] >= 1].groupby("source")["strict_fidelity"].mean()
    wide.loc["blocks>=1"] = later.reindex(wide.columns)
    return wide


def exposure_table(model_dir: Path, seconds: float = 5.0, seeds: int = 1) -> pd.DataFrame:
    """One row per (prompt, seed, source, block): strict / colour fidelity, objects, stray pixels."""
    from analysis.probe import SEED_STRIDE
    from packforcing.tiny_world import load_tiny_world
    from packforcing.training.data import to_pixels
    from packforcing.training.probe import sample_blocks
    from packforcing.training.v2 import EVAL_SEED_BASE_V2, HELDOUT_V2
    from packforcing.vae import pixel_frames
    from packforcing.video import to_uint8
    from packforcing.world import Scene, world_spec

    pipe = load_tiny_world(model_dir)
    sampler, vae, world = pipe.sampler, pipe.vae, world_spec("v2")
    steps = sampler.timesteps
    bf, num_blocks = sampler.block_frames, max(2, round(seconds))
    rows = []

    def rollout(text: torch.Tensor, blocks: int, gen: torch.Generator, context=None) -> torch.Tensor:
        return sample_blocks(pipe.transformer, text, blocks, pipe.latent_hw, steps, sampler.guidance_scale, bf, gen,
                             context=context)

    def score(prompt: str, seed: int, source: str, latents: torch.Tensor, blocks: list[int]) -> None:
        rows.extend({"prompt": prompt, "seed": seed, "source": source, **r}
                    for r in block_scores(to_uint8(vae.decode(latents)), prompt, blocks, bf))

    for k, prompt in enumerate(HELDOUT_V2):
        text = pipe.text_encoder.encode(prompt)
        for repeat in range(seeds):
            seed = EVAL_SEED_BASE_V2 + k + repeat * SEED_STRIDE
            frames = Scene.from_caption(prompt, seed=seed, world=world).render(
                pixel_frames(num_blocks * bf), world.height, world.width)
            truth = vae.encode(to_pixels(frames)[None])  # [1, 16, num_blocks·bf, h, w]
            every_block = list(range(num_blocks))
            score(prompt, seed, "recon", truth, every_block)
            score(prompt, seed, "free", rollout(text, num_blocks, torch.Generator().manual_seed(seed)), every_block)
            for block in range(1, num_blocks):  # from ground-truth blocks 0..block-1
                gen = torch.Generator().manual_seed(seed * 100 + block)
                score(prompt, seed, "teacher", rollout(text, 1, gen, truth[:, :, :block * bf]), [block])
            print(f"{prompt} / seed {seed}: done", flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.exposure", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("assets/tiny-world"), help="exported tiny-world directory")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seeds", type=int, default=1, help="held-out seeds per prompt")
    p.add_argument("--out", type=Path, default=None, help="CSV of the per-block rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = exposure_table(args.model, args.seconds, args.seeds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    print(summarise(table).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
