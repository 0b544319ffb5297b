"""What a patch size of 1 would cost: one 20 s video generated with the shipped tiny-world transformer
(patch 1x2x2: 16 tokens per latent frame) and with the same config at patch 1x1x1 (64 tokens per
latent frame, random weights: the cost does not depend on them), side by side, twice each, same VAE,
text encoder, sampler and cache policy (`sink_window`), one torch thread.

    PYTHONPATH=. .venv/bin/python scripts/measure_patch_cost.py

Prints the wall times and their ratio per run (a ratio, since the machine is shared).
"""

from __future__ import annotations

import time

import torch

from packforcing.model import CausalWanTransformer
from packforcing.pipeline import Pipeline
from packforcing.tiny_world import TINY_WORLD_DIR, load_tiny_world

PROMPT = "a red circle bouncing over a navy background"


def main(seconds: float = 20.0, repeats: int = 2) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    shipped = load_tiny_world(TINY_WORLD_DIR)
    transformer = CausalWanTransformer.from_config(shipped.transformer.config, patch_size=(1, 1, 1)).eval()
    patch1 = Pipeline(transformer, shipped.vae, shipped.text_encoder, None,
                      height=shipped.height, width=shipped.width, fps=shipped.fps, sampler=shipped.sampler,
                      name="patch 1 (random weights)")
    times: dict[str, list[float]] = {"patch 2 (shipped)": [], "patch 1": []}
    for _ in range(repeats):
        for name, pipe in zip(times, (shipped, patch1)):
            start = time.perf_counter()
            pipe.generate(PROMPT, seconds=seconds, policy="sink_window", seed=0)
            times[name].append(time.perf_counter() - start)
    print({name: [round(t, 1) for t in ts] for name, ts in times.items()}, "s per", seconds, "s video")
    print("patch 1 / patch 2, per run:", [round(a / b, 2) for a, b in zip(times["patch 1"], times["patch 2 (shipped)"])])
    return times


if __name__ == "__main__":
    main()
