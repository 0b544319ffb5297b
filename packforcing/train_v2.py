"""Training recipe of the second tiny world (`WORLD_V2`): ``python -m packforcing.train_v2 PHASE``.

Phases (each resumable, each lands weights without optimizer state in ``OUT/<phase>/``)::

    vae          AutoencoderKLWan (real architecture, base_dim 16) on full 64x64 frames of random
                 v2 scenes, 9 -> 17 -> 25-frame clips (the causal caches' steady state must decode
                 right), colour- and object-weighted loss, colour anchor.
    vae_decoder  decoder only (encoder frozen, so the latents the transformer trains on do not move:
                 it can run beside the transformer phase), 25-frame clips, object-weighted.
    transformer  flow matching on an on-the-fly pool of encoded clips (`training.v2.ClipPool`):
                 teacher-forced 5-block clips + extra text-only first blocks, the text encoder
                 trained with it, caption dropout (for guidance), weight EMA; from
                 `self_context_from` on, half the clips get self-generated context.
    export       write a tiny-world directory (``--export DIR``) from the bias-corrected EMA weights
                 (`load_weights`); the compressor is the LR branch only (zero-shot) until a v2
                 compressor is trained.
    vae_sharp    fine-tune the decoder of an exported model's VAE (``--vae-sharp-init DIR``; encoder
                 frozen, so the latents and the transformer stay valid) with pixels on object
                 outlines weighted up; ``export_vae_sharp --export DIR`` writes the model with it.
    memory       fine-tune an exported model (``--memory-init DIR``) on a pool with memory training
                 clips mixed in (`world.memory`: the object leaves and comes back, caption without
                 its colour); ``export_memory --export DIR`` writes the result.

Every random draw of a step comes from ``(seed, step)``, so ``--resume`` continues bit-identically
(`packforcing.training.loop`). Data are generated on the fly: no fixed clip set. The recipe and its
measurements: docs/tiny_world.md; the exact commands: scripts/train_tiny_world_v2.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .training.recipe import TinyRecipe, add_config_flags, build_transformer, build_vae, resolve_config
from .world import world_spec

PHASES = ("vae", "vae_decoder", "transformer", "export", "memory", "export_memory", "vae_sharp", "export_vae_sharp")


@dataclass
class V2Config(TinyRecipe):
    """The v2 recipe (world v2, 64x64): `TinyRecipe` with v2's sizes and phases."""

    world: str = "v2"
    # VAE
    vae_base_dim: int = 16
    vae_steps: int = 1400
    vae_lr: float = 1e-3
    vae_colour_from: int = 300  # colour-weighted loss + strong colour anchor from this step
    vae_long_from: int = 400  # 17-frame clips (batch 4) from this step
    vae_longer_from: int = 900  # 25-frame clips (batch 2) from this step
    vae_object_weight: float = 2.0
    vae_decoder_steps: int = 1200
    vae_decoder_lr: float = 5e-4
    vae_decoder_object_weight: float = 4.0
    vae_stat_clips: int = 48  # clips whose latents set the VAE's latents_mean / latents_std
    # text (word-level tokenizer, 2-layer UMT5, trained with the transformer)
    text_length: int = 16
    # transformer (64x64 px -> 8x8 latents -> 4x4 = 16 tokens per latent frame)
    transformer_steps: int = 2800
    transformer_lr: float = 5e-4
    pool_slots: int = 64
    pool_refresh_every: int = 2  # steps per fresh clip (one clip encode costs ~0.5-0.8 s on a core)
    clip_batch: int = 1
    first_batch: int = 8
    p_uncond: float = 0.1
    ema: float = 0.999
    p_self_context: float = 0.5
    self_context_from: int = 1600
    # memory phase: fine-tune an exported model on ordinary + memory training clips (world.memory)
    memory_init: str = "assets/tiny-world"
    memory_steps: int = 800
    memory_lr: float = 2e-4
    memory_fraction: float = 0.5  # share of pool clips that are memory clips (colour-free captions)
    memory_entrance_fraction: float = 0.0  # share of memory clips that start empty (the object enters later)
    memory_ema: float = 0.995  # starts at the (trained) init weights, so no bias correction is needed
    memory_grow_layers: int = 0  # > the init's layers: deepen it first with identity blocks (training.grow)
    shape_groups: int = 0  # per step: scenes drawn in every shape as extra first blocks (training.v2.shape_group)
    input_weight: float = 0.0  # memory phase: loss weight of cells by what the noisy input shows (training.v2.input_weights)
    # vae_sharp phase: the decoder of an exported model's VAE fine-tuned for outlines (encoder frozen)
    vae_sharp_init: str = "assets/tiny-world"
    vae_sharp_steps: int = 1500
    vae_sharp_lr: float = 3e-4
    vae_sharp_frames: int = 17
    vae_sharp_edge_weight: float = 8.0
    # sampler stored with the model: Euler steps, warped with this shift
    sample_steps: tuple[int, ...] = (1000, 875, 750, 625, 500, 375, 250, 125)


def train_vae(cfg: V2Config, out: Path, resume: bool, progress: bool = True, device: str = "cpu",
              stop_at: int | None = None) -> list[float]:
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    size = world_spec(cfg.world).height
    stage = VAEStage(build_vae(cfg).to(device), VAEStageConfig(
        batch=4, frames=9, crop=size, seed=cfg.seed, world=cfg.world, colour_from=cfg.vae_colour_from,
        long_frames=17, long_from=cfg.vae_long_from, longer_frames=25, longer_from=cfg.vae_longer_from,
        longer_batch=2, object_weight=cfg.vae_object_weight))
    loop = LoopConfig(cfg.vae_steps, cfg.vae_lr, warmup=20, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae", stop_at=stop_at)
    return run_stage(stage, out / "vae", loop, resume)


def train_vae_decoder(cfg: V2Config, out: Path, resume: bool, progress: bool = True, device: str = "cpu",
                      stop_at: int | None = None):
    from .training.loop import CHECKPOINT, LoopConfig, load_checkpoint, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    vae = build_vae(cfg)
    load_checkpoint(out / "vae" / CHECKPOINT, {"vae": vae}, None)
    stage = VAEStage(vae.to(device), VAEStageConfig(
        batch=2, frames=25, crop=world_spec(cfg.world).height, seed=cfg.seed + 10, world=cfg.world,
        train_encoder=False, colour_from=0, anchor_weight=0.0, colour_anchor_weight=0.0,
        object_weight=cfg.vae_decoder_object_weight))
    loop = LoopConfig(cfg.vae_decoder_steps, cfg.vae_decoder_lr, warmup=10, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae_decoder", stop_at=stop_at)
    return run_stage(stage, out / "vae_decoder", loop, resume)


def final_vae(cfg: V2Config, out: Path, device: str = "cpu", decoder: bool = False):
    """The trained VAE with the latent statistics of `vae_stat_clips` training clips in its config
    (written once to ``OUT/vae_final``, diffusers layout). ``decoder``: with the weights of the
    `vae_decoder` phase when it has a checkpoint (its encoder is the same, frozen)."""
    from diffusers import AutoencoderKLWan

    from .training.loop import CHECKPOINT, load_checkpoint
    from .training.v2 import latent_statistics

    path = out / "vae_final"
    if not (path / "config.json").exists():
        vae = build_vae(cfg)
        load_checkpoint(out / "vae" / CHECKPOINT, {"vae": vae}, None)
        mean, std = latent_statistics(vae.eval(), cfg.vae_stat_clips, world=cfg.world, seed=cfg.seed)
        vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
        vae.save_pretrained(path, safe_serialization=True)
    vae = AutoencoderKLWan.from_pretrained(path)
    if decoder and (out / "vae_decoder" / CHECKPOINT).exists():
        load_checkpoint(out / "vae_decoder" / CHECKPOINT, {"vae": vae}, None)
    return vae.to(device).eval().requires_grad_(False)


def build_text(cfg: V2Config):
    from .training.data import build_text_encoder

    return build_text_encoder(cfg.text_dim, cfg.text_length, seed=cfg.seed)


def train_transformer(cfg: V2Config, out: Path, resume: bool, progress: bool = True, device: str = "cpu",
                      stop_at: int | None = None):
    from .training.loop import LoopConfig, run_stage
    from .training.v2 import ClipPool, TransformerV2Config, TransformerV2Stage

    vae = final_vae(cfg, out, device)
    pool = ClipPool(vae, cfg.pool_slots, world=cfg.world, seed=cfg.seed, device=device,
                    refresh_every=cfg.pool_refresh_every)
    text = build_text(cfg).to(device)
    stage = TransformerV2Stage(build_transformer(cfg).to(device), text, pool, TransformerV2Config(
        shift=cfg.sample_shift, inference_steps=tuple(cfg.inference_timesteps()), clip_batch=cfg.clip_batch,
        first_batch=cfg.first_batch, p_uncond=cfg.p_uncond, ema=cfg.ema, bf16=cfg.bf16, seed=cfg.seed,
        p_self_context=cfg.p_self_context, self_context_from=cfg.self_context_from))
    loop = LoopConfig(cfg.transformer_steps, cfg.transformer_lr, warmup=50, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="transformer", stop_at=stop_at)
    return run_stage(stage, out / "transformer", loop, resume)


def load_weights(cfg: V2Config, out: Path, weights: str = "ema"):
    """(transformer, text encoder, step) of the transformer phase's checkpoint. ``weights="ema"``:
    the EMA, bias-corrected — it started at the initial weights θ0 (rebuilt from the seed), so after
    n updates EMA = dⁿ·θ0 + (1 − dⁿ)·(weighted mean of the live weights), and
    (EMA − dⁿ·θ0) / (1 − dⁿ) removes the init (with d = 0.999 it still weighs 0.14 after 2,000
    steps). ``"live"``: the optimised weights."""
    from .training.loop import CHECKPOINT, load_checkpoint

    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
    transformer, text = build_transformer(cfg), build_text(cfg)
    init = [m.state_dict() for m in (build_transformer(cfg), build_text(cfg).model)]
    prefix = "ema_" if weights == "ema" else ""
    step = load_checkpoint(out / "transformer" / CHECKPOINT, {prefix + "transformer": transformer,
                                                              prefix + "text": text.model}, None)
    if weights == "ema" and step > 0:
        keep = cfg.ema ** step
        for module, theta0 in zip((transformer, text.model), init):
            state = module.state_dict()
            module.load_state_dict({k: (v - keep * theta0[k]) / (1 - keep) if v.is_floating_point() else v
                                    for k, v in state.items()})
    return transformer.eval(), text, step


def export(cfg: V2Config, out: Path, dest: Path, guidance_scale: float = 1.0) -> Path:
    """A tiny-world directory (`packforcing.tiny_world` layout) from the (bias-corrected) EMA weights."""
    from .compressor import Compressor
    from .tiny_world import PIPELINE_NAME, save_tiny_world

    transformer, text, step = load_weights(cfg, out, "ema")
    world = world_spec(cfg.world)
    settings = {
        "name": f"{PIPELINE_NAME} · world {cfg.world}", "world": cfg.world, "height": world.height,
        "width": world.width, "fps": cfg.fps, "block_frames": 4,
        "denoising_steps": list(cfg.sample_steps), "shift": cfg.sample_shift,
        "solver": "euler", "guidance_scale": guidance_scale,
        "training": {"command": "bash scripts/train_tiny_world_v2.sh", "config": dataclasses.asdict(cfg),
                     "transformer_steps_done": step},
    }
    return save_tiny_world(dest, transformer, final_vae(cfg, out, decoder=True), text, Compressor(cfg.dim, mode="lr"),
                           settings)


def _memory_init(cfg: V2Config, device: str = "cpu"):
    """(transformer, text encoder, VAE, settings) of the model the memory phase starts from."""
    from diffusers import AutoencoderKLWan

    from .tiny_world import MANIFEST, load_tiny_world

    init = Path(cfg.memory_init)
    pipe = load_tiny_world(init)
    vae = AutoencoderKLWan.from_pretrained(init / "vae").to(device).eval().requires_grad_(False)
    transformer = pipe.transformer
    if cfg.memory_grow_layers > transformer.config.num_layers:
        from .training.grow import grow_layers

        transformer = grow_layers(transformer, cfg.memory_grow_layers)
    return transformer.to(device).train(), pipe.text_encoder.to(device), vae, json.loads((init / MANIFEST).read_text())


def train_memory(cfg: V2Config, out: Path, resume: bool, progress: bool = True, device: str = "cpu",
                 stop_at: int | None = None):
    """Fine-tune the exported model `memory_init` on a pool in which `memory_fraction` of the clips are
    memory training clips (an object leaves and comes back within the 5 s clip, caption without its
    colour): the transformer phase's loss (teacher forcing, text-only first blocks, caption dropout,
    self-generated context from the first step), its text encoder trained with it, an EMA from the
    init weights. The frozen VAE is the init's, so its latents are those the model was trained on."""
    from .training.loop import LoopConfig, run_stage
    from .training.v2 import ClipPool, TransformerV2Config, TransformerV2Stage

    transformer, text, vae, _ = _memory_init(cfg, device)
    pool = ClipPool(vae, cfg.pool_slots, world=cfg.world, seed=cfg.seed + 40, device=device,
                    refresh_every=cfg.pool_refresh_every, memory_fraction=cfg.memory_fraction,
                    entrance_fraction=cfg.memory_entrance_fraction)
    stage = TransformerV2Stage(transformer, text, pool, TransformerV2Config(
        shift=cfg.sample_shift, inference_steps=tuple(cfg.inference_timesteps()), clip_batch=cfg.clip_batch,
        first_batch=cfg.first_batch, p_uncond=cfg.p_uncond, ema=cfg.memory_ema, bf16=cfg.bf16, seed=cfg.seed + 40,
        p_self_context=cfg.p_self_context, self_context_from=0, shape_groups=cfg.shape_groups,
        input_weight=cfg.input_weight))
    loop = LoopConfig(cfg.memory_steps, cfg.memory_lr, warmup=20, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="memory", stop_at=stop_at)
    return run_stage(stage, out / "memory", loop, resume)


def export_memory(cfg: V2Config, out: Path, dest: Path) -> Path:
    """A tiny-world directory: the memory phase's EMA transformer and text encoder, the init's VAE,
    compressor and settings (plus a note of the fine-tune)."""
    from .compressor import Compressor
    from .tiny_world import save_tiny_world
    from .training.loop import CHECKPOINT, load_checkpoint

    transformer, text, vae, settings = _memory_init(cfg)
    step = load_checkpoint(out / "memory" / CHECKPOINT, {"ema_transformer": transformer, "ema_text": text.model}, None)
    # a fine-tune of a fine-tuned model keeps the earlier rounds' notes: memory_finetune, memory_finetune_2, ...
    key = next(k for k in ("memory_finetune", *(f"memory_finetune_{n}" for n in range(2, 100))) if k not in settings)
    settings = dict(settings, **{key: {"command": "bash scripts/train_tiny_world_v2.sh (memory phase)",
                                       "steps": step, "config": dataclasses.asdict(cfg)}})
    compressor = Compressor.load(str(Path(cfg.memory_init) / "compressor.safetensors"))
    return save_tiny_world(dest, transformer.eval(), vae, text, compressor, settings)


def _sharp_vae(cfg: V2Config, device: str = "cpu"):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(Path(cfg.vae_sharp_init) / "vae").to(device)


def train_vae_sharp(cfg: V2Config, out: Path, resume: bool, progress: bool = True, device: str = "cpu",
                    stop_at: int | None = None):
    """Decoder-only fine-tune of `vae_sharp_init`'s VAE: the `vae_decoder` phase's loss with pixels
    on object outlines weighted ``1 + vae_sharp_edge_weight`` (the decoder rounded corners and
    triangles: strict reconstruction fidelity 0.61 with every colour right)."""
    from .training.loop import LoopConfig, run_stage
    from .training.stages import VAEStage, VAEStageConfig

    stage = VAEStage(_sharp_vae(cfg, device), VAEStageConfig(
        batch=2, frames=cfg.vae_sharp_frames, crop=world_spec(cfg.world).height, seed=cfg.seed + 50,
        world=cfg.world, train_encoder=False, colour_from=0, anchor_weight=0.0, colour_anchor_weight=0.0,
        object_weight=cfg.vae_decoder_object_weight, edge_weight=cfg.vae_sharp_edge_weight))
    loop = LoopConfig(cfg.vae_sharp_steps, cfg.vae_sharp_lr, warmup=10, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="vae_sharp", stop_at=stop_at)
    return run_stage(stage, out / "vae_sharp", loop, resume)


def export_vae_sharp(cfg: V2Config, out: Path, dest: Path) -> Path:
    """`vae_sharp_init` copied to ``dest`` with the `vae_sharp` phase's VAE (same encoder, same
    latent statistics) and a note of the fine-tune in its manifest."""
    import shutil

    from .tiny_world import MANIFEST
    from .training.loop import CHECKPOINT, load_checkpoint

    init = Path(cfg.vae_sharp_init)
    vae = _sharp_vae(cfg)
    step = load_checkpoint(out / "vae_sharp" / CHECKPOINT, {"vae": vae}, None)
    if dest.resolve() != init.resolve():
        shutil.copytree(init, dest, dirs_exist_ok=True)
    vae.eval().save_pretrained(dest / "vae", safe_serialization=True)
    settings = json.loads((dest / MANIFEST).read_text())
    settings["vae_sharp"] = {"command": "bash scripts/train_tiny_world_v2.sh (vae_sharp phase)", "steps": step,
                             "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("vae")}}
    (dest / MANIFEST).write_text(json.dumps(settings, indent=2))
    return dest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packforcing.train_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--out", default="runs/tiny-world-v2", help="run directory (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same phases, same recipe)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="training phases: stop (with a checkpoint) before this step; the schedule stays that of the full run")
    p.add_argument("--export", default=None, help="export phase: destination tiny-world directory")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="export phase: guidance stored with the model")
    add_config_flags(p, V2Config)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = resolve_config(V2Config, args, out)
    if args.phase == "vae":
        train_vae(cfg, out, args.resume, not args.no_progress, args.device, args.stop_at)
    elif args.phase == "vae_decoder":
        train_vae_decoder(cfg, out, args.resume, not args.no_progress, args.device, args.stop_at)
    elif args.phase in ("export", "export_memory", "export_vae_sharp"):
        if not args.export:
            raise SystemExit(f"error: the {args.phase} phase needs --export DIR")
        writer = {"export": lambda: export(cfg, out, Path(args.export), args.guidance_scale),
                  "export_memory": lambda: export_memory(cfg, out, Path(args.export)),
                  "export_vae_sharp": lambda: export_vae_sharp(cfg, out, Path(args.export))}[args.phase]
        print(f"exported to {writer()}")
    elif args.phase == "vae_sharp":
        train_vae_sharp(cfg, out, args.resume, not args.no_progress, args.device, args.stop_at)
    elif args.phase == "memory":
        train_memory(cfg, out, args.resume, not args.no_progress, args.device, args.stop_at)
    else:
        train_transformer(cfg, out, args.resume, not args.no_progress, args.device, args.stop_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
