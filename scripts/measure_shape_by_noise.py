"""At which noise level does a tiny-world model lose an object's shape? (issue #13, round 5)

    PYTHONPATH=. .venv/bin/python scripts/measure_shape_by_noise.py --model assets/tiny-world --out docs/eval/text_binding/round4_by_noise.csv

SDEdit on first blocks: the ground-truth first block of a one-object scene (the grid of
`measure_text_binding.py`: black and navy backgrounds × allowed colours × 3 shapes × `--seeds`),
encoded by the model's VAE, is noised to σ_start and denoised with the model's own sampler (its
Euler steps below σ_start, its guidance, the caption of the scene). The shape of the largest blob of
the prompted colour in each decoded frame is classed as in `measure_text_binding.py` (best
template, chance 1/3). σ_start = 0 is the VAE reconstruction; σ_start = 1 is plain generation.
Where the score falls from the reconstruction's towards chance is where the model stops keeping
a shape it is shown and has to make one.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from packforcing.training.probe import guided_velocity  # noqa: E402
from scripts.measure_text_binding import BACKGROUNDS_USED, SEED_BASE, best_template, caption  # noqa: E402

SIGMAS = (0.0, 0.3, 0.5, 0.65, 0.8, 0.9, 1.0)


@torch.no_grad()
def sdedit(model, x0: torch.Tensor, text: torch.Tensor, sigma_start: float, timesteps: list[float], guidance: float,
           gen: torch.Generator) -> torch.Tensor:
    """x0 [1, C, F, h, w] noised to sigma_start, then Euler steps t in `timesteps` below it -> 0."""
    x = (1 - sigma_start) * x0 + sigma_start * torch.randn(x0.shape, generator=gen)
    ts = [sigma_start * 1000.0] + [t for t in timesteps if t < sigma_start * 1000.0 - 1e-6] + [0.0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = guided_velocity(model, x, torch.full((1, x.shape[2]), t), text, None, None, guidance)
        x = x + (t_next - t) / 1000.0 * v
    return x


def main(argv=None) -> int:
    from packforcing.tiny_world import load_tiny_world
    from packforcing.training.data import to_pixels
    from packforcing.vae import pixel_frames
    from packforcing.video import to_uint8
    from packforcing.world import Scene, world_spec
    from packforcing.world.palette import colours_for

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("assets/tiny-world"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="CSV of the per-frame rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_tiny_world(args.model)
    world, sampler = world_spec("v2"), pipe.sampler
    frames_px = pixel_frames(sampler.block_frames)
    rows = []
    for bg, k, colour, shape in itertools.product(BACKGROUNDS_USED, range(args.seeds), world.colours, world.shapes):
        if colour not in colours_for(bg):
            continue
        seed = SEED_BASE + k
        prompt = caption(colour, shape, bg)
        truth = Scene.from_caption(prompt, seed=seed, world=world).render(frames_px, world.height, world.width)
        x0 = pipe.vae.encode(to_pixels(truth)[None])
        text = pipe.text_encoder.encode(prompt)
        for sigma in SIGMAS:
            gen = torch.Generator().manual_seed(seed)
            z = sdedit(pipe.transformer, x0, text, sigma, sampler.timesteps, sampler.guidance_scale, gen)
            video = to_uint8(pipe.vae.decode(z))
            for f in range(0, len(video), 2):
                rows.append(dict(sigma_start=sigma, background=bg, seed=seed, colour=colour, shape=shape, frame=f,
                                 best=best_template(np.asarray(video[f]), colour, bg) or "none"))
    table = pd.DataFrame(rows)
    table["right"] = table["shape"] == table["best"]
    summary = table.pivot_table(index="sigma_start", columns="shape", values="right", aggfunc="mean")
    summary["all"] = table.groupby("sigma_start")["right"].mean()
    print(f"shape right (best template = prompted shape), share of frames; chance 1/3\n{summary.round(3)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        summary.round(3).to_csv(args.out.with_name(args.out.stem + "_summary.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
