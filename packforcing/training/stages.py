"""The three training stages of the tiny world. Each has ``trainable()`` and ``loss(step)``.

* `VAEStage`: an `AutoencoderKLWan` on short random crops of procedural clips, trained as a
  near-deterministic autoencoder: L1 + MSE reconstruction of the posterior *mean* plus small fixed
  noise (σ = 0.05), and a light L2 penalty on the mean. (Sampling with the untrained posterior's
  std ≈ 1 drowned the latents in noise and the decoder collapsed to the mean colour; only the
  posterior mean is ever used downstream.) The decode skips diffusers' final clamp to [-1, 1].
  A *colour anchor* (MSE between latent channels 0–2 and 4× the mean colour of the pixels each
  latent cell covers) is essential at this width: without it the RMS-normed tiny decoder stays
  insensitive to the small initial latents and converges to a luminance-only (grey) code.
* `TransformerStage`: flow matching with teacher forcing in the block-causal layout
  ``[clean blocks 0..n-2 | noisy blocks 0..n-1]`` (the layout `tests/test_model.py` proves equal to
  cached chunked generation). Noisy block i attends the clean blocks < i and itself; every noisy
  block gets its own timestep. Augmentations: small Gaussian noise on the clean context (still
  labelled t = 0), random temporal gaps between the sink blocks and the rest (so distant sinks,
  as after PackForcing's RoPE adjustment, are in distribution), and occasionally hiding clean
  block 0 from later blocks (contexts that do not start at the video's first frame).
* `CompressorStage`: the HR branch (LR branch frozen; transformer frozen) trained with the
  three-partition context of the paper inside one 5-block clip — sink = blocks 0–1, mid = block 2
  seen ONLY through its compressed tokens, recent = block 3, current = block 4 (noisy). Loss: flow
  matching on block 4 plus MSE to the frozen model's full-context prediction.

Flow matching: x_t = (1 − σ)·x0 + σ·ε with σ = t/1000, target v = ε − x0 (so x0 = x_t − σ·v).
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..model import block_causal_mask
from ..rope import Rope3D
from ..sampler import warp_timesteps
from .data import vae_batch
from .loop import step_rng

# diffusers' RMS norms keep fp32 weights under CPU bf16 autocast; the warning is harmless noise
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")


def _data_step(step: int, data_steps: int | None) -> int:
    return step if not data_steps else step % data_steps


# -- timesteps ---------------------------------------------------------------------------------------
def sample_timesteps(n: int, gen: torch.Generator, shift: float, inference_steps: list[float],
                     p_inference: float = 0.5) -> torch.Tensor:
    """n timesteps in (0, 1000]: with probability ``p_inference`` one of the sampler's timesteps,
    else a shifted uniform σ (t = 1000·s·u/(1+(s−1)·u))."""
    u = torch.rand(n, generator=gen).clamp_min(1e-3)
    t = torch.tensor(warp_timesteps((u * 1000).tolist(), shift))
    pick = torch.rand(n, generator=gen) < p_inference
    idx = torch.randint(len(inference_steps), (n,), generator=gen)
    t_inf = torch.tensor(inference_steps, dtype=torch.float32)[idx]
    return torch.where(pick, t_inf, t.float())


# -- VAE ------------------------------------------------------------------------------------------------
@dataclass
class VAEStageConfig:
    batch: int = 4
    frames: int = 9
    crop: int = 64
    latent_noise: float = 0.05  # std of the noise added to the posterior mean during training
    mean_l2: float = 1e-4  # small L2 penalty on the posterior mean (keeps latents bounded)
    anchor_weight: float = 0.1  # colour anchor: latent channels 0-2 ≈ anchor_scale × local mean colour
    anchor_scale: float = 4.0
    train_encoder: bool = True  # False: decoder-only phase (encoder frozen, latents fixed)
    # phase 2 (steps >= colour_from): colourful pixels weigh more, stronger anchor (chroma is
    # learned far more slowly than luminance otherwise)
    colour_from: int | None = 800
    colour_weight: float = 4.0  # pixel weight 1 + colour_weight·saturation (saturation in [0, 1])
    colour_anchor_weight: float = 1.0
    # from step long_from on, clips of long_frames frames (a decoder trained on 9-frame clips only
    # drifts in colour after ~3 latent frames of streaming decode)
    long_frames: int | None = None
    long_from: int = 0
    longer_frames: int | None = None  # a second, longer stage (batch longer_batch)
    longer_from: int = 0
    longer_batch: int = 2
    mse_weight: float = 1.0
    object_weight: float = 0.0  # extra weight on pixels far (> 32 levels) from the frame's background
    edge_weight: float = 0.0  # extra weight on pixels within 1 px of an object's outline (shapes, corners)
    seed: int = 0
    data_steps: int | None = None  # cycle over this many fixed batches (tests); None = fresh data
    world: str = "v1"  # which tiny world the clips come from (packforcing.world.spec)


def latent_colour(x: torch.Tensor, latent_w: int) -> torch.Tensor:
    """Mean colour of the pixels each latent cell covers (causal VAE grouping: latent frame 0 =
    pixel frame 0, latent k = pixel frames 4k−3..4k). x [B,3,1+4k,H,W] -> [B,3,1+k,H/8,W/8]."""
    s = x.shape[-1] // latent_w
    first = F.avg_pool3d(x[:, :, :1], (1, s, s))
    rest = F.avg_pool3d(x[:, :, 1:], (4, s, s)) if x.shape[2] > 1 else first[:, :, :0]
    return torch.cat([first, rest], dim=2)


def outline(mask: torch.Tensor) -> torch.Tensor:
    """1 where a 3x3 neighbourhood of a binary mask [B,1,T,H,W] holds both values (the pixels on
    either side of every object edge), else 0; per frame."""
    dilated = F.max_pool3d(mask, (1, 3, 3), stride=1, padding=(0, 1, 1))
    eroded = -F.max_pool3d(-mask, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return dilated - eroded


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan` decode without the final clamp to [-1, 1] (which zeroes the gradient of
    every saturated pixel and can stall training); same per-frame causal loop as diffusers."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, dim=2)


class VAEStage:
    def __init__(self, vae, cfg: VAEStageConfig):
        self.vae, self.cfg = vae, cfg
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(cfg.train_encoder)

    def trainable(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def loss(self, step: int) -> torch.Tensor:
        c = self.cfg
        gen, rng = step_rng(c.seed, _data_step(step, c.data_steps), salt=1)
        frames, batch = c.frames, c.batch
        if c.long_frames and step >= c.long_from:
            frames = c.long_frames
        if c.longer_frames and step >= c.longer_from:
            frames, batch = c.longer_frames, c.longer_batch
        x = vae_batch(rng, batch, frames, c.crop, world=c.world).to(self.vae.device)
        with torch.set_grad_enabled(c.train_encoder):
            mean = self.vae.encode(x).latent_dist.mean
        z = mean + c.latent_noise * torch.randn(mean.shape, generator=gen).to(mean.device)
        recon = decode_unclamped(self.vae, z)
        phase2 = c.colour_from is not None and step >= c.colour_from
        err = (recon - x).abs() + c.mse_weight * (recon - x).pow(2)
        anchor_weight = c.anchor_weight
        weight = torch.ones_like(x[:, :1])
        if phase2:
            saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
            weight = weight + c.colour_weight * saturation
            anchor_weight = c.colour_anchor_weight
        if c.object_weight or c.edge_weight:
            background = x.flatten(-2).median(dim=-1).values[..., None, None]  # [B,3,T,1,1]
            objects = ((x - background).abs().amax(dim=1, keepdim=True) > 0.25).float()  # [B,1,T,H,W]
            weight = weight * (1 + c.object_weight * objects)
            if c.edge_weight:
                weight = weight * (1 + c.edge_weight * outline(objects))
        if phase2 or c.object_weight or c.edge_weight:
            err = err * weight / weight.mean()
        loss = err.mean() + c.mean_l2 * mean.pow(2).mean()
        if anchor_weight:
            target = c.anchor_scale * latent_colour(x, mean.shape[-1])
            loss = loss + anchor_weight * (mean[:, :3] - target).pow(2).mean()
        return loss


# -- transformer --------------------------------------------------------------------------------------
@dataclass
class TransformerStageConfig:
    block_frames: int = 4
    num_blocks: int = 5
    shift: float = 5.0
    inference_steps: tuple[float, ...] = (1000.0, 937.5, 833.3333, 625.0)
    p_inference: float = 0.5
    context_noise: float = 0.1  # max σ of the noise added to clean context (labelled t = 0)
    p_gap: float = 0.5  # probability of a temporal gap after the sink blocks
    max_gap: int = 40  # latent frames
    sink_blocks: int = 2
    p_drop_first: float = 0.2  # probability that noisy blocks >= 2 do not see clean block 0
    object_weight: float = 0.0  # extra loss weight on latent cells far from the frame's background
    bf16: bool = True
    seed: int = 0
    data_steps: int | None = None  # cycle over this many fixed batches (tests); None = fresh data


def object_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-cell loss weights [B,1,F,h,w] = 1 + strength·d/max(d), d = distance (over channels) of each
    latent cell from the frame's per-channel spatial median (the background). Objects cover a few %
    of a frame, so an unweighted loss is almost all background and the model learns objects last.

    Caveat (measured on the tiny world): the weights depend on the *target*, so the weighted-MSE
    optimum is biased towards "object" — a model trained with them over-draws objects, which then
    grow block after block. Use it to learn objects, then fine-tune unweighted to remove the bias."""
    background = x0.flatten(-2).median(dim=-1).values[..., None, None]  # [B,C,F,1,1]
    dist = (x0 - background).norm(dim=1, keepdim=True)  # [B,1,F,h,w]
    return 1 + strength * dist / (dist.amax(dim=(-2, -1), keepdim=True) + 1e-6)


def teacher_forcing_layout(num_blocks: int, block_frames: int, gap: int = 0, sink_blocks: int = 2,
                           drop_first: bool = False):
    """Frame-level layout ``[clean blocks 0..n-2 | noisy blocks 0..n-1]``.

    Returns (frame_mask [F, F] bool, frame_positions [F] float64) with F = (2n − 1)·B. Noisy block i
    attends clean blocks < i and itself; clean blocks are block-causal. ``gap`` adds that many
    latent frames to the positions of every block >= ``sink_blocks`` (both copies).
    ``drop_first``: noisy blocks >= 2 do not attend clean block 0.
    """
    n, b = num_blocks, block_frames
    fc, fn = (n - 1) * b, n * b
    blk_c, blk_n = torch.arange(fc) // b, torch.arange(fn) // b
    mask = torch.zeros(fc + fn, fc + fn, dtype=torch.bool)
    mask[:fc, :fc] = block_causal_mask(fc, b)
    ctx = blk_c[None, :] < blk_n[:, None]
    if drop_first:
        ctx &= ~((blk_c[None, :] == 0) & (blk_n[:, None] >= 2))
    mask[fc:, :fc] = ctx
    mask[fc:, fc:] = blk_n[None, :] == blk_n[:, None]
    pos_c, pos_n = torch.arange(fc).double(), torch.arange(fn).double()
    pos_c = pos_c + gap * (blk_c >= sink_blocks)
    pos_n = pos_n + gap * (blk_n >= sink_blocks)
    return mask, torch.cat([pos_c, pos_n])


def noise_clip(x0: torch.Tensor, t: torch.Tensor, gen: torch.Generator, block_frames: int):
    """Per-block flow-matching noising. x0 [B,C,F,h,w], t [n_blocks] -> (x_t, target v, t per frame)."""
    eps = torch.randn(x0.shape, generator=gen)
    t_frame = t.repeat_interleave(block_frames)
    sigma = (t_frame / 1000.0).view(1, 1, -1, 1, 1)
    return (1 - sigma) * x0 + sigma * eps, eps - x0, t_frame


class TransformerStage:
    def __init__(self, model, latents: torch.Tensor, text: torch.Tensor, caption_index: torch.Tensor,
                 cfg: TransformerStageConfig):
        """latents [N, C, F, h, w] normalised; text [n_captions, L, text_dim]; caption_index [N]."""
        self.model, self.latents, self.text, self.caption_index, self.cfg = model, latents, text, caption_index, cfg

    def trainable(self) -> dict[str, nn.Module]:
        return {"transformer": self.model}

    def sample(self, step: int):
        c = self.cfg
        gen, rng = step_rng(c.seed, _data_step(step, c.data_steps), salt=2)
        i = int(rng.integers(len(self.latents)))
        n, b = c.num_blocks, c.block_frames
        x0 = self.latents[i : i + 1, :, : n * b].float()
        text = self.text[self.caption_index[i]][None]
        gap = int(rng.integers(1, c.max_gap + 1)) if rng.random() < c.p_gap else 0
        drop = bool(rng.random() < c.p_drop_first)
        t = sample_timesteps(n, gen, c.shift, list(c.inference_steps), c.p_inference)
        x_t, target, t_frame = noise_clip(x0, t, gen, b)
        ctx_sigma = float(rng.uniform(0, c.context_noise))
        clean = x0[:, :, : (n - 1) * b]
        clean = clean + ctx_sigma * torch.randn(clean.shape, generator=gen)
        mask, positions = teacher_forcing_layout(n, b, gap, c.sink_blocks, drop)
        seq = torch.cat([clean, x_t], dim=2)
        timestep = torch.cat([torch.zeros(clean.shape[2]), t_frame])[None]
        weight = object_weights(x0, c.object_weight) if c.object_weight else None
        return seq, timestep, text, positions, mask, target, weight

    def loss(self, step: int) -> torch.Tensor:
        seq, timestep, text, positions, mask, target, weight = self.sample(step)
        fc = seq.shape[2] - target.shape[2]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.model.forward_sequence(seq, timestep, text, positions, mask)
        err = (out[:, :, fc:].float() - target).pow(2)
        if weight is None:
            return err.mean()
        return (err * weight).mean() / weight.mean()


# -- compressor ---------------------------------------------------------------------------------------
@dataclass
class CompressorStageConfig:
    block_frames: int = 4
    shift: float = 5.0
    inference_steps: tuple[float, ...] = (1000.0, 937.5, 833.3333, 625.0)
    p_inference: float = 0.5
    context_noise: float = 0.1
    distill_weight: float = 1.0  # MSE to the frozen model's full-context prediction
    bf16: bool = True
    seed: int = 0
    data_steps: int | None = None  # cycle over this many fixed batches (tests); None = fresh data


def lr_tokens(patch_embedding: nn.Module, lr_latents: torch.Tensor, grid) -> torch.Tensor:
    """The LR branch after its VAE re-encode (what `LRBranch` does with the encoded latents):
    patch embedding, crop to the HR grid, flatten -> [B, N_c, D]."""
    w = patch_embedding.weight
    x = patch_embedding(lr_latents.to(w.device, w.dtype))
    x = x[:, :, : grid[0], : grid[1], : grid[2]]
    return x.flatten(2).transpose(1, 2)


def three_partition_layout(block_tokens: int, n_c: int):
    """Token-level mask for ``[sink (2 blocks) | block 2 | compressed(2) | block 3 | noisy block 4]``.

    - sink blocks: block-causal among themselves;
    - block 2 attends sink + itself; its compressed tokens ride its commit pass: sink + block 2 +
      themselves (block 2 never sees them);
    - block 3 attends sink + block 2 + itself (it was committed while block 2 was recent);
    - noisy block 4 attends sink + compressed(2) + block 3 + itself (block 2's full tokens evicted).
    Returns (mask [N, N] bool, slices dict).
    """
    T = block_tokens
    s = {"sink": slice(0, 2 * T), "b2": slice(2 * T, 3 * T), "comp": slice(3 * T, 3 * T + n_c),
         "b3": slice(3 * T + n_c, 4 * T + n_c), "cur": slice(4 * T + n_c, 5 * T + n_c)}
    n = 5 * T + n_c
    mask = torch.zeros(n, n, dtype=torch.bool)
    blk = torch.arange(2 * T) // T
    mask[s["sink"], s["sink"]] = blk[None, :] <= blk[:, None]
    for rows, cols in [("b2", ("sink", "b2")), ("comp", ("sink", "b2", "comp")), ("b3", ("sink", "b2", "b3")),
                       ("cur", ("sink", "comp", "b3", "cur"))]:
        for col in cols:
            mask[s[rows], s[col]] = True
    return mask, s


class CompressorStage:
    def __init__(self, model, compressor, latents: torch.Tensor, lr_latents: torch.Tensor, text: torch.Tensor,
                 caption_index: torch.Tensor, cfg: CompressorStageConfig):
        """latents [N,C,F,h,w]; lr_latents [N,C,2,h/4,w/4] (normalised LR latents of block 2)."""
        self.model, self.compressor = model, compressor
        self.latents, self.lr_latents, self.text, self.caption_index, self.cfg = (
            latents, lr_latents, text, caption_index, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        b = cfg.block_frames
        h, w = latents.shape[-2:]
        self.grid = compressor.output_grid(b, h, w)
        self.t_c, self.h_c, self.w_c = compressor.centres(b, h, w)  # where the sampler places them (this branch mix)
        _, gh, gw = model.token_grid(1, h, w)
        self.frame_grid = Rope3D.grid(1, gh, gw)
        self.T = b * gh * gw
        self.mask, self.slices = three_partition_layout(self.T, len(self.t_c))

    def trainable(self) -> dict[str, nn.Module]:
        return {"hr": self.compressor.hr}

    def positions(self, frames: torch.Tensor) -> torch.Tensor:
        """Token positions [len(frames)·h·w, 3] of the given latent frame indices."""
        g = self.frame_grid.repeat(len(frames), 1)
        g[:, 0] = frames.double().repeat_interleave(len(self.frame_grid))
        return g

    def sample(self, step: int):
        c, b = self.cfg, self.cfg.block_frames
        gen, rng = step_rng(c.seed, _data_step(step, c.data_steps), salt=3)
        i = int(rng.integers(len(self.latents)))
        x0 = self.latents[i : i + 1, :, : 5 * b].float()
        text = self.text[self.caption_index[i]][None]
        t = sample_timesteps(1, gen, c.shift, list(c.inference_steps), c.p_inference)
        x_t, target, _ = noise_clip(x0[:, :, 4 * b :], t, gen, b)
        clean = x0[:, :, : 4 * b]
        clean = clean + float(rng.uniform(0, c.context_noise)) * torch.randn(clean.shape, generator=gen)
        return clean, x_t, target, t, text, self.lr_latents[i : i + 1].float()

    def loss(self, step: int) -> torch.Tensor:
        c, b, m = self.cfg, self.cfg.block_frames, self.model
        clean, x_t, target, t, text, lr_lat = self.sample(step)
        T, s = self.T, self.slices
        comp_start = 2 * b  # block 2 starts at latent frame 8
        tokens_clean = m.patchify(clean)  # blocks 0..3
        noisy = m.patchify(x_t)
        comp = self.compressor.hr(clean[:, :, 2 * b : 3 * b]) + lr_tokens(m.patch_embedding, lr_lat, self.grid).detach()
        hidden = torch.cat([tokens_clean[:, : 3 * T], comp, tokens_clean[:, 3 * T :], noisy], dim=1)
        frames = torch.arange(5 * b)
        pos_frames = self.positions(frames)
        comp_pos = torch.stack([self.t_c + comp_start, self.h_c, self.w_c], dim=-1).double()
        positions = torch.cat([pos_frames[: 3 * T], comp_pos, pos_frames[3 * T :]])
        timestep = torch.zeros(1, hidden.shape[1])
        timestep[:, s["cur"]] = t
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
            out = m.forward_tokens(hidden, positions, timestep, text, self.mask)
        pred = m.unpatchify(out[:, s["cur"]].float(), b, *x_t.shape[-2:])
        loss = F.mse_loss(pred, target)
        if c.distill_weight:
            with torch.no_grad():  # the frozen model with block 2 at full resolution
                full = torch.cat([tokens_clean, noisy], dim=1)
                keep = torch.ones(hidden.shape[1], dtype=torch.bool)
                keep[s["comp"]] = False
                mask_full = self.mask[keep][:, keep].clone()
                cur = slice(4 * T, 5 * T)
                mask_full[cur, 2 * T : 3 * T] = True  # block 4 sees block 2 in full
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                    out_full = m.forward_tokens(full, pos_frames, timestep[:, keep], text, mask_full)
                ref = m.unpatchify(out_full[:, cur].float(), b, *x_t.shape[-2:])
            loss = loss + c.distill_weight * F.mse_loss(pred, ref)
        return loss
