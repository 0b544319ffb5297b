"""3D rotary position embedding of Wan2.1, for arbitrary (fractional) positions.

Wan splits ``head_dim`` into a temporal, a height and a width part:
``h_dim = w_dim = 2·⌊head_dim/6⌋`` and ``t_dim = head_dim − h_dim − w_dim`` (128 → 44/42/42, i.e.
22/21/21 complex pairs). Channels are *interleaved* pairs ``(x[2i], x[2i+1])`` and the temporal
pairs come first, so channels ``[0, t_dim)`` carry time.

Unlike diffusers' `WanRotaryPosEmbed` (an integer table of 1,024 positions starting at 0), cos/sin
are computed on the fly in float32 from any position, so a rollout never runs off a table and
compressed tokens can sit at the fractional centre of the region they cover. Because a rotation
composes additively, ``R(p)·R(δ) = R(p + δ)``: `rotate_temporal` moves already-rotated keys to a
new temporal position without touching the spatial channels.
"""

from __future__ import annotations

import torch


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    """(t_dim, h_dim, w_dim) channel counts, Wan's rule."""
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


class Rope3D:
    """Computes cos/sin for token positions ``(t, h, w)`` and applies/shift rotations.

    Positions are in latent frames (t) and patch-token rows/columns (h, w).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.head_dim = head_dim
        self.t_dim, self.h_dim, self.w_dim = split_head_dim(head_dim)

        def inv_freq(dim: int) -> torch.Tensor:  # [dim/2], float64 like diffusers, cast later
            return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

        self.freq_t, self.freq_h, self.freq_w = inv_freq(self.t_dim), inv_freq(self.h_dim), inv_freq(self.w_dim)

    # ------------------------------------------------------------------ positions
    @staticmethod
    def grid(frames: int, height: int, width: int, t_start: float = 0.0) -> torch.Tensor:
        """Positions [frames·height·width, 3] (t, h, w) of a token grid, t-major like Wan's flatten."""
        t = torch.arange(frames, dtype=torch.float64) + t_start
        h = torch.arange(height, dtype=torch.float64)
        w = torch.arange(width, dtype=torch.float64)
        tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
        return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N, 3] -> rotation angles [N, head_dim/2] (float64)."""
        positions = positions.to(torch.float64)
        return torch.cat(
            [
                positions[:, 0:1] * self.freq_t.to(positions.device),
                positions[:, 1:2] * self.freq_h.to(positions.device),
                positions[:, 2:3] * self.freq_w.to(positions.device),
            ],
            dim=-1,
        )

    def cos_sin(self, positions: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N, 3] -> (cos, sin), each float32 [N, head_dim/2] (one value per pair)."""
        ang = self.angles(positions)
        return ang.cos().float().to(device), ang.sin().float().to(device)

    # ------------------------------------------------------------------ rotations
    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of x [..., N, heads, d] (or any [..., d] broadcasting with
        cos/sin [..., d/2]) by the given angles. Computes in float32, returns x's dtype."""
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)

    def apply_tokens(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, N, heads, d] with cos/sin [N, d/2]."""
        return self.apply(x, cos[:, None, :], sin[:, None, :])

    def rotate_temporal_(self, keys: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
        """Shift the temporal position of already-rotated keys **in place** by ``delta`` frames.

        keys: [B, heads, N, d] (the cache layout); delta: scalar or [N] (per token).
        Only channels ``[0, t_dim)`` change; spatial channels are untouched.
        """
        delta = torch.as_tensor(delta, dtype=torch.float64, device=keys.device)
        if delta.ndim == 0:
            if float(delta) == 0.0:
                return keys
            delta = delta.expand(keys.shape[-2])
        ang = delta[:, None] * self.freq_t.to(keys.device)  # [N, t_dim/2]
        cos, sin = ang.cos().float(), ang.sin().float()
        temporal = keys[..., : self.t_dim]
        temporal.copy_(self.apply(temporal, cos, sin))
        return keys
