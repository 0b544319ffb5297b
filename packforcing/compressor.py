"""PackForcing dual-branch compressor (paper Fig. 2b/2d): one block of clean latents -> N_c tokens.

A block of ``F`` latent frames of ``h × w`` (normalised latents, 16 channels) becomes a grid of
``ceil(F/2) × floor(h/8) × floor(w/8)`` hidden tokens of the transformer width ``D`` — for the
full-size Wan2.1 block (4 × 60 × 104 = 6,240 patch tokens) that is 2 × 7 × 13 = 182 tokens, ≈32×.

- **HR branch** (trained): a 5-layer 3D CNN on the latents.
- **LR branch** (no trainable weights of its own): pixels → 3D average pool (2× time, 4× space)
  → frozen VAE encode → the transformer's own ``patch_embedding``.
- ``mode="both"`` adds the two; ``mode="lr"`` is zero-shot PackForcing (nothing to train).
"""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F_
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .vae import WanVAE, pixel_frames

PAPER_WIDTHS = (32, 128, 512, 2048)  # for D = 1536 (Wan2.1-1.3B)
PAPER_DIM = 1536
MODES = ("hr", "lr", "both")
_METADATA_KEY = "packforcing_compressor"

# Our kernel/padding choice (the paper gives only strides): (kernel, stride, padding) per conv.
# Time: k3 s2 p1 maps F -> ceil(F/2). Space: k4 s2 p1 maps n -> floor(n/2), three times floor(n/8).
HR_LAYERS = (
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((3, 4, 4), (1, 2, 2), (1, 1, 1)),
    ((3, 4, 4), (1, 2, 2), (1, 1, 1)),
    ((3, 4, 4), (1, 2, 2), (1, 1, 1)),
    ((1, 1, 1), (1, 1, 1), (0, 0, 0)),
)


def scaled_widths(model_dim: int, min_width: int = 8) -> Tuple[int, ...]:
    """HR hidden widths for a model of width ``model_dim``.

    Rule: ``w_i = max(min_width, 8·round(paper_i · D / 1536 / 8))``, i.e. the paper's
    (32, 128, 512, 2048) scaled by D/1536 and rounded to multiples of 8, floored at ``min_width``.
    D=1536 gives the paper widths exactly; D=128 (``TINY``) gives (8, 8, 40, 168).
    """
    return tuple(max(min_width, 8 * round(w * model_dim / PAPER_DIM / 8)) for w in PAPER_WIDTHS)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def hr_token_grid(latent_frames: int, h: int, w: int) -> Tuple[int, int, int]:
    """Output grid ``(t, gh, gw)`` of `HRBranch` for a block of ``latent_frames × h × w`` latents."""
    size = [latent_frames, h, w]
    for k, s, p in HR_LAYERS:
        size = [_conv_out(n, k[i], s[i], p[i]) for i, n in enumerate(size)]
    return tuple(size)


def lr_token_grid(
    latent_frames: int, h: int, w: int, *, spatial_ratio: int = 8, temporal_ratio: int = 4,
    patch_size: Sequence[int] = (1, 2, 2),
) -> Tuple[int, int, int]:
    """Raw LR-branch grid ``(t, gh, gw)`` (before alignment to HR), by pipeline arithmetic.

    pixels ``s·h`` → pool 4× → VAE (each 2× stage is pad(0,1)+conv k3 s2: floor) → patch (floor).
    Time: ``ceil(F/2)`` latents by construction (see `LRBranch`).
    """
    t = math.ceil(latent_frames / 2) // patch_size[0]
    gh = (spatial_ratio * h // 4) // spatial_ratio // patch_size[1]
    gw = (spatial_ratio * w // 4) // spatial_ratio // patch_size[2]
    return t, gh, gw


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, D, t, gh, gw] -> [B, t·gh·gw, D]


class HRBranch(nn.Module):
    """Trainable 3D CNN (paper Fig. 2d): latents [B,16,F,h,w] -> tokens [B, N_c, D].

    Convs 16→w1 s(2,1,1) → w2 s(1,2,2) → w3 s(1,2,2) → w4 s(1,2,2) → D s(1,1,1), SiLU between;
    kernels/padding from `HR_LAYERS`. Grid ``(ceil(F/2), floor(h/8), floor(w/8))``.
    """

    def __init__(self, model_dim: int, widths: Optional[Sequence[int]] = None, in_channels: int = 16):
        super().__init__()
        widths = tuple(widths) if widths is not None else scaled_widths(model_dim)
        if len(widths) != 4:
            raise ValueError(f"HRBranch needs 4 hidden widths, got {widths}")
        chans = (in_channels, *widths, model_dim)
        layers = []
        for i, (k, s, p) in enumerate(HR_LAYERS):
            layers.append(nn.Conv3d(chans[i], chans[i + 1], k, stride=s, padding=p))
            if i < len(HR_LAYERS) - 1:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        return _to_tokens(self.net(latents.to(w.device, w.dtype)))


class LRBranch:
    """Training-free LR branch: latents [B,16,F,h,w] -> tokens [B, N_c, D] (no weights of its own).

    Recipe (temporal grid ``ceil(F/2)``, matching HR; ``T`` = VAE temporal ratio, 4 for Wan):
    1. pixels of the block: passed in (``T·F`` frames, ``T·F−T+1`` for the first block of the
       video), else ``vae.decode(latents)`` (decoded alone, i.e. ``T·F−T+1`` frames);
    2. left-pad by repeating the first frame to ``2T·ceil(F/2)`` frames;
    3. avg-pool 2× time, 4× space → ``T·ceil(F/2)`` frames of ``H/4 × W/4``;
    4. prepend a copy of the first pooled frame as warm-up (the causal VAE encodes frame 0 alone)
       → encode ``1 + T·ceil(F/2)`` frames → drop the first latent → ``ceil(F/2)`` latents;
    5. the transformer's ``patch_embedding`` → tokens; the spatial grid is cropped to the HR grid
       if it is larger by one (it matches for pixel sizes that are multiples of the VAE ratio).
    """

    @staticmethod
    def pool_pixels(pixels: torch.Tensor, latent_frames: int, temporal_ratio: int) -> torch.Tensor:
        """[B,3,n,H,W] -> [B,3,1+T·ceil(F/2),H/4,W/4] (padded, pooled, warm-up frame prepended)."""
        target = 2 * temporal_ratio * math.ceil(latent_frames / 2)
        n = pixels.shape[2]
        if n > target:
            raise ValueError(f"LR branch: {n} pixel frames exceed {target} for {latent_frames} latent frames")
        pixels = torch.cat([pixels[:, :, :1].expand(-1, -1, target - n, -1, -1), pixels], dim=2)
        pooled = F_.avg_pool3d(pixels.float(), kernel_size=(2, 4, 4))  # [B,3,T·ceil(F/2),H/4,W/4]
        return torch.cat([pooled[:, :, :1], pooled], dim=2)  # + warm-up frame

    def __call__(self, latents, vae, patch_embedding, grid, pixels=None, first_block=False) -> torch.Tensor:
        if vae is None or patch_embedding is None:
            missing = [n for n, v in (("vae", vae), ("patch_embedding", patch_embedding)) if v is None]
            raise ValueError(f"the LR branch needs {' and '.join(missing)} (pass them to forward)")
        if not isinstance(vae, WanVAE):
            vae = WanVAE(vae)
        f, h, w = latents.shape[2:]
        if pixels is None:
            pixels = vae.decode(latents)  # [B,3,T·F−T+1,H,W]
        else:
            expect = (pixel_frames(f, first_block), vae.spatial_ratio * h, vae.spatial_ratio * w)
            if tuple(pixels.shape[2:]) != expect:
                raise ValueError(f"LR branch: pixels {tuple(pixels.shape)} do not match {expect} "
                                 f"for latents {tuple(latents.shape)} (first_block={first_block})")
        pooled = self.pool_pixels(pixels, f, vae.temporal_ratio)
        z = vae.encode(pooled)[:, :, 1:]  # [B,16,ceil(F/2),h/4,w/4], warm-up latent dropped
        wgt = patch_embedding.weight
        x = patch_embedding(z.to(wgt.device, wgt.dtype))  # [B,D,t,gh',gw']
        got, want = tuple(x.shape[2:]), tuple(grid)
        if got != want:
            if got[0] != want[0] or any(not 0 <= g - t <= 1 for g, t in zip(got[1:], want[1:])):
                raise ValueError(f"LR branch grid {got} cannot be aligned to the HR grid {want}")
            x = x[:, :, :, : want[1], : want[2]]
        return _to_tokens(x)


class Compressor(nn.Module):
    """Dual-branch block compressor: latents [B,16,F,h,w] -> tokens [B, N_c, D], fused by addition.

    Args:
        model_dim: transformer width ``D``.
        mode: ``"hr"`` (CNN only), ``"lr"`` (zero-shot, no weights) or ``"both"`` (sum).
        widths: HR hidden widths; default `scaled_widths(model_dim)`.
    """

    def __init__(self, model_dim: int, mode: str = "both", widths: Optional[Sequence[int]] = None,
                 in_channels: int = 16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown compressor mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.mode = mode
        self.model_dim = model_dim
        self.in_channels = in_channels
        self.widths = tuple(widths) if widths is not None else scaled_widths(model_dim)
        self.hr = HRBranch(model_dim, self.widths, in_channels) if mode in ("hr", "both") else None
        self.lr = LRBranch()

    @property
    def config(self) -> dict:
        return dict(model_dim=self.model_dim, mode=self.mode, widths=list(self.widths),
                    in_channels=self.in_channels)

    @staticmethod
    def output_grid(latent_frames: int, h: int, w: int) -> Tuple[int, int, int]:
        """``(t, gh, gw)`` of the compressed tokens (same for all modes)."""
        return hr_token_grid(latent_frames, h, w)

    @classmethod
    def num_tokens(cls, latent_frames: int, h: int, w: int) -> int:
        return math.prod(cls.output_grid(latent_frames, h, w))

    @classmethod
    def compression_ratio(cls, latent_frames: int, h: int, w: int, patch: int = 2) -> float:
        """Patch tokens of the block / compressed tokens (≈32 at full size)."""
        return latent_frames * (h // patch) * (w // patch) / cls.num_tokens(latent_frames, h, w)

    @classmethod
    def token_centres(cls, latent_frames: int, h: int, w: int, patch: int = 2, mode: str = "lr"):
        """Centre of the region each compressed token covers, as float tensors ``[N_c]`` each.

        Returns ``(t_pos, h_pos, w_pos)``: ``t_pos`` in latent frames from the block start;
        ``h_pos``/``w_pos`` in patch-token units (cell h' covers rows [4h', 4h'+4) ∩ [0, h/patch)),
        the mean of the covered integer indices. Time depends on the branch: the LR branch pools
        frames [2t', 2t'+2) ∩ [0, F) (centre ``2t'+0.5``, the mean of the covered frames); the HR
        branch's first convolution (k3, s2, p1) is centred at frame ``2t'``; ``both`` (the sum of
        the two) sits at the mean of the two centres.
        """
        if mode not in ("lr", "hr", "both"):
            raise ValueError(f"unknown compressor mode {mode!r}; choose from hr, lr, both")
        t, gh, gw = cls.output_grid(latent_frames, h, w)

        def centres(n_cells, step, limit):
            return torch.tensor([(i * step + min(i * step + step, limit) - 1) / 2 for i in range(n_cells)])

        lr_t, hr_t = centres(t, 2, latent_frames), torch.arange(t, dtype=torch.float32) * 2
        ct = {"lr": lr_t, "hr": hr_t, "both": (lr_t + hr_t) / 2}[mode]
        ch, cw = centres(gh, 4, h // patch), centres(gw, 4, w // patch)
        tt, hh, ww = torch.meshgrid(ct, ch, cw, indexing="ij")  # flatten order t, h, w
        return tt.flatten(), hh.flatten(), ww.flatten()

    def centres(self, latent_frames: int, h: int, w: int, patch: int = 2):
        """`token_centres` for this compressor's branch (``self.mode``)."""
        return self.token_centres(latent_frames, h, w, patch, mode=self.mode)

    def forward(self, latents: torch.Tensor, *, pixels: Optional[torch.Tensor] = None, vae=None,
                patch_embedding: Optional[nn.Module] = None, first_block: bool = False) -> torch.Tensor:
        """Normalised latents [B,16,F,h,w] -> tokens [B, N_c, D].

        ``pixels`` [B,3,n,H,W] (already decoded block, optional), ``vae`` (`WanVAE` or
        `AutoencoderKLWan`) and ``patch_embedding`` (the transformer's) are needed by the LR branch.
        """
        grid = self.output_grid(*latents.shape[2:])
        out = None
        if self.hr is not None:
            out = self.hr(latents)
        if self.mode in ("lr", "both"):
            lr = self.lr(latents, vae, patch_embedding, grid, pixels=pixels, first_block=first_block)
            out = lr if out is None else out + lr.to(out)
        return out

    def save(self, path: str) -> None:
        """Write weights (safetensors) with the constructor args as JSON metadata."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(self.config)})

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> "Compressor":
        """Inverse of `save`; a file of the wrong format or shapes raises ValueError naming it."""
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path}: not a PackForcing compressor file (no {_METADATA_KEY!r} metadata)")
        model = cls(**json.loads(meta))
        try:
            model.load_state_dict(load_file(str(path), device=map_location), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not match compressor config {model.config}: {e}") from e
        return model.to(map_location)
