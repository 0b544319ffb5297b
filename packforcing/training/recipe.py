"""What the two tiny-world training recipes share (`packforcing.train` for world v1,
`packforcing.train_v2` for world v2): the base config (seed, transformer size, the sampler stored
with the model, checkpoint cadence), the seeded builders of the VAE and the transformer, and the
command line: one ``--flag`` per config field, with the run's ``config.json`` written back so a
``--resume`` continues with the same recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyRecipe:
    """Base of the recipe configs. The transformer has ``dim`` = heads × head size, ``layers``
    blocks; ``sample_steps`` (ints in [0, 1000]) warped with ``sample_shift`` are stored with the
    model as its sampler."""

    seed: int = 0
    fps: int = 16
    vae_base_dim: int = 6
    text_dim: int = 64
    text_length: int = 24
    dim: int = 256
    heads: int = 4
    layers: int = 4
    ffn: int = 1024
    sample_steps: tuple[int, ...] = (1000, 750, 500, 250)
    sample_shift: float = 3.0
    bf16: bool = True
    checkpoint_every: int = 25

    def transformer_config(self) -> dict:
        from ..configs import TINY

        return dict(TINY, num_attention_heads=self.heads, attention_head_dim=self.dim // self.heads,
                    ffn_dim=self.ffn, num_layers=self.layers, text_dim=self.text_dim)

    def inference_timesteps(self) -> list[float]:
        from ..sampler import warp_timesteps

        return warp_timesteps(list(self.sample_steps), self.sample_shift)

    @classmethod
    def from_dict(cls, stored: dict):
        """From a run's ``config.json``; unknown keys are ignored, ``sample_steps`` may be a list or
        the comma-separated text older v2 runs stored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in stored.items() if k in names}
        steps = values.get("sample_steps")
        if isinstance(steps, str):
            values["sample_steps"] = tuple(int(s) for s in steps.split(","))
        elif steps is not None:
            values["sample_steps"] = tuple(int(s) for s in steps)
        return cls(**values)


def build_vae(cfg: TinyRecipe):
    """The tiny `AutoencoderKLWan` (16 latent channels), initialised from ``cfg.seed``."""
    from diffusers import AutoencoderKLWan

    from ..vae import tiny_vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKLWan(**tiny_vae_config(cfg.vae_base_dim, 16))


def build_transformer(cfg: TinyRecipe):
    """The `CausalWanTransformer` of ``cfg.transformer_config()``, initialised from ``cfg.seed + 1``."""
    from ..model import CausalWanTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return CausalWanTransformer(**cfg.transformer_config())


def add_config_flags(parser: argparse.ArgumentParser, cls: type[TinyRecipe]) -> None:
    """``--field-name VALUE`` for every field of ``cls`` (default None = the config's value)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif f.name == "sample_steps":
            parser.add_argument(flag, type=int, nargs="+", default=None)
        else:
            kind = {"int": int, "float": float, "str": str, "str | None": str}.get(str(f.type), type(f.default))
            parser.add_argument(flag, type=kind, default=None)


def resolve_config(cls: type[TinyRecipe], args: argparse.Namespace, out: Path) -> TinyRecipe:
    """The run's config: the stored ``OUT/config.json`` on ``--resume`` (else the defaults), with
    the command line's flags on top; written back to ``OUT/config.json``."""
    stored = out / "config.json"
    cfg = cls.from_dict(json.loads(stored.read_text())) if (args.resume and stored.exists()) else cls()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if "sample_steps" in overrides:
        overrides["sample_steps"] = tuple(overrides["sample_steps"])
    cfg = dataclasses.replace(cfg, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return cfg
