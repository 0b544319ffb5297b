"""The cache-policy interface shared by every policy.

Lifecycle for one video (the sampler drives it, the model's attention processor calls into it)::

    policy.reset(max_blocks)
    for block in range(num_blocks):
        t0 = policy.begin_block(block)          # temporal RoPE start of the current block (latent frames)
        for step in range(num_steps + 1):       # denoising steps, then the clean commit pass
            policy.begin_step(step)
            ... each layer's attn1: K, V = policy.context_for(layer, q, k, v)
        policy.commit()                          # the current block joins the history

Tensors: queries/keys/values arrive as ``[B, N, heads, head_dim]`` (tokens of the current block,
already rotated); views are returned as ``[B, heads, T, head_dim]`` (SDPA layout). Units: *frames*
are latent frames, *blocks* are groups of ``block_frames`` latent frames, *tokens* are patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rope import Rope3D
from ..trace import NullRecorder

PARTITIONS = ("sink", "mid_archive", "mid_selected", "recent", "current")


@dataclass(frozen=True)
class CacheGeometry:
    """Shapes a cache must hold. ``frame_hw`` is the patch-token grid of one latent frame."""

    num_layers: int
    num_heads: int
    head_dim: int
    block_frames: int
    frame_hw: tuple[int, int]
    batch_size: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_hw[0] * self.frame_hw[1]

    @property
    def tokens_per_block(self) -> int:
        return self.block_frames * self.tokens_per_frame

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers, in bytes (184,320 for Wan2.1-1.3B in bf16)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_heads * self.head_dim * elem * self.batch_size

    def frames_to_blocks(self, frames: int, what: str) -> int:
        """Convert a frame count that must be a whole number of blocks; clear error otherwise."""
        if frames < 0:
            raise ValueError(f"{what} must be >= 0 latent frames, got {frames}")
        if frames % self.block_frames:
            raise ValueError(
                f"{what}={frames} latent frames is not a multiple of the block size "
                f"({self.block_frames} latent frames)"
            )
        return frames // self.block_frames


def allocate_kv(geometry: CacheGeometry, tokens: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Preallocated K and V buffers [layers, B, heads, tokens, head_dim], written in place."""
    g = geometry
    shape = (g.num_layers, g.batch_size, g.num_heads, tokens, g.head_dim)
    device = g.device if device is None else device
    return torch.zeros(shape, dtype=g.dtype, device=device), torch.zeros(shape, dtype=g.dtype, device=device)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads, d] -> [B, heads, N, d]."""
    return x.transpose(1, 2)


class CachePolicy:
    """Base class: bookkeeping, occupancy reporting, and the method names the model calls."""

    name = "base"
    compresses = False  # True if the policy wants compressed tokens at commit

    def __init__(self, geometry: CacheGeometry, recorder=None):
        self.geometry = geometry
        self.rope = Rope3D(geometry.head_dim)
        self.recorder = recorder if recorder is not None else NullRecorder()
        self.block_index = -1
        self.step = 0
        self.committing = False

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self, max_blocks: int) -> None:
        raise NotImplementedError

    def begin_block(self, block_index: int) -> float:
        raise NotImplementedError

    def begin_step(self, step: int, commit: bool = False) -> None:
        """``commit``: the clean pass at t = 0 that writes the block's K/V before `commit`."""
        self.step = step
        self.committing = commit

    def context_for(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def needs_compression(self, block_index: int) -> bool:
        return False

    def release(self) -> None:
        """Free the buffers (a Stop or an error ends the run)."""
        for name in list(vars(self)):
            if isinstance(getattr(self, name), torch.Tensor):
                setattr(self, name, None)

    # -- reporting ---------------------------------------------------------------------------
    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent selecting and re-rotating in the current block (0 for policies that don't)."""
        return {"select": getattr(self, "_select_seconds", 0.0), "rope": getattr(self, "_rope_seconds", 0.0)}

    def occupancy(self) -> dict[str, int]:
        """Tokens per layer in each partition (see `PARTITIONS`)."""
        raise NotImplementedError

    def attended_tokens(self) -> int:
        occ = self.occupancy()
        return occ["sink"] + occ["mid_selected"] + occ["recent"] + occ["current"]

    def kv_tokens(self) -> int:
        """Tokens per layer whose K/V are stored (history plus the current block).

        ``mid_selected`` is the attended subset of ``mid_archive`` (the trace's convention), so it
        is not added; a policy that keeps the selection as a separate copy overrides this."""
        occ = self.occupancy()
        return occ["sink"] + occ["mid_archive"] + occ["recent"] + occ["current"]

    def kv_bytes(self) -> int:
        return self.kv_tokens() * self.geometry.bytes_per_token

    def budget_tokens(self) -> int | None:
        """Upper bound of `kv_tokens` at any length (None = unbounded)."""
        return None

    def _record_occupancy(self, layer: int) -> None:
        if not self.recorder.enabled:
            return
        per_layer = self.geometry.bytes_per_token // self.geometry.num_layers
        for partition, tokens in self.occupancy().items():
            self.recorder.occupancy(self.block_index, self.step, layer, partition, tokens, tokens * per_layer)
