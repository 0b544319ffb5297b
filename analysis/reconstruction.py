"""How much of a tiny-world clip survives the VAE: encode held-out clips, decode them block by block
with the streaming decoder (as the pipeline does), and score the reconstruction with the strict
object metric (`analysis.objects`) next to the ground truth.

    python -m analysis.reconstruction --vae runs/tiny-world-v2/vae_final --world v2 --seconds 10

Prints one row per clip and the mean; ``--out FILE.csv`` keeps the rows. Prompts are the world's
held-out evaluation captions, scenes drawn from seeds >= the evaluation seed base (never trained on).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
import torch

from analysis.objects import object_frame_table, object_summary


def reconstruct(vae, frames: np.ndarray, block_frames: int = 4) -> np.ndarray:
    """uint8 [T, H, W, 3] (T = 1 + 4k) -> its VAE reconstruction, decoded block by block."""
    from packforcing.training.data import to_pixels

    latents = vae.encode(to_pixels(frames)[None])
    decoder = vae.streaming_decoder()
    parts = [decoder.decode_block(latents[:, :, f0:f0 + block_frames])
             for f0 in range(0, latents.shape[2], block_frames)]
    pixels = torch.cat(parts, dim=2)[0]  # [3, T, H, W] in [-1, 1]
    return ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def evaluate_reconstruction(vae, world: str = "v2", seconds: float = 10.0, fps: int = 16,
                            every: int = 2) -> pd.DataFrame:
    """One row per held-out prompt: strict/colour fidelity and stray fraction of the ground truth
    and of its reconstruction."""
    from packforcing.training.v2 import EVAL_SEED_BASE_V2, HELDOUT_V2
    from packforcing.world import Scene, world_spec

    spec = world_spec(world)
    if world != "v2":
        raise ValueError("held-out prompts are defined for the v2 world only")
    frames_n = 4 * int(round(seconds * fps / 4)) + 1
    rows = []
    for k, prompt in enumerate(HELDOUT_V2):
        scene = Scene.from_caption(prompt, seed=EVAL_SEED_BASE_V2 + k, world=spec)
        truth = scene.render(frames_n, spec.height, spec.width, fps)
        recon = reconstruct(vae, truth)
        row = {"prompt": prompt}
        for name, video in (("truth", truth), ("recon", recon)):
            for key, value in object_summary(object_frame_table(video, scene, fps, every=every)).items():
                row[f"{name}_{key}"] = value
        row["recon_mae_levels"] = float(np.abs(recon.astype(np.int16) - truth.astype(np.int16)).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.reconstruction", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="AutoencoderKLWan directory (diffusers layout, with latent stats)")
    p.add_argument("--world", default="v2")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--every", type=int, default=2, help="score every N-th frame")
    p.add_argument("--out", default=None, help="CSV file for the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import AutoencoderKLWan

    from packforcing.vae import WanVAE

    vae = WanVAE(AutoencoderKLWan.from_pretrained(args.vae).eval())
    table = evaluate_reconstruction(vae, args.world, args.seconds, every=args.every)
    pd.set_option("display.width", 200)
    cols = ["prompt", "truth_strict_fidelity", "recon_strict_fidelity", "recon_colour_fidelity",
            "truth_stray_fraction", "recon_stray_fraction", "recon_mae_levels"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("mean:", table[cols[1:]].mean().round(3).to_dict())
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
