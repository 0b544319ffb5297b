"""Cache geometry: the shapes every store preallocates, and the unit conversions.

Units: *frames* are latent frames, *blocks* are groups of ``block_frames`` latent frames, *tokens*
are patch tokens (``tokens_per_frame`` per latent frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
