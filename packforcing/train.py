"""Train the embedded tiny-world model from scratch on the CPU.

    python -m packforcing.train all --out runs/tiny-world --export assets/tiny-world

Stages (each resumable with ``--resume``; ``all`` runs them in this order and skips finished ones;
`scripts/train_tiny_world.sh` is the exact sequence behind the shipped weights):

1. ``vae``: a tiny `AutoencoderKLWan` on random 64×64 crops of 9-frame procedural clips.
2. ``vae_decoder``: decoder only (encoder frozen), colour-weighted, up to 25-frame clips.
3. ``vae_long``: encoder + decoder on 25-frame clips (the causal caches' steady state).
4. ``data``: encode the training clips (5-second, 77 frames, 128×128), set the VAE's
   ``latents_mean/std`` to the per-channel data statistics, build the text encoder, cache the
   caption embeddings (runs automatically before ``transformer`` if missing).
5. ``vae_decoder_ft``: decoder only again, object-weighted, so small objects keep their colours.
6. ``transformer``: a small `CausalWanTransformer`, flow matching with teacher forcing in the
   block-causal layout (see `packforcing.training.stages`); ``--stage-dir`` keeps intermediate phases.
7. ``average`` (not in ``all``): interpolate two transformer checkpoints into ``OUT/transformer``.
8. ``compressor``: the HR branch of the PackForcing compressor with the three-partition context
   (transformer frozen, LR branch frozen).
9. ``--export DIR``: write the `tiny_world` directory (safetensors + JSON) that
   `packforcing.tiny_world.load_tiny_world` loads.

Every stage writes ``OUT/<stage>/checkpoint.safetensors`` (weights + AdamW state, no pickles)
every ``--checkpoint-every`` steps and ``OUT/<stage>/log.csv`` (one row per step). All randomness
is derived from ``--seed`` and the step number, so a resumed run continues identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .training.recipe import TinyRecipe, add_config_flags, build_transformer, build_vae, resolve_config

STAGES = ("vae", "vae_decoder", "vae_long", "data", "vae_decoder_ft", "transformer", "average", "compressor", "all")


@dataclass
class TrainConfig(TinyRecipe):
    """The v1 recipe (world v1, 128x128): `TinyRecipe` plus the VAE, data and compressor stages."""

    # geometry (pixels 128×128 -> latents 16×16 -> 8×8 = 64 tokens per latent frame)
    height: int = 128
    width: int = 128
    block_frames: int = 4
    clip_frames: int = 77  # 20 latent frames = 5 blocks = 5 s
    # VAE
    vae_steps: int = 1100
    vae_lr: float = 1e-3
    vae_batch: int = 4
    vae_frames: int = 9
    vae_crop: int = 64
    vae_colour_from: int = 800  # VAE phase 2 (colour-weighted loss) starts at this step
    vae_decoder_steps: int = 2100  # decoder-only phase (encoder frozen => latents unchanged)
    vae_decoder_frames: int = 17  # 5 latent frames, from step vae_decoder_long_from
    vae_decoder_long_from: int = 1300  # decoder phase uses vae_frames before this step
    vae_decoder_longer_frames: int = 25  # 7 latent frames (batch 2), from vae_decoder_longer_from:
    vae_decoder_longer_from: int = 1900  # the causal cache's steady state must decode right
    vae_long_steps: int = 350  # encoder + decoder on 25-frame clips (the encoder's steady state
    vae_long_lr: float = 5e-4  # after ~3 latent frames must keep colours apart)
    vae_long_frames: int = 25
    vae_decoder_ft_steps: int = 1500  # decoder-only fine-tune after `data` (latents unchanged): colours
    vae_decoder_ft_lr: float = 8e-4
    vae_decoder_ft_object_weight: float = 8.0  # objects are a few % of the pixels: weigh them up
    transformer_init: str | None = None  # optional checkpoint to start the transformer from
    transformer_object_weight: float = 0.0  # loss weight 1 + w·(distance from background) per cell (biased!)
    vae_decoder_lr: float = 1e-3
    # data
    num_clips: int = 200
    # transformer
    transformer_steps: int = 1600
    transformer_lr: float = 8e-4
    context_noise: float = 0.1
    p_gap: float = 0.5
    max_gap: int = 40
    p_drop_first: float = 0.2
    # compressor
    compressor_steps: int = 200
    compressor_lr: float = 5e-4
    distill_weight: float = 1.0
    # sampler stored with the model
    sample_solver: str = "renoise"  # "renoise" | "euler" (see packforcing.sampler)


# -- stages --------------------------------------------------------------------------------------------
def build_compressor(cfg: TrainConfig):
    from .compressor import Compressor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        return Compressor(cfg.dim, mode="both")


def _done(out: Path, stage: str, steps: int) -> bool:
    from safetensors import safe_open

    from .training.loop import CHECKPOINT

    ckpt = out / stage / CHECKPOINT
    if not ckpt.exists():
        return False
    with safe_open(str(ckpt), framework="pt") as f:
        return int(f.metadata()["step"]) >= steps


def train_vae(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True) -> list[float]:
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    vae = build_vae(cfg)
    stage = VAEStage(vae, VAEStageConfig(cfg.vae_batch, cfg.vae_frames, cfg.vae_crop, seed=cfg.seed,
                                         colour_from=cfg.vae_colour_from))
    loop = LoopConfig(cfg.vae_steps, cfg.vae_lr, warmup=20, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae")
    return run_stage(stage, out / "vae", loop, resume)


def train_vae_decoder(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True) -> list[float]:
    """Decoder-only VAE phase: the encoder (hence the training latents and their statistics) stays
    fixed, so it can run after `data` and alongside the transformer. Colour-weighted loss."""
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    vae = load_stage_module(out, "vae", "vae", build_vae(cfg))
    stage = VAEStage(vae, VAEStageConfig(cfg.vae_batch, cfg.vae_frames, cfg.vae_crop, seed=cfg.seed + 10,
                                         train_encoder=False, colour_from=0, anchor_weight=0.0,
                                         colour_anchor_weight=0.0, long_frames=cfg.vae_decoder_frames,
                                         long_from=cfg.vae_decoder_long_from,
                                         longer_frames=cfg.vae_decoder_longer_frames,
                                         longer_from=cfg.vae_decoder_longer_from))
    loop = LoopConfig(cfg.vae_decoder_steps, cfg.vae_decoder_lr, warmup=20, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae_decoder")
    return run_stage(stage, out / "vae_decoder", loop, resume)


def train_vae_long(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True) -> list[float]:
    """Encoder + decoder on long clips (from the decoder phase's weights): a causal VAE trained on
    9-frame clips only drifts once its feature caches reach their steady state (after ~3 latent
    frames) — the encoder there mapped navy, dark green and maroon to nearly the same latent."""
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    vae = load_stage_module(out, "vae_decoder", "vae", build_vae(cfg))
    stage = VAEStage(vae, VAEStageConfig(2, cfg.vae_long_frames, cfg.vae_crop, seed=cfg.seed + 20, colour_from=0))
    loop = LoopConfig(cfg.vae_long_steps, cfg.vae_long_lr, warmup=10, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae_long")
    return run_stage(stage, out / "vae_long", loop, resume)


def train_vae_decoder_ft(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True) -> list[float]:
    """Decoder-only fine-tune of the exported VAE (`vae_final`) on 25-frame clips with the
    colour-weighted loss. The encoder is frozen, so the encoded training latents stay valid and this
    can run alongside the transformer."""
    from diffusers import AutoencoderKLWan

    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    vae = AutoencoderKLWan.from_pretrained(out / "vae_final")
    stage = VAEStage(vae, VAEStageConfig(2, cfg.vae_long_frames, cfg.vae_crop, seed=cfg.seed + 30,
                                         train_encoder=False, colour_from=0, anchor_weight=0.0,
                                         colour_anchor_weight=0.0, object_weight=cfg.vae_decoder_ft_object_weight))
    loop = LoopConfig(cfg.vae_decoder_ft_steps, cfg.vae_decoder_ft_lr, warmup=10,
                      checkpoint_every=cfg.checkpoint_every, progress=progress, desc="vae_decoder_ft")
    return run_stage(stage, out / "vae_decoder_ft", loop, resume)


def latest_vae_stage(out: Path) -> str:
    from .training.loop import CHECKPOINT

    return next(s for s in ("vae_long", "vae_decoder", "vae") if (out / s / CHECKPOINT).exists())


def final_vae(cfg: TrainConfig, out: Path):
    """The exported VAE: the weights `data` encoded with, statistics from `data` (vae_final), and
    the decoder of `vae_decoder_ft` when that stage ran."""
    from diffusers import AutoencoderKLWan

    from .training.loop import CHECKPOINT

    vae = AutoencoderKLWan.from_pretrained(out / "vae_final")
    if (out / "vae_decoder_ft" / CHECKPOINT).exists():
        load_stage_module(out, "vae_decoder_ft", "vae", vae)
    return vae.eval()


def load_stage_module(out: Path, stage: str, name: str, module):
    from .training.loop import CHECKPOINT, load_checkpoint

    load_checkpoint(out / stage / CHECKPOINT, {name: module}, None)
    return module.eval()


def prepare_data(cfg: TrainConfig, out: Path, progress: bool = True) -> None:
    """Encode the training clips, set latent statistics, build the text encoder and embeddings."""
    from .training.data import LATENTS, build_text_encoder, encode_dataset, save_latents, training_seeds

    vae = load_stage_module(out, latest_vae_stage(out), "vae", build_vae(cfg))
    seeds = training_seeds(cfg.num_clips)
    data = encode_dataset(vae, seeds, cfg.clip_frames, cfg.height, progress=progress)
    raw = data["raw"]
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    vae.save_pretrained(out / "vae_final", safe_serialization=True)
    view = (1, -1, 1, 1, 1)
    latents = (raw - mean.view(view)) / std.view(view)
    lr_latents = (data["lr_raw"] - mean.view(view)) / std.view(view)
    text = build_text_encoder(cfg.text_dim, cfg.text_length, seed=cfg.seed)
    text.save(out / "text")
    unique = sorted(set(data["captions"]))
    with torch.no_grad():
        emb = torch.cat([text.encode(unique[i : i + 64]) for i in range(0, len(unique), 64)])
    index = torch.tensor([unique.index(c) for c in data["captions"]])
    save_latents(out / LATENTS, {"latents": latents, "lr_latents": lr_latents, "text": emb, "caption_index": index,
                                 "captions": data["captions"], "seeds": data["seeds"]},
                 extra={"unique_captions": unique, "mean": mean.tolist(), "std": std.tolist()})


def _load_data(cfg: TrainConfig, out: Path, progress: bool = True) -> dict:
    from .training.data import LATENTS, load_latents

    if not (out / LATENTS).exists():
        prepare_data(cfg, out, progress)
    return load_latents(out / LATENTS)


def train_transformer(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True,
                      stage_dir: str = "transformer") -> list[float]:
    """Flow matching with teacher forcing; checkpoints in ``out/stage_dir`` (the exported and
    compressor-training transformer is ``out/transformer``; other names keep intermediate phases)."""
    from .training.loop import LoopConfig, run_stage
    from .training.stages import TransformerStage, TransformerStageConfig

    data = _load_data(cfg, out, progress)
    model = build_transformer(cfg)
    if cfg.transformer_init and not (resume and (out / stage_dir / "checkpoint.safetensors").exists()):
        from .training.loop import load_checkpoint

        load_checkpoint(Path(cfg.transformer_init), {"transformer": model}, None)
    scfg = TransformerStageConfig(
        block_frames=cfg.block_frames, num_blocks=(cfg.clip_frames + 3) // 4 // cfg.block_frames,
        shift=cfg.sample_shift, inference_steps=tuple(cfg.inference_timesteps()), context_noise=cfg.context_noise,
        p_gap=cfg.p_gap, max_gap=cfg.max_gap, p_drop_first=cfg.p_drop_first,
        object_weight=cfg.transformer_object_weight, bf16=cfg.bf16, seed=cfg.seed)
    stage = TransformerStage(model, data["latents"], data["text"], data["caption_index"], scfg)
    loop = LoopConfig(cfg.transformer_steps, cfg.transformer_lr, warmup=30, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="transformer")
    return run_stage(stage, out / stage_dir, loop, resume)


def average_transformers(out: Path, sources: list[str], weight: float, stage_dir: str = "transformer") -> Path:
    """Write ``out/stage_dir/checkpoint.safetensors`` = weight·A + (1 − weight)·B of the transformer
    weights of two checkpoints (a weight-space interpolation between two training phases)."""
    from safetensors.torch import load_file, save_file

    from .training.loop import CHECKPOINT

    if len(sources) != 2 or not 0.0 <= weight <= 1.0:
        raise ValueError("average needs --average-from A B and 0 <= --average-weight <= 1")
    a, b = (load_file(str(p)) for p in sources)
    keys = [k for k in a if k.startswith("model.transformer.")]
    if sorted(keys) != sorted(k for k in b if k.startswith("model.transformer.")):
        raise ValueError(f"{sources[0]} and {sources[1]} hold different transformer weights")
    mixed = {k: (weight * a[k].double() + (1 - weight) * b[k].double()).to(a[k].dtype) for k in keys}
    path = out / stage_dir / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(path), metadata={"step": "0", "average_of": json.dumps(sources), "weight": str(weight)})
    return path


def train_compressor(cfg: TrainConfig, out: Path, resume: bool, progress: bool = True) -> list[float]:
    from .training.loop import LoopConfig, run_stage
    from .training.stages import CompressorStage, CompressorStageConfig

    data = _load_data(cfg, out, progress)
    model = load_stage_module(out, "transformer", "transformer", build_transformer(cfg))
    compressor = build_compressor(cfg)
    scfg = CompressorStageConfig(block_frames=cfg.block_frames, shift=cfg.sample_shift,
                                 inference_steps=tuple(cfg.inference_timesteps()), context_noise=cfg.context_noise,
                                 distill_weight=cfg.distill_weight, bf16=cfg.bf16, seed=cfg.seed)
    stage = CompressorStage(model, compressor, data["latents"], data["lr_latents"], data["text"],
                            data["caption_index"], scfg)
    loop = LoopConfig(cfg.compressor_steps, cfg.compressor_lr, warmup=10, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="compressor")
    return run_stage(stage, out / "compressor", loop, resume)


def _final_loss(out: Path, stage: str, last: int = 50) -> float | None:
    import csv

    path = out / stage / "log.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(open(path)))
    vals = [float(r["loss"]) for r in rows[-last:]]
    return sum(vals) / len(vals) if vals else None


def export(cfg: TrainConfig, out: Path, dest: Path) -> Path:
    """Write the tiny-world directory from a finished run."""
    from .text import TinyTextEncoder
    from .tiny_world import PIPELINE_NAME, save_tiny_world

    transformer = load_stage_module(out, "transformer", "transformer", build_transformer(cfg))
    compressor = build_compressor(cfg)
    load_stage_module(out, "compressor", "hr", compressor.hr)
    vae = final_vae(cfg, out)
    text = TinyTextEncoder.load(out / "text")
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    settings = {
        "name": PIPELINE_NAME, "height": cfg.height, "width": cfg.width, "fps": cfg.fps,
        "block_frames": cfg.block_frames, "denoising_steps": list(cfg.sample_steps), "shift": cfg.sample_shift,
        "solver": cfg.sample_solver,
        "training": {
            "command": "bash scripts/train_tiny_world.sh",
            "config": dataclasses.asdict(cfg),
            "final_loss_mean_last_50": {s: _final_loss(out, s)
                                        for s in ("vae", "vae_decoder", "vae_long", "vae_decoder_ft", "transformer",
                                                  "compressor")},
            "wall_seconds": times,
        },
    }
    return save_tiny_world(dest, transformer, vae, text, compressor, settings)


# -- CLI ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packforcing.train", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--out", default="runs/tiny-world", help="run directory (checkpoints, logs, data)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--export", default=None, help="after training, write the tiny-world directory here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--average-from", nargs=2, default=None, metavar=("A", "B"),
                   help="average stage: the two transformer checkpoints to interpolate")
    p.add_argument("--average-weight", type=float, default=0.5, help="average stage: weight of A")
    p.add_argument("--stage-dir", default=None,
                   help="transformer stage only: checkpoint directory under --out (default: transformer)")
    add_config_flags(p, TrainConfig)
    return p


def _timed(out: Path, name: str, fn, *a, **kw):
    tic = time.perf_counter()
    result = fn(*a, **kw)
    path = out / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[name] = round(times.get(name, 0.0) + time.perf_counter() - tic, 1)
    path.write_text(json.dumps(times, indent=2))
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = resolve_config(TrainConfig, args, out)
    progress = not args.no_progress
    stages = (["vae", "vae_decoder", "vae_long", "data", "vae_decoder_ft", "transformer", "compressor"]
              if args.stage == "all" else [args.stage])
    from .training.data import LATENTS

    trainers = {  # stage -> (function, its step count: `all --resume` skips stages that reached it)
        "vae": (train_vae, cfg.vae_steps),
        "vae_decoder": (train_vae_decoder, cfg.vae_decoder_steps),
        "vae_long": (train_vae_long, cfg.vae_long_steps),
        "vae_decoder_ft": (train_vae_decoder_ft, cfg.vae_decoder_ft_steps),
        "transformer": (functools.partial(train_transformer, stage_dir=args.stage_dir or "transformer"),
                        cfg.transformer_steps),
        "compressor": (train_compressor, cfg.compressor_steps),
    }
    for stage in stages:
        if stage == "data":
            if not (args.resume and (out / LATENTS).exists()) or args.stage == "data":
                _timed(out, "data", prepare_data, cfg, out, progress)
        elif stage == "average":
            path = average_transformers(out, args.average_from or [], args.average_weight,
                                        args.stage_dir or "transformer")
            print(f"wrote {path}")
        else:
            train, steps = trainers[stage]
            if not (args.stage == "all" and args.resume and _done(out, stage, steps)):
                _timed(out, stage, train, cfg, out, args.resume, progress)
    if args.export:
        path = export(cfg, out, Path(args.export))
        print(f"exported to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
