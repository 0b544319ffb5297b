"""Cache-free block-by-block sampling for training probes and self-generated training context.

`sample_blocks` generates a clip block by block with one masked forward per Euler step over
``[clean blocks 0..i-1 | noisy block i]`` (the layout `tests/test_model.py` proves equal to cached
chunked generation), with optional classifier-free guidance (conditional and unconditional rows in
one batch; the unconditional text is all zeros). It needs no cache, so it can probe a checkpoint
during training. `denoise_context` is the cheap self-generated context of the v2 recipe: one
forward over noised ground-truth blocks (Diffusion-Forcing layout) gives the model's own x0 guess.
"""

from __future__ import annotations

import torch

from ..model import block_causal_mask


def guided_velocity(model, seq, timestep, text, positions, mask, guidance: float):
    """Flow prediction; with guidance > 1, v_u + g·(v_c − v_u) from one batch of [cond; uncond]."""
    if guidance == 1.0:
        return model.forward_sequence(seq, timestep, text, positions, mask)
    b = seq.shape[0]
    out = model.forward_sequence(torch.cat([seq, seq]), torch.cat([timestep, timestep]),
                                 torch.cat([text, torch.zeros_like(text)]), positions, mask)
    cond, uncond = out[:b], out[b:]
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_blocks(model, text: torch.Tensor, num_blocks: int, latent_hw: tuple[int, int],
                  timesteps: list[float], guidance: float = 1.0, block_frames: int = 4,
                  generator: torch.Generator | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
    """Euler flow-ODE sampling, t = timesteps[0] .. timesteps[-1] -> 0, block by block.

    text [B, L, D]; ``context``: optional clean latents [B, 16, k·block_frames, h, w] the rollout
    continues from (e.g. ground truth, for teacher-forced probes); returns normalised latents
    [B, 16, (k + num_blocks)·block_frames, h, w] (context included)."""
    b = text.shape[0]
    h, w = latent_hw
    device = next(model.parameters()).device
    clean = torch.zeros(b, model.config.in_channels, 0, h, w, device=device) if context is None else context.to(device)
    if clean.shape[2] % block_frames:
        raise ValueError(f"context has {clean.shape[2]} latent frames, not a multiple of {block_frames}")
    ts = [float(t) for t in timesteps] + [0.0]
    for _ in range(num_blocks):
        i = clean.shape[2] // block_frames
        x = torch.randn(b, model.config.in_channels, block_frames, h, w, generator=generator).to(device)
        frames = (i + 1) * block_frames
        mask = block_causal_mask(frames, block_frames)
        positions = torch.arange(frames, dtype=torch.float64)
        for t, t_next in zip(ts[:-1], ts[1:]):
            seq = torch.cat([clean, x], dim=2)
            timestep = torch.cat([torch.zeros(b, clean.shape[2]), torch.full((b, block_frames), t)], dim=1).to(device)
            v = guided_velocity(model, seq, timestep, text, positions, mask, guidance)[:, :, -block_frames:]
            x = x + (t_next - t) / 1000.0 * v  # x_t = (1-σ)x0 + σε: dx/dσ = v
        clean = torch.cat([clean, x], dim=2)
    return clean


@torch.no_grad()
def denoise_context(model, x0: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor, positions: torch.Tensor,
                    generator: torch.Generator, block_frames: int = 4) -> torch.Tensor:
    """The model's own one-step guess of clean context blocks: noise each block of x0
    [B, C, F, h, w] to its σ (sigma [B, n_blocks] in [0, 1]), one block-causal forward, x0 = x_t − σ·v."""
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    sig = sigma.repeat_interleave(block_frames, dim=1).to(x0.device)  # [B, F]
    s5 = sig[:, None, :, None, None]
    x_t = (1 - s5) * x0 + s5 * eps
    mask = block_causal_mask(x0.shape[2], block_frames)
    v = model.forward_sequence(x_t, sig * 1000.0, text, positions, mask).float()
    return x_t - s5 * v
