"""The named real model: "Self-Forcing DMD · Wan2.1-T2V-1.3B", resolved from the Hugging Face cache.

Text encoder (UMT5-XXL), tokenizer and VAE come from ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``; the
causal transformer from ``gdhe17/Self-Forcing`` (``checkpoints/self_forcing_dmd.pt``, key
``generator_ema``, original Wan key names with a ``model.`` prefix), built from the diffusers
repository's ``transformer/config.json``. Sampling: 3 latent frames per block, 4 steps
``[1000, 750, 500, 250]`` warped with shift 5, the re-noise sampler, no guidance. PackForcing runs
zero-shot (LR branch) unless trained compressor weights are given.

Files are found with ``huggingface_hub`` (``snapshot_download`` / ``hf_hub_download`` with
``local_files_only=True``, ``try_to_load_from_cache``) in ``HF_HUB_CACHE`` — the cache a Space's
``preload_from_hub`` fills at build time. Nothing is ever downloaded from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import configs

KEY = "self-forcing"


@dataclasses.dataclass(frozen=True)
class RealModelSpec:
    """Where a real causal Wan model's files live on the hub and how it samples.

    ``block_frames``: latent frames per block; ``denoising_steps``: timesteps before the shift
    (0..1000); ``note``: what it is and what it costs, for the UI."""

    key: str
    label: str
    base_repo: str
    checkpoint_repo: str
    checkpoint_file: str
    checkpoint_key: str
    block_frames: int
    denoising_steps: tuple[int, ...]
    shift: float
    note: str

    @property
    def repos(self) -> tuple[str, str]:
        return self.base_repo, self.checkpoint_repo


SELF_FORCING_DMD = RealModelSpec(
    key=KEY,
    label="Self-Forcing DMD · Wan2.1-T2V-1.3B",
    base_repo=configs.WAN21_DIFFUSERS_REPO,
    checkpoint_repo=configs.SELF_FORCING_REPO,
    checkpoint_file=configs.SELF_FORCING_FILE,
    checkpoint_key=configs.SELF_FORCING_KEY,
    block_frames=configs.SELF_FORCING_BLOCK_FRAMES,
    denoising_steps=configs.SELF_FORCING_STEPS,
    shift=configs.SELF_FORCING_SHIFT,
    note=("Self-Forcing's 4-step causal generator (DMD-distilled from Wan2.1-T2V-1.3B, trained on 5 s clips), "
          "832×480 at 16 fps, 3-latent-frame blocks (0.75 s of video each), UMT5-XXL text encoder. "
          "Needs a GPU: about 3 GB of transformer weights in bf16, the 11 GB text encoder parked in host memory "
          "between prompts, and about 5 forwards of 1.3 B parameters per block; 120 s is 160 blocks. "
          "PackForcing runs zero-shot (LR compressor branch) unless trained compressor weights are set."),
)

# What the pipeline reads from the diffusers repository (its transformer weights are not needed).
BASE_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
              "tokenizer/tokenizer_config.json")
BASE_PATTERNS = ["model_index.json", "transformer/config.json", "vae/*", "text_encoder/*", "tokenizer/*"]


def is_cached(spec: RealModelSpec = SELF_FORCING_DMD, cache_dir: str | None = None) -> bool:
    """True if every file the model needs is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    wanted = [(spec.base_repo, f) for f in BASE_FILES] + [(spec.checkpoint_repo, spec.checkpoint_file)]
    return all(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for repo, f in wanted)


def resolve(spec: RealModelSpec = SELF_FORCING_DMD, local_files_only: bool = True,
            cache_dir: str | None = None) -> tuple[Path, Path]:
    """(diffusers snapshot directory, checkpoint file) from the Hugging Face cache.

    Raises `FileNotFoundError` naming what is missing and how to get it onto the machine."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = (f"preload {spec.base_repo} and '{spec.checkpoint_repo} {spec.checkpoint_file}' "
            "(README front matter preload_from_hub on a Space, or `hf download` elsewhere)")
    try:
        base = Path(snapshot_download(spec.base_repo, allow_patterns=BASE_PATTERNS, cache_dir=cache_dir,
                                      local_files_only=local_files_only))
        checkpoint = Path(hf_hub_download(spec.checkpoint_repo, spec.checkpoint_file, cache_dir=cache_dir,
                                          local_files_only=local_files_only))
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(f"{spec.label} is not in the Hugging Face cache ({type(e).__name__}); {hint}") from None
    missing = [f for f in BASE_FILES if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec.label}: the cached {spec.base_repo} lacks {', '.join(missing)}; {hint}")
    return base, checkpoint


def load_pipeline(spec: RealModelSpec = SELF_FORCING_DMD, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, compressor_path: str | Path | None = None,
                  height: int = 480, width: int = 832, local_files_only: bool = True,
                  cache_dir: str | None = None):
    """The model as a `Pipeline` on ``device`` (bf16 on CUDA, fp32 elsewhere unless ``dtype``).

    On CUDA the text encoder stays on the CPU and visits the GPU only to encode a prompt."""
    from .config_checks import check_device_dtype
    from .pipeline import Pipeline
    from .sampler import SamplerConfig

    device, _ = check_device_dtype(device, dtype or torch.float32)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, checkpoint = resolve(spec, local_files_only, cache_dir)
    pipe = Pipeline.from_pretrained(base, checkpoint, compressor_path, height, width,
                                    block_frames=spec.block_frames, device=device, dtype=dtype,
                                    local_files_only=True)
    pipe.sampler = SamplerConfig(block_frames=spec.block_frames, denoising_steps=tuple(spec.denoising_steps),
                                 shift=spec.shift, solver="renoise")
    pipe.name = spec.label
    return pipe
