"""Model geometry for the estimator and the benchmarks: `ModelSpec` (layers, widths, block size,
resolution, dtype), the presets (``tiny``, ``wan-1.3b``) and specs read from a live pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packforcing.configs import TINY, WAN21_T2V_1P3B

#: UMT5-XXL encoder (Wan2.1's text encoder) parameter count: 256,384·4096 embeddings + 24 layers.
UMT5_XXL_PARAMS = 256_384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64) + 4096  # 5.68e9


def _tiny_vae() -> dict:
    from packforcing.vae import tiny_vae_config

    return tiny_vae_config()


@dataclass(frozen=True)
class ModelSpec:
    """Everything the estimate depends on. ``model``: `WanTransformer3DModel` constructor args."""

    name: str
    model: dict
    height: int
    width: int
    fps: int = 16
    block_frames: int = 4
    steps: int = 4
    text_len: int = 512
    dtype: str = "bfloat16"
    vae_spatial: int = 8
    batch: int = 1
    vae: dict | None = None  # AutoencoderKLWan constructor args (None = diffusers defaults = Wan2.1)
    compressor_mode: str = "both"
    text_encoder_params: int = 0  # parameters of the text encoder (memory only)
    vae_dtype: str = "float32"  # the library loads the VAE in float32

    # -- derived ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.model["num_attention_heads"] * self.model["attention_head_dim"]

    @property
    def layers(self) -> int:
        return self.model["num_layers"]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_spatial, self.width // self.vae_spatial

    @property
    def frame_hw(self) -> tuple[int, int]:
        _, ph, pw = self.model.get("patch_size", (1, 2, 2))
        h, w = self.latent_hw
        return h // ph, w // pw

    @property
    def tokens_per_frame(self) -> int:
        return self.geometry().tokens_per_frame

    @property
    def tokens_per_block(self) -> int:
        return self.geometry().tokens_per_block

    @property
    def compressed_tokens(self) -> int:
        from packforcing.compressor import Compressor

        return Compressor.num_tokens(self.block_frames, *self.latent_hw)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers (184,320 B for Wan2.1-1.3B in bf16)."""
        return 2 * self.layers * self.dim * self.element_size * self.batch

    def geometry(self):
        from packforcing.cache import CacheGeometry

        m = self.model
        return CacheGeometry(m["num_layers"], m["num_attention_heads"], m["attention_head_dim"], self.block_frames,
                             self.frame_hw, batch_size=self.batch, dtype=getattr(torch, self.dtype))

    def num_blocks(self, seconds: float) -> int:
        """Same rule as `Pipeline.num_blocks`: round(seconds·fps / (4·block_frames)), at least 1."""
        return max(1, round(float(seconds) * self.fps / (4 * self.block_frames)))

    def pixel_frames(self, num_blocks: int) -> int:
        return 4 * self.block_frames * num_blocks - 3


PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", dict(TINY), height=128, width=128, text_len=32, dtype="float32", vae=_tiny_vae()),
    "wan-1.3b": ModelSpec("wan-1.3b", dict(WAN21_T2V_1P3B), height=480, width=832, text_len=512, dtype="bfloat16",
                          vae=None, text_encoder_params=UMT5_XXL_PARAMS),
}


def spec_from_pipeline(pipe, name: str | None = None) -> ModelSpec:
    """The `ModelSpec` of a built `Pipeline` (what the app holds)."""
    cfg = pipe.transformer.config
    keys = {f for f in WAN21_T2V_1P3B}
    model = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg).items() if k in keys}
    text_len = getattr(pipe.text_encoder, "max_length", 512)
    vae_cfg = {k: v for k, v in dict(pipe.vae.vae.config).items() if not k.startswith("_")}
    text_params = 0
    enc = getattr(pipe.text_encoder, "model", None)
    if isinstance(enc, torch.nn.Module):
        text_params = sum(p.numel() for p in enc.parameters())
    return ModelSpec(
        name or pipe.name, model, pipe.height, pipe.width, fps=pipe.fps, block_frames=pipe.block_frames,
        steps=len(pipe.sampler.denoising_steps), text_len=int(text_len),
        dtype=str(pipe.transformer.dtype).removeprefix("torch."), vae_spatial=pipe.vae.spatial_ratio,
        vae=vae_cfg, compressor_mode=pipe.compressor.mode, text_encoder_params=text_params,
        vae_dtype=str(pipe.vae.dtype).removeprefix("torch."),
    )


def resolve_spec(config) -> ModelSpec:
    """A preset name, a `ModelSpec`, a `Pipeline`, or a dict of `ModelSpec` fields."""
    if isinstance(config, ModelSpec):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose from {sorted(PRESETS)}")
        return PRESETS[config]
    if isinstance(config, dict):
        return ModelSpec(**config)
    if hasattr(config, "transformer") and hasattr(config, "vae"):
        return spec_from_pipeline(config)
    raise TypeError(f"cannot make a ModelSpec from {type(config).__name__}")
