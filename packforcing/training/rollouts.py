"""The clips the compressor is distilled from: the model's own rollouts, block by block.

A `Rollout` holds per block the clean latents and the compressor's LR tokens, and the prompt's
embeddings; `make_rollouts` rolls prompts out with the ``full`` cache; `policy_for` is the
PackForcing planner of a pipeline's geometry. Used by `training.distill` and `training.memory_distill`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..cache import make_policy
from ..compressor import Compressor

MAX_ROLLOUT_SECONDS = 5.0  # the paper's training clips


@dataclasses.dataclass
class Rollout:
    """One clip: per block clean latents [1, C, B_f, h, w] and LR tokens [1, N_c, D] (None without an
    LR branch); the prompt's embeddings [1, L, text_dim]. ``returns``: for a clip in which an object
    leaves and comes back (`training.memory_distill`), the (current block, mid blocks that show the
    object) pairs at which it returns; samples of such a clip are drawn there, sink left out."""

    latents: list[torch.Tensor]
    lr_tokens: list[torch.Tensor | None]
    text: torch.Tensor
    returns: tuple[tuple[int, tuple[int, ...]], ...] = ()


@torch.no_grad()
def make_rollouts(pipe, compressor: Compressor, prompts: list[str], seconds: float, seed: int = 0) -> list[Rollout]:
    """Roll out every prompt once with the ``full`` cache (seed ``seed + i``)."""
    model = pipe.transformer
    out = []
    for i, prompt in enumerate(prompts):
        latents, lr = [], []
        for block in pipe.stream(prompt, seconds, policy="full", seed=seed + i):
            x0 = block.latents.to(model.device)
            latents.append(x0)
            lr.append(None if compressor.mode == "hr" else compressor.lr(
                x0, pipe.vae, model.patch_embedding, compressor.output_grid(*x0.shape[2:]),
                pixels=block.pixels, first_block=block.index == 0).detach())
        out.append(Rollout(latents, lr, pipe.encode_prompt(prompt)))
    return out


def policy_for(pipe, compressor: Compressor, top_k: int, **options):
    """The PackForcing planner for the pipeline's geometry (pure: no tensors are allocated)."""
    offsets = compressor.centres(pipe.block_frames, *pipe.latent_hw)[0]
    return make_policy("packforcing", pipe.geometry(), compressed_t_offsets=offsets, **{**options, "top_k": top_k})


__all__ = ["MAX_ROLLOUT_SECONDS", "Rollout", "make_rollouts", "policy_for"]
