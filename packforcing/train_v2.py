"""Training recipe of the second tiny world (`WORLD_V2`): ``python -m packforcing.train_v2 PHASE``.

Phases (each resumable, each lands weights without optimizer state in ``OUT/<phase>/``)::

    vae          AutoencoderKLWan (real architecture, base_dim 16) on full 64x64 frames of random
                 v2 scenes, 9 -> 17 -> 25-frame clips (the causal caches' steady state must decode
                 right), colour- and object-weighted loss, colour anchor.

Every random draw of a step comes from ``(seed, step)``, so ``--resume`` continues bit-identically
(`packforcing.training.loop`). Data are generated on the fly: no fixed clip set. The first v2
recipe is documented in docs/tiny_world.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PHASES = ("vae",)


@dataclass
class V2Config:
    seed: int = 0
    world: str = "v2"
    fps: int = 16
    # VAE
    vae_base_dim: int = 16
    vae_steps: int = 1400
    vae_lr: float = 1e-3
    vae_colour_from: int = 300  # colour-weighted loss + strong colour anchor from this step
    vae_long_from: int = 400  # 17-frame clips (batch 4) from this step
    vae_longer_from: int = 900  # 25-frame clips (batch 2) from this step
    vae_object_weight: float = 2.0
    checkpoint_every: int = 25

    @classmethod
    def from_dict(cls, d: dict) -> "V2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_vae(cfg: V2Config):
    from diffusers import AutoencoderKLWan

    from .vae import tiny_vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKLWan(**tiny_vae_config(cfg.vae_base_dim, 16))


def train_vae(cfg: V2Config, out: Path, resume: bool, progress: bool = True) -> list[float]:
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    from .world import world_spec

    size = world_spec(cfg.world).height
    stage = VAEStage(build_vae(cfg), VAEStageConfig(
        batch=4, frames=9, crop=size, seed=cfg.seed, world=cfg.world, colour_from=cfg.vae_colour_from,
        long_frames=17, long_from=cfg.vae_long_from, longer_frames=25, longer_from=cfg.vae_longer_from,
        longer_batch=2, object_weight=cfg.vae_object_weight))
    loop = LoopConfig(cfg.vae_steps, cfg.vae_lr, warmup=20, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae")
    return run_stage(stage, out / "vae", loop, resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packforcing.train_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--out", default="runs/tiny-world-v2", help="run directory (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(V2Config):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stored = out / "config.json"
    cfg = V2Config.from_dict(json.loads(stored.read_text())) if (args.resume and stored.exists()) else V2Config()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(V2Config)
                 if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    trainers = {"vae": train_vae}
    trainers[args.phase](cfg, out, args.resume, not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
