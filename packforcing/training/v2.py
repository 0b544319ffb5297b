"""Training pieces of the second tiny world (`WORLD_V2`): held-out captions, an on-the-fly clip pool,
and the transformer stage (teacher forcing + text-only first blocks, caption dropout, weight EMA).

* `ClipPool`: ``slots`` encoded 5-second clips; every ``refresh_every`` steps the next slot (round
  robin) gets a fresh random scene, so every clip is used a few dozen times and then never again. The content at any step is
  a pure function of (seed, step): a resumed run rebuilds exactly the pool it left.
* `TransformerV2Stage`: per step, ``clip_batch`` clips in the teacher-forced block-causal layout of
  `stages.TransformerStage` (context noise, sink gaps, dropped first block) plus ``first_batch``
  extra *first blocks* (block 0 sees only the text: it carries all of the caption's signal, and it
  costs 1/9 of a teacher-forced clip). The text encoder is trained with the transformer; with
  probability ``p_uncond`` a caption is replaced by the empty embedding (all zeros, what
  `SamplerConfig(guidance_scale=...)` uses as its unconditional input). EMA copies of both are kept.
  Against exposure bias (the cheap variant of Self-Forcing's point): from `self_context_from` on, the
  context blocks are, with probability `p_self_context`, the model's own one-step reconstruction of
  noised ground truth (`probe.denoise_context`), so it learns to continue from its own imperfect
  blocks while the ground-truth target stays valid. This is not a free rollout (no DMD here).
  Optional ``shape_groups``: scenes drawn in every shape (`shape_group`) as extra first blocks, one
  noise draw per group, so only the shape word tells them apart (tried in round 5; it did not teach
  the shape words: docs/tiny_world.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..world import Scene, memory, parse_caption, world_spec
from .data import to_pixels
from .loop import step_rng
from .probe import denoise_context
from .stages import TransformerStageConfig, sample_timesteps, teacher_forcing_layout

# Held-out evaluation captions of the v2 world: never a training caption, in any object order.
HELDOUT_V2 = (
    "a red circle bouncing over a navy background",
    "a yellow square and a blue circle bouncing over a black background",
    "a green triangle and a red square bouncing over a white background",
    "a white circle and a yellow triangle bouncing over a dark grey background",
    "a blue square bouncing over a white background",
    "a green circle and a white square bouncing over a navy background",
)
EVAL_SEED_BASE_V2 = 1_000_000  # evaluation scenes use seeds >= this; training draws never do


def caption_key(caption: str) -> tuple[frozenset, str | None]:
    """Order-free identity of a caption: ({(colour, shape), ...}, background)."""
    objects, background = parse_caption(caption)
    return frozenset(objects), background


_HELDOUT_KEYS = {caption_key(c) for c in HELDOUT_V2}


def is_heldout(caption: str) -> bool:
    return caption_key(caption) in _HELDOUT_KEYS


def training_scene(rng: np.random.Generator, world="v2") -> Scene:
    """A random scene of `world` whose caption is not held out (re-drawn until it is not)."""
    while True:
        scene = Scene.sample(rng, world=world)
        if not is_heldout(scene.caption()):
            return scene


# -- clip pool ----------------------------------------------------------------------------------------
class ClipPool:
    """Encoded clips [slots, C, F, h, w] (normalised latents) and their captions; every
    `refresh_every` steps one slot (round robin) gets a fresh clip. `vae`: an `AutoencoderKLWan`
    whose config holds the latent statistics (it is switched to the oneDNN convolution on the CPU)."""

    def __init__(self, vae, slots: int = 64, clip_frames: int = 77, world="v2", seed: int = 0,
                 device: str | torch.device = "cpu", refresh_every: int = 1, memory_fraction: float = 0.0,
                 entrance_fraction: float = 0.0):
        """``memory_fraction``: share of fresh clips that are memory training clips
        (`world.memory.training_clip`, colour-free caption); 0 draws exactly what it always drew.
        ``entrance_fraction``: share of those memory clips that start empty and show the object's
        first entrance (`training_clip`'s option)."""
        from ..vae import use_onednn_conv3d

        self.vae, self.slots, self.clip_frames, self.seed = vae, int(slots), int(clip_frames), int(seed)
        self.world, self.device, self.refresh_every = world_spec(world), torch.device(device), int(refresh_every)
        self.memory_fraction, self.entrance_fraction = float(memory_fraction), float(entrance_fraction)
        if self.device.type == "cpu":
            use_onednn_conv3d(vae)
        cfg = vae.config
        view = (1, -1, 1, 1, 1)
        self.mean = torch.tensor(cfg.latents_mean).view(view).to(self.device)
        self.std = torch.tensor(cfg.latents_std).view(view).to(self.device)
        self.latents: torch.Tensor | None = None
        self.captions: list[str] = [""] * self.slots
        self.refresh: int | None = None  # refreshes done so far (step // refresh_every)

    def refresh_index(self, slot: int, refresh: int) -> int:
        """The refresh that filled `slot` after `refresh` refreshes: the largest r <= refresh with
        r % slots == slot, or the initial fill slot - slots (< 0)."""
        return refresh - ((refresh - slot) % self.slots)

    @torch.no_grad()
    def _encode(self, refresh: int) -> tuple[torch.Tensor, str]:
        rng = np.random.default_rng([self.seed, 7, refresh + self.slots])
        if self.memory_fraction > 0 and rng.random() < self.memory_fraction:
            scene, start = memory.training_clip(rng, self.world, entrance_fraction=self.entrance_fraction)
            caption = memory.memory_caption(scene)
        else:
            scene, start = training_scene(rng, self.world), 0
            caption = scene.caption()
        frames = scene.render(self.clip_frames, self.world.height, self.world.width, start=start)
        pixels = to_pixels(frames)[None].to(self.device)
        raw = self.vae.encode(pixels).latent_dist.mean
        return ((raw - self.mean) / self.std)[0], caption

    def at(self, step: int) -> "ClipPool":
        """Bring the pool to its state at `step` (rebuilt in full on the first call or a jump)."""
        refresh = step // self.refresh_every
        if refresh == self.refresh:
            return self
        if self.refresh is None or refresh != self.refresh + 1:
            fills = [self._encode(self.refresh_index(j, refresh)) for j in range(self.slots)]
            self.latents = torch.stack([f[0] for f in fills])
            self.captions = [f[1] for f in fills]
        else:
            slot = refresh % self.slots
            self.latents[slot], self.captions[slot] = self._encode(refresh)
        self.refresh = refresh
        return self


def shape_variants(scene: Scene, shapes) -> list[Scene]:
    """`scene` with its first object in each of `shapes`, same colour, place, motion and *area*
    (its `size` rescaled by the shapes' area factors); variants with a held-out caption left out."""
    from dataclasses import replace

    from ..world.scenes import SHAPE_AREA

    first, out = scene.objects[0], []
    for shape in shapes:
        size = first.size * math.sqrt(SHAPE_AREA[first.shape] / SHAPE_AREA[shape])
        variant = replace(scene, objects=(replace(first, shape=shape, size=size), *scene.objects[1:]))
        if not is_heldout(variant.caption()):
            out.append(variant)
    return out


@torch.no_grad()
def shape_group(rng: np.random.Generator, pool: ClipPool, block_frames: int = 4) -> list[tuple[str, torch.Tensor]]:
    """[(caption, normalised latents [C, block_frames, h, w] of its first block)] of one random
    training scene in every shape of the world (`shape_variants`), encoded by the pool's VAE."""
    from ..vae import pixel_frames

    world, frames, out = pool.world, pixel_frames(block_frames), []
    for variant in shape_variants(training_scene(rng, world), world.shapes):
        pixels = to_pixels(variant.render(frames, world.height, world.width))[None].to(pool.device)
        raw = pool.vae.encode(pixels).latent_dist.mean
        out.append((variant.caption(), ((raw - pool.mean) / pool.std)[0]))
    return out


def latent_statistics(vae, count: int = 48, clip_frames: int = 77, world="v2", seed: int = 0):
    """Per-channel mean and std of the raw posterior means of `count` random training clips."""
    world = world_spec(world)
    raws = []
    with torch.no_grad():
        for k in range(count):
            scene = training_scene(np.random.default_rng([seed, 11, k]), world)
            pixels = to_pixels(scene.render(clip_frames, world.height, world.width))[None]
            raws.append(vae.encode(pixels.to(vae.device)).latent_dist.mean.cpu())
    raw = torch.cat(raws)
    return raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)


# -- transformer --------------------------------------------------------------------------------------
@dataclass
class TransformerV2Config(TransformerStageConfig):
    """The teacher-forcing knobs of `stages.TransformerStageConfig` (layout, timesteps, context noise,
    sink gaps, dropped first block; its object weighting and fixed batches are not used here), plus:"""

    shift: float = 3.0
    inference_steps: tuple[float, ...] = (1000.0, 875.0, 750.0, 625.0)
    clip_batch: int = 1  # teacher-forced clips per step
    first_batch: int = 8  # extra text-only first blocks per step
    p_uncond: float = 0.1  # caption dropout (classifier-free guidance)
    # against exposure bias: with this probability (from step `self_context_from` on) the clean
    # context of a teacher-forced clip is the model's own one-step guess from noised ground truth
    p_self_context: float = 0.0
    self_context_from: int = 0
    self_context_sigma: tuple[float, float] = (0.2, 0.7)
    ema: float = 0.999
    # shape-contrast groups: per step, this many fresh scenes, each rendered with its first object in
    # every shape of the world (same place, area, motion, colours), as extra text-only first blocks
    # sharing one noise draw and timestep per group; only the shape word tells them apart
    shape_groups: int = 0
    # input-weighted loss: each latent cell's squared error weighs 1 + input_weight·d/max(d), d = how far
    # the *noisy input* x_t is from its frame's median there (dilated 3×3), normalised to mean 1 per
    # frame. The weights depend on the input only, so the loss's minimiser stays E[v | x_t]: unlike
    # v1's target-weighted loss this cannot bias the model towards objects; it only spends more of
    # the gradient where x_t shows something other than background
    input_weight: float = 0.0


class TransformerV2Stage:
    def __init__(self, model, text_encoder, pool: ClipPool, cfg: TransformerV2Config):
        """`text_encoder`: a `TinyTextEncoder` (its UMT5 model is trained too)."""
        self.model, self.text, self.pool, self.cfg = model, text_encoder, pool, cfg
        self.device = pool.device
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.ema_text = copy.deepcopy(text_encoder.model).requires_grad_(False)
        self._ids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def trainable(self) -> dict[str, nn.Module]:
        return {"transformer": self.model, "text": self.text.model,
                "ema_transformer": self.ema_model, "ema_text": self.ema_text}

    def embed(self, captions: list[str], drop: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, L, D] with gradients; rows where `drop` is True are all zeros."""
        for c in captions:
            if c not in self._ids:
                self._ids[c] = self.text.tokenize(c)
        ids = torch.cat([self._ids[c][0] for c in captions]).to(self.device)
        mask = torch.cat([self._ids[c][1] for c in captions]).to(self.device)
        emb = self.text.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        keep = (mask[..., None] > 0) & ~drop.to(self.device)[:, None, None]
        return emb * keep

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def loss(self, step: int) -> torch.Tensor:
        c, b, n = self.cfg, self.cfg.block_frames, self.cfg.num_blocks
        gen, rng = step_rng(c.seed, step, salt=4)
        pool = self.pool.at(step)
        picks = rng.integers(pool.slots, size=c.clip_batch + c.first_batch)
        captions = [pool.captions[i] for i in picks]
        drop = torch.rand(len(picks), generator=gen) < c.p_uncond
        text = self.embed(captions, drop)
        losses = []
        if c.clip_batch:  # teacher-forced clips (one gap / drop draw shared by the batch)
            x0 = pool.latents[picks[: c.clip_batch], :, : n * b].float()
            gap = int(rng.integers(1, c.max_gap + 1)) if rng.random() < c.p_gap else 0
            mask, positions = teacher_forcing_layout(n, b, gap, c.sink_blocks, bool(rng.random() < c.p_drop_first))
            t = sample_timesteps(n * c.clip_batch, gen, c.shift, list(c.inference_steps), c.p_inference)
            t = t.view(c.clip_batch, n)
            eps = torch.randn(x0.shape, generator=gen).to(self.device)
            t_frame = t.repeat_interleave(b, dim=1).to(self.device)  # [B, F]
            sigma = (t_frame / 1000.0)[:, None, :, None, None]
            x_t, target = (1 - sigma) * x0 + sigma * eps, eps - x0
            clean = x0[:, :, : (n - 1) * b]
            ctx_sigma = torch.rand(c.clip_batch, generator=gen).mul(c.context_noise).to(self.device)
            clean = clean + ctx_sigma[:, None, None, None, None] * torch.randn(clean.shape, generator=gen).to(self.device)
            if step >= c.self_context_from and rng.random() < c.p_self_context:
                lo, hi = c.self_context_sigma
                sig = lo + (hi - lo) * torch.rand(c.clip_batch, n - 1, generator=gen)
                with torch.no_grad(), self._autocast():
                    clean = denoise_context(self.model, x0[:, :, : (n - 1) * b], text[: c.clip_batch].detach(), sig,
                                            positions[: (n - 1) * b].to(self.device), gen, b).float()
            seq = torch.cat([clean, x_t], dim=2)
            timestep = torch.cat([torch.zeros(c.clip_batch, clean.shape[2], device=self.device), t_frame], dim=1)
            with self._autocast():
                out = self.model.forward_sequence(seq, timestep, text[: c.clip_batch], positions.to(self.device),
                                                  mask.to(self.device))
            weight = input_weights(x_t, c.input_weight)
            losses.append((weight * (out[:, :, clean.shape[2]:].float() - target).pow(2)).mean())
        if c.first_batch:  # text-only first blocks
            x0 = pool.latents[picks[c.clip_batch:], :, :b].float()
            t = sample_timesteps(c.first_batch, gen, c.shift, list(c.inference_steps), c.p_inference)
            x_t, target, _ = _noise_first_blocks(x0, t, gen, self.device)
            with self._autocast():
                out = self.model.forward_sequence(x_t, t.to(self.device)[:, None].expand(-1, b), text[c.clip_batch:])
            losses.append((input_weights(x_t, c.input_weight) * (out.float() - target).pow(2)).mean())
        if c.shape_groups:  # more text-only first blocks: they share the first blocks' half of the loss
            group_loss, count = self.shape_group_loss(step)
            if c.first_batch:
                losses[-1] = (losses[-1] * c.first_batch + group_loss * count) / (c.first_batch + count)
            else:
                losses.append(group_loss)
        return torch.stack(losses).mean()

    def shape_group_loss(self, step: int) -> tuple[torch.Tensor, int]:
        """(mean flow-matching loss, first blocks) of `shape_groups` shape-contrast groups of
        text-only first blocks (own random streams: the rest of the step draws what it always drew)."""
        c, b = self.cfg, self.cfg.block_frames
        gen, rng = step_rng(c.seed, step, salt=9)
        captions, x0s, groups = [], [], []
        for g in range(c.shape_groups):
            for caption, latents in shape_group(rng, self.pool, b):
                captions.append(caption)
                x0s.append(latents)
                groups.append(g)
        x0 = torch.stack(x0s).float()
        drop = torch.rand(len(captions), generator=gen) < c.p_uncond
        text = self.embed(captions, drop)
        t_group = sample_timesteps(c.shape_groups, gen, c.shift, list(c.inference_steps), c.p_inference)
        eps_group = torch.randn((c.shape_groups, *x0.shape[1:]), generator=gen)
        index = torch.tensor(groups)
        sigma = (t_group[index] / 1000.0).view(-1, 1, 1, 1, 1).to(self.device)
        eps = eps_group[index].to(self.device)
        x_t, target = (1 - sigma) * x0 + sigma * eps, eps - x0
        with self._autocast():
            out = self.model.forward_sequence(x_t, t_group[index].to(self.device)[:, None].expand(-1, b), text)
        return (out.float() - target).pow(2).mean(), len(captions)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the transformer and the text encoder."""
        for ema, live in ((self.ema_model, self.model), (self.ema_text, self.text.model)):
            for e, p in zip(ema.parameters(), live.parameters()):
                e.lerp_(p.detach(), 1 - self.cfg.ema)


def input_weights(x_t: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-cell loss weights [B, 1, F, h, w] of noisy latents x_t [B, C, F, h, w], a function of x_t
    alone: 1 + strength·d/max(d), d = the channel norm of x_t minus its per-frame spatial median,
    max-pooled 3×3 (an object's outline and its neighbours), normalised to mean 1 per frame.
    ``strength`` 0 gives all ones."""
    if strength == 0:
        return torch.ones_like(x_t[:, :1])
    flat = x_t.flatten(3)  # [B, C, F, h·w]
    d = (flat - flat.median(dim=3, keepdim=True).values).norm(dim=1).view_as(x_t[:, 0])  # [B, F, h, w]
    d = torch.nn.functional.max_pool2d(d.flatten(0, 1)[:, None], 3, stride=1, padding=1).view_as(d)
    w = 1 + strength * d / d.flatten(2).amax(dim=2)[..., None, None].clamp_min(1e-6)
    return (w / w.mean(dim=(2, 3), keepdim=True))[:, None]


def _noise_first_blocks(x0: torch.Tensor, t: torch.Tensor, gen: torch.Generator, device):
    """Flow-matching noising with one timestep per item: x0 [B,C,F,h,w], t [B]."""
    eps = torch.randn(x0.shape, generator=gen).to(device)
    sigma = (t.to(device) / 1000.0).view(-1, 1, 1, 1, 1)
    return (1 - sigma) * x0 + sigma * eps, eps - x0, t


__all__ = ["ClipPool", "EVAL_SEED_BASE_V2", "HELDOUT_V2", "TransformerV2Config", "TransformerV2Stage",
           "caption_key", "input_weights", "is_heldout", "latent_statistics", "shape_group", "shape_variants", "training_scene"]
