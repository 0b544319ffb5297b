"""Wan VAE helpers: latent normalisation, block-wise encode, and a streaming decoder.

Latents handed around the library are *normalised* (``(z - mean) / std`` with the VAE's own
``latents_mean`` / ``latents_std``), which is the space the transformer denoises in.
Pixels are ``[B, 3, frames, H, W]`` in ``[-1, 1]``.

Wan's VAE is causal in time: latent frame 0 decodes to 1 pixel frame, every later latent frame
to 4, so ``F`` latent frames give ``4·F − 3`` pixel frames.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from diffusers import AutoencoderKLWan


def _onednn_conv_forward(self, x, weight, bias):
    """float32 on CPU: ATen sends single-sample, few-channel 5-D convolutions to ``slow_conv3d``
    (unfold + GEMM); oneDNN is ~2.8x faster for the VAE's shapes (docs/benchmarks.md)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups,
        )
    return torch.nn.Conv3d._conv_forward(self, x, weight, bias)


def _convs(module: torch.nn.Module) -> list[torch.nn.Conv3d]:
    return [
        m for m in module.modules()
        if isinstance(m, torch.nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    ]


def use_onednn_conv3d(module: torch.nn.Module) -> int:
    """Route ``module``'s zero-padded Conv3d layers to oneDNN on CPU/float32 (no-op elsewhere,
    checked per call). Returns how many layers were routed."""
    convs = _convs(module)
    for m in convs:
        m._conv_forward = types.MethodType(_onednn_conv_forward, m)
    return len(convs)


@contextlib.contextmanager
def conv3d_backend(module: torch.nn.Module, onednn: bool):
    """Temporarily pick the Conv3d path of ``module`` (benchmarks); restores the previous one."""
    convs = _convs(module)
    saved = [m.__dict__.get("_conv_forward") for m in convs]
    for m in convs:
        forward = _onednn_conv_forward if onednn else torch.nn.Conv3d._conv_forward
        m._conv_forward = types.MethodType(forward, m)
    try:
        yield len(convs)
    finally:
        for m, previous in zip(convs, saved):
            if previous is None:
                del m._conv_forward
            else:
                m._conv_forward = previous


def tiny_vae_config(base_dim: int = 8, z_dim: int = 16) -> dict:
    """A small `AutoencoderKLWan` config of the real architecture (0.22 M params at base_dim 8)."""
    return dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )


def pixel_frames(latent_frames: int, first: bool = True) -> int:
    """Pixel frames decoded from ``latent_frames`` latent frames (4F−3 if they start the video)."""
    return 4 * latent_frames - 3 if first else 4 * latent_frames


class WanVAE:
    """Wraps an `AutoencoderKLWan` with normalised-latent encode/decode.

    Safe to share between threads: diffusers' public encode/decode keep their causal feature cache
    on the module itself, so they (and a streaming decoder's reset, which clears it) run under
    ``self.lock``. A `StreamingDecoder` keeps its own cache, so concurrent streams don't collide.
    """

    def __init__(self, vae: AutoencoderKLWan, onednn_cpu_conv: bool = True):
        self.vae = vae
        self.lock = threading.RLock()
        if onednn_cpu_conv:
            use_onednn_conv3d(vae)
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.spatial_ratio = 2 ** len(cfg.temperal_downsample)
        self.temporal_ratio = 2 ** sum(cfg.temperal_downsample)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._mean.to(z)) / self._std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._std.to(z) + self._mean.to(z)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,1+4k,H,W] in [-1,1] -> normalised posterior mean [B,16,1+k,H/8,W/8].

        Frames beyond the last 1+4k boundary are dropped by the VAE; callers must pass 1+4k frames.
        """
        if (pixels.shape[2] - 1) % self.temporal_ratio:
            raise ValueError(
                f"VAE encode needs 1+{self.temporal_ratio}k pixel frames, got {pixels.shape[2]}"
            )
        with self.lock:
            mean = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        return self.normalize(mean.float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Full decode of normalised latents [B,16,F,h,w] -> pixels [B,3,4F-3,H,W]."""
        z = self.denormalize(latents.float()).to(self.device, self.dtype)
        with self.lock:
            return self.vae.decode(z).sample.float()

    def streaming_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes a video block by block, keeping the VAE's causal feature cache between blocks.

    Keeps its *own* feature cache list (not the VAE's ``_feat_map``), so encodes done in between
    (e.g. by the compressor's LR branch) cannot wipe it. ``decode_block`` over consecutive blocks
    equals one full `WanVAE.decode` of their concatenation.
    """

    def __init__(self, vae: WanVAE):
        self.wan = vae
        self.reset()

    def reset(self) -> None:
        vae = self.wan.vae
        with self.wan.lock:
            vae.clear_cache()  # populates the conv count
        self._feat_map = [None] * vae._conv_num
        self.frames_decoded = 0  # latent frames

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,16,F,h,w] -> pixels [B,3,n,H,W]; n = 4F−3 for the first block, else 4F."""
        vae = self.wan.vae
        z = self.wan.denormalize(latents.float()).to(self.wan.device, self.wan.dtype)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            conv_idx = [0]
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_map,
                    feat_idx=conv_idx,
                    first_chunk=self.frames_decoded == 0,
                )
            )
            self.frames_decoded += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).float()
