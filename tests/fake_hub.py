"""A fake Hugging Face cache holding tiny-config copies of the real model's two repositories.

Layout as ``huggingface_hub`` writes it (``models--owner--name/{blobs,snapshots/<commit>,refs/main}``,
snapshot files relative symlinks to content-addressed blobs), so the code under test finds the files
through the same ``snapshot_download`` / ``hf_hub_download`` / ``try_to_load_from_cache`` calls a
Space makes. The repositories have the real files and key names:

- ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: ``model_index.json``, ``scheduler/``, ``transformer/``,
  ``vae/``, ``text_encoder/`` (safetensors), ``tokenizer/``;
- ``gdhe17/Self-Forcing``: ``checkpoints/self_forcing_dmd.pt`` = ``{"generator", "generator_ema"}``
  with ``model.``-prefixed original Wan key names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from packforcing import configs
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.text import TinyTextEncoder
from packforcing.vae import tiny_vae_config
from packforcing.world import vocabulary
from tests.test_loading import self_forcing_checkpoint

MODEL_INDEX = {
    "_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
             "prediction_type": "flow_prediction", "use_flow_sigmas": True}


def add_repo(cache: Path, repo_id: str, files: Path, commit: str | None = None) -> Path:
    """Put the tree ``files`` into ``cache`` as the ``main`` snapshot of model ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        dest = snapshot / src.relative_to(files)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_base_repo(root: Path, seed: int = 0) -> CausalWanTransformer:
    """The diffusers repository at tiny width; returns its (bidirectional-base stand-in) transformer."""
    torch.manual_seed(seed)
    base = CausalWanTransformer(**TINY)
    base.save_pretrained(root / "transformer")
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(root / "vae")
    TinyTextEncoder.build([" ".join(vocabulary())], text_dim=TINY["text_dim"], seed=seed).save(root)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    return base


def write_self_forcing_repo(root: Path, seed: int = 1) -> dict:
    """``checkpoints/self_forcing_dmd.pt``; returns the diffusers-named ``generator_ema`` tensors."""
    torch.manual_seed(seed)
    ema = CausalWanTransformer(**TINY).state_dict()
    torch.manual_seed(seed + 100)
    raw = CausalWanTransformer(**TINY).state_dict()
    path = root / configs.SELF_FORCING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(self_forcing_checkpoint(ema, raw), path)
    (root / "README.md").write_text("Self-Forcing (tiny stand-in)\n")
    return ema


def build_fake_cache(cache: Path, work: Path) -> dict:
    """Both repositories in the hub cache directory ``cache``; returns the EMA weights."""
    write_base_repo(work / "base")
    ema = write_self_forcing_repo(work / "sf")
    add_repo(cache, configs.WAN21_DIFFUSERS_REPO, work / "base")
    add_repo(cache, configs.SELF_FORCING_REPO, work / "sf")
    shutil.rmtree(work)
    return ema
