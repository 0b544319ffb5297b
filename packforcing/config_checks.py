"""Sanity checks for model ``config.json`` files, run *before* anything is built.

A config from a checkpoint directory is untrusted input: ``num_attention_heads=100000`` would ask
for tebibytes and ``num_layers=10**6`` would build layers until the process is killed. Each check
reads one file, bounds every size it uses (types included), estimates the parameter bytes from the
sizes and compares them with the memory of the devices the weights go to. Every failure is a
`ModelConfigError` (a ``ValueError``) naming the file.

Checked: the Wan transformer (`WanTransformer3DModel` arguments), the Wan VAE (`AutoencoderKLWan`)
and the UMT5 text encoder (transformers' `UMT5Config`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .devices import available_memory

MEMORY_SHARE = 0.95  # weights may take at most this share of a device's free memory


class ModelConfigError(ValueError):
    """A model config that is unreadable, mistyped, out of range, or too large for this machine."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"bad model config {self.path}: {reason}")


# ------------------------------------------------------------------------------------------ reading
def read_config(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; `FileNotFoundError` if missing, `ModelConfigError` if unreadable,
    not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(path, f"cannot be read ({type(e).__name__}: {e})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(path, f"expected a JSON object, found {type(config).__name__}")
    return config


def _int(config: dict, key: str, low: int, high: int, path, default=None, optional=False) -> int | None:
    value = config.get(key, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(path, f"{key} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ModelConfigError(path, f"{key}={value} is outside [{low}, {high}]")
    return value


def _float(config: dict, key: str, low: float, high: float, path, default=None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelConfigError(path, f"{key} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ModelConfigError(path, f"{key}={value} is outside [{low}, {high}]")
    return float(value)


def _int_list(config: dict, key: str, length: tuple[int, int], low: int, high: int, path, default=None) -> list[int]:
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not length[0] <= len(value) <= length[1]:
        raise ModelConfigError(path, f"{key} must be a list of {length[0]}-{length[1]} integers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ModelConfigError(path, f"{key} entries must be integers in [{low}, {high}], got {value!r}")
    return list(value)


def check_fits(nbytes: int, devices, path, what: str) -> None:
    """`ModelConfigError` unless ``nbytes`` fit in the free memory of every device in ``devices``."""
    for device in devices:
        try:
            free = available_memory(device)
        except Exception:  # e.g. a device emulated before the GPU is attached (ZeroGPU start-up)
            free = None
        if free is not None and nbytes > MEMORY_SHARE * free:
            raise ModelConfigError(path, f"the {what} would take {nbytes / 2**30:.2f} GiB of weights but only "
                                         f"{free / 2**30:.2f} GiB is free on {torch.device(device)}")


def _bytes(params: int, dtype: torch.dtype) -> int:
    return int(params) * torch.empty((), dtype=dtype).element_size()


def check_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """``device`` parsed and ``dtype`` checked; a bad one is a `ValueError` (not torch's RuntimeError)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a device: {device!r} ({e})") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return device, dtype


def devices_for(device) -> tuple[str, ...]:
    """Where weights pass through: the CPU (read there first) and the target device."""
    device = str(torch.device(device))
    return ("cpu",) if device == "cpu" else ("cpu", device)


# --------------------------------------------------------------------------------------- the models
def check_transformer_config(config: dict, path, devices=("cpu",), dtype=torch.float32) -> int:
    """Bound a `WanTransformer3DModel` config; returns its estimated parameter count."""
    patch = _int_list(config, "patch_size", (3, 3), 1, 16, path, default=(1, 2, 2))
    heads = _int(config, "num_attention_heads", 1, 256, path, default=40)
    head_dim = _int(config, "attention_head_dim", 6, 1024, path, default=128)
    if head_dim % 2:
        raise ModelConfigError(path, f"attention_head_dim must be even (RoPE rotates pairs), got {head_dim}")
    dim = heads * head_dim
    if dim > 32768:
        raise ModelConfigError(path, f"model width num_attention_heads x attention_head_dim = {dim} exceeds 32768")
    cin = _int(config, "in_channels", 1, 1024, path, default=16)
    cout = _int(config, "out_channels", 1, 1024, path, default=16)
    text_dim = _int(config, "text_dim", 1, 65536, path, default=4096)
    freq_dim = _int(config, "freq_dim", 2, 65536, path, default=256)
    ffn = _int(config, "ffn_dim", 1, 262144, path, default=13824)
    layers = _int(config, "num_layers", 1, 256, path, default=40)
    _float(config, "eps", 0.0, 1.0, path, default=1e-6)
    rope = _int(config, "rope_max_seq_len", 1, 65536, path, default=1024)
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        _int(config, key, 1, 1 << 20, path, optional=True)
    if not isinstance(config.get("cross_attn_norm", True), bool):
        raise ModelConfigError(path, f"cross_attn_norm must be true or false, got {config['cross_attn_norm']!r}")
    qk = config.get("qk_norm", "rms_norm_across_heads")
    if qk is not None and not isinstance(qk, str):
        raise ModelConfigError(path, f"qk_norm must be a string or null, got {qk!r}")
    p = math.prod(patch)
    params = (layers * (8 * dim * dim + 2 * dim * ffn + 8 * dim) + text_dim * dim + dim * dim + freq_dim * dim
              + 6 * dim * dim + (cin + cout) * p * dim)
    check_fits(_bytes(params, dtype) + rope * head_dim * 16, devices, path, "transformer")
    return params


def check_vae_config(config: dict, path, devices=("cpu",), dtype=torch.float32) -> int:
    """Bound an `AutoencoderKLWan` config; returns its estimated parameter count."""
    base = _int(config, "base_dim", 1, 1024, path, default=96)
    _int(config, "z_dim", 1, 256, path, default=16)
    mult = _int_list(config, "dim_mult", (1, 8), 1, 16, path, default=(1, 2, 4, 4))
    blocks = _int(config, "num_res_blocks", 0, 16, path, default=2)
    down = config.get("temperal_downsample", [False, True, True])
    if not isinstance(down, (list, tuple)) or not all(isinstance(d, bool) for d in down) or len(down) != len(mult) - 1:
        raise ModelConfigError(path, f"temperal_downsample must be {len(mult) - 1} booleans, got {down!r}")
    scales = config.get("attn_scales", [])
    if not isinstance(scales, (list, tuple)) or len(scales) > 8:
        raise ModelConfigError(path, f"attn_scales must be a short list, got {scales!r}")
    _float(config, "dropout", 0.0, 1.0, path, default=0.0)
    params = 2 * 27 * sum((base * m) ** 2 for m in mult) * (2 * blocks + 3)  # encoder + decoder 3x3x3 convs
    check_fits(_bytes(params, dtype), devices, path, "VAE")
    return params


def check_text_encoder_config(config: dict, path, devices=("cpu",), dtype=torch.float32) -> int:
    """Bound a UMT5 encoder config; returns its estimated parameter count."""
    d = _int(config, "d_model", 1, 65536, path, default=512)
    d_kv = _int(config, "d_kv", 1, 4096, path, default=64)
    heads = _int(config, "num_heads", 1, 256, path, default=8)
    d_ff = _int(config, "d_ff", 1, 262144, path, default=1024)
    layers = _int(config, "num_layers", 1, 256, path, default=8)
    vocab = _int(config, "vocab_size", 1, 1 << 20, path, default=250112)
    _int(config, "relative_attention_num_buckets", 1, 4096, path, default=32)
    params = vocab * d + layers * (4 * d * heads * d_kv + 3 * d * d_ff)
    check_fits(_bytes(params, dtype), devices, path, "text encoder")
    return params


def check_pipeline_dir(root: str | os.PathLike, devices=("cpu",), dtype=torch.float32,
                       text_dtype: torch.dtype | None = None, transformer: bool = True) -> None:
    """Check the configs of a diffusers Wan directory (``transformer/`` unless ``transformer=False``,
    ``vae/``, ``text_encoder/``, ``model_index.json``) before any of them is built. A config that is
    absent is left to the loader of that part (which names what is missing)."""
    root = Path(root)
    checks = [("model_index.json", None, None, None),
              ("vae/config.json", check_vae_config, ("cpu",), torch.float32),
              ("text_encoder/config.json", check_text_encoder_config, ("cpu",), text_dtype or dtype)]
    if transformer:
        checks.insert(1, ("transformer/config.json", check_transformer_config, devices, dtype))
    for name, check, where, as_dtype in checks:
        file = root / name
        if file.is_file():
            config = read_config(file)
            if check is not None:
                check(config, file, where, as_dtype)
