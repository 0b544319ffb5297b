"""The embedded "tiny world" model: trained here (``python -m packforcing.train all``), shipped in
``assets/tiny-world/``, loaded offline in about a second.

Directory layout (all weights safetensors, configs JSON)::

    tiny_world.json                      pipeline settings (resolution, fps, sampler) + training notes
    transformer/config.json              CausalWanTransformer config
    transformer/model.safetensors
    vae/config.json                      AutoencoderKLWan config (latents_mean/std = data statistics)
    vae/diffusion_pytorch_model.safetensors
    text/tokenizer/…, text/text_encoder/…  TinyTextEncoder (word-level tokenizer, frozen UMT5)
    compressor.safetensors               PackForcing compressor (HR branch trained; mode "both")

``load_tiny_world()`` returns a ready `Pipeline`; see docs/tiny_world.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY_WORLD_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-world"
PIPELINE_NAME = "tiny-world (trained here)"
MANIFEST = "tiny_world.json"


def save_tiny_world(path: str | os.PathLike, transformer, vae, text_encoder, compressor, settings: dict) -> Path:
    """Write the directory layout above. ``vae`` is an `AutoencoderKLWan` (stats in its config);
    ``settings``: height, width, fps, block_frames, denoising_steps, shift, name, notes…"""
    path = Path(path)
    (path / "transformer").mkdir(parents=True, exist_ok=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.config.items()
              if not k.startswith("_")}
    (path / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    save_file(tensors, str(path / "transformer" / "model.safetensors"))
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save(path / "text")
    compressor.save(path / "compressor.safetensors")
    (path / MANIFEST).write_text(json.dumps(settings, indent=2))
    return path


def load_tiny_world(path: str | os.PathLike = TINY_WORLD_DIR, device: str | torch.device = "cpu"):
    """Load the exported tiny-world model into a `Pipeline` (offline, no downloads).

    Raises FileNotFoundError naming the missing file if ``path`` is not a tiny-world directory.
    """
    from diffusers import AutoencoderKLWan

    from .compressor import Compressor
    from .model import CausalWanTransformer
    from .pipeline import Pipeline
    from .sampler import SamplerConfig
    from .text import TinyTextEncoder
    from .vae import WanVAE

    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: not a tiny-world model directory "
                                f"(build it with `python -m packforcing.train all --export {path}`)")
    settings = json.loads(manifest.read_text())
    config = json.loads((path / "transformer" / "config.json").read_text())
    config["patch_size"] = tuple(config["patch_size"])
    transformer = CausalWanTransformer(**config)
    transformer.load_state_dict(load_file(str(path / "transformer" / "model.safetensors")), strict=True)
    transformer = transformer.to(device).eval()
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    vae_config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    vae_model = AutoencoderKLWan(**vae_config)
    vae_model.load_state_dict(load_file(str(path / "vae" / "diffusion_pytorch_model.safetensors")), strict=True)
    vae = WanVAE(vae_model.to(device).eval())
    text = TinyTextEncoder.load(path / "text").to(device)
    compressor = Compressor.load(str(path / "compressor.safetensors"), map_location=str(device))
    sampler = SamplerConfig(block_frames=int(settings["block_frames"]),
                            denoising_steps=tuple(settings["denoising_steps"]), shift=float(settings["shift"]),
                            solver=settings.get("solver", "renoise"),
                            guidance_scale=float(settings.get("guidance_scale", 1.0)))
    return Pipeline(transformer, vae, text, compressor, height=int(settings["height"]), width=int(settings["width"]),
                    fps=int(settings["fps"]), sampler=sampler, name=settings.get("name", PIPELINE_NAME))


def tiny_world_name(path: str | os.PathLike = TINY_WORLD_DIR) -> str | None:
    """Which tiny world (``"v1"``, ``"v2"``) the model directory was trained on; None if there is none."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get("world", "v1")


def has_tiny_world(path: str | os.PathLike = TINY_WORLD_DIR) -> bool:
    return (Path(path) / MANIFEST).exists()
