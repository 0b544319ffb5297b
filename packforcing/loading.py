"""Safe weight loading for Wan2.1 transformers (diffusers, original Wan and Self-Forcing formats).

Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only: a checkpoint can
never run code. Every load is strict: missing keys, unexpected keys and shape mismatches raise one
`WeightLoadError` that names the file and the first offending keys.

Supported sources for `load_transformer`:

- a diffusers directory: a pipeline root with ``transformer/`` or a transformer folder itself
  (``config.json`` + ``diffusion_pytorch_model*.safetensors``, sharded index included);
- a Self-Forcing ``.pt`` (``{"generator", "generator_ema"}``, keys ``model.<original Wan name>``);
- a single ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` in original-Wan or diffusers names.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import WanTransformer3DModel

from .config_checks import (ModelConfigError, check_device_dtype, check_pipeline_dir, check_transformer_config,
                            devices_for as _devices, read_config)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Key fragments that only occur in original-Wan names (diffusers uses condition_embedder/attn1/...).
_ORIGINAL_MARKERS = ("self_attn.", "cross_attn.", "head.head.", "time_embedding.", "text_embedding.",
                     "time_projection.", ".modulation", "ffn.0.")
_PREFIXES = ("model.diffusion_model.", "model.", "diffusion_model.")
# Sub-folders a diffusers Wan pipeline needs (used for hub snapshots).
_PIPELINE_PATTERNS = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]


class WeightLoadError(ValueError):
    """A checkpoint that cannot be read or does not fit the model.

    Attributes: ``path``; ``missing`` / ``unexpected`` (key lists); ``mismatched``
    (``(key, checkpoint_shape, model_shape)`` tuples). The message names the file and at most
    five keys per kind.
    """

    def __init__(self, path, reason: str | None = None, *, missing=(), unexpected=(), mismatched=()):
        self.path = str(path)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"cannot load weights from {self.path}" + (f": {reason}" if reason else "")]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_first(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_first(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatches ({len(shown)}): {_first(shown)}")
        super().__init__("\n".join(lines))


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


# ----------------------------------------------------------------------------------------- reading
def find_weight_files(path: str | os.PathLike) -> list[Path]:
    """Weight files of a checkpoint path: the file itself, or those a directory holds.

    A directory may be a diffusers pipeline root (its ``transformer/`` is used), a diffusers model
    folder (``diffusion_pytorch_model.safetensors``, or all shards of a ``*.safetensors.index.json``),
    or a folder with exactly one weight file. Raises `FileNotFoundError` if the path does not exist
    or holds no weights, `ValueError` if several unrelated weight files make it ambiguous.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / "transformer").is_dir():
        return find_weight_files(path / "transformer")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (path / name).is_file():
            return [path / name]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in directory {path}")
    if len(files) > 1:
        raise ValueError(f"several weight files in {path}, pass one: {[p.name for p in files]}")
    return files


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file (or a directory, see `find_weight_files`) into CPU tensors.

    ``.safetensors`` via safetensors; ``.pt/.pth/.bin`` via ``torch.load(weights_only=True)``, so a
    pickle that would run code is refused (zip-format ``.pt`` files are memory-mapped: copy the
    tensors before overwriting the file). For a Self-Forcing ``.pt`` the result is the outer dict
    (``{"generator": {...}, "generator_ema": {...}}``); pass it to `convert_self_forcing_state_dict`.
    Raises `WeightLoadError` for unreadable, truncated, corrupted or unsafe files and
    `FileNotFoundError` for a missing path or a directory without weights.
    """
    state: dict[str, Any] = {}
    for file in find_weight_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in the index of {file.parent} does not exist")
        if file.suffix == ".safetensors":
            state.update(_read_safetensors(file))
        elif file.suffix in _PICKLE_SUFFIXES:
            state.update(_read_pickle(file))
        else:
            raise WeightLoadError(file, f"unsupported file type {file.suffix!r} (use {', '.join(WEIGHT_SUFFIXES)})")
    return state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: truncated header or data
        raise WeightLoadError(file, f"not a readable safetensors file (truncated or corrupted?): {e}") from None


def _read_pickle(file: Path) -> dict[str, Any]:
    try:
        # mmap keeps a multi-GB .pt off the heap until its tensors are used; legacy files can't mmap.
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise WeightLoadError(file, f"corrupted pickle: {e}") from None
        culprit = next((ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower()), "")
        raise WeightLoadError(
            file, "refused: the pickle holds objects other than tensors and could run code; only "
            f"torch.load(weights_only=True) is allowed. {culprit}".rstrip()) from None
    except Exception as e:  # RuntimeError (bad zip), EOFError, KeyError (garbage), ...
        raise WeightLoadError(file, f"not a readable torch checkpoint (truncated or corrupted?): "
                                    f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WeightLoadError(file, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


# -------------------------------------------------------------------------------------- conversion
def is_original_wan_state_dict(state_dict: dict[str, Any]) -> bool:
    """True if the keys use original Wan names (``blocks.N.self_attn.q``…) rather than diffusers'."""
    return any(m in k for k in state_dict for m in _ORIGINAL_MARKERS)


def convert_self_forcing_state_dict(state_dict: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Convert a Self-Forcing / original-Wan / diffusers state dict to diffusers names.

    - A Self-Forcing checkpoint ``{"generator", "generator_ema"}`` is unwrapped
      (``generator_ema`` if ``use_ema`` and present, else ``generator``).
    - A common ``model.`` / ``model.diffusion_model.`` key prefix is stripped.
    - Original Wan names are renamed with diffusers' own
      ``convert_wan_transformer_to_diffusers``; diffusers names pass through unchanged (the
      converter must not see them: it swaps ``norm2``/``norm3``).

    The input is not modified; tensors are shared, not copied. Raises `ValueError` for values
    that are not tensors.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if "generator_ema" in state_dict or "generator" in state_dict:
        key = "generator_ema" if use_ema and "generator_ema" in state_dict else "generator"
        state_dict = state_dict[key]
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict holds non-tensor values at keys: {_first(bad)}")
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            break
    if not is_original_wan_state_dict(state_dict):
        return dict(state_dict)
    return convert_wan_transformer_to_diffusers(dict(state_dict))  # it pops from its argument


def check_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, path) -> None:
    """Raise `WeightLoadError` unless ``state_dict`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise WeightLoadError(path, f"does not fit {type(model).__name__}",
                              missing=missing, unexpected=unexpected, mismatched=mismatched)


# ------------------------------------------------------------------------------------- transformer
def _resolve_config(path: Path, config: dict | None, files: list[Path]) -> tuple[dict, Path | str]:
    """(config, where it came from): the argument, else ``config.json`` beside the weights."""
    if config is not None:
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict of constructor arguments, got {type(config).__name__}")
        return dict(config), "the config argument"
    candidates = [files[0].parent / "config.json"] + ([path / "config.json"] if path.is_dir() else [])
    for c in candidates:
        if c.is_file():
            return read_config(c), c
    raise ValueError(f"no config given and no config.json beside {files[0]}; "
                     "pass config= (e.g. packforcing.configs.WAN21_T2V_1P3B for Self-Forcing)")


def _init_kwargs(model_cls: type, config: dict) -> dict:
    """Constructor kwargs from a config dict, keeping the parameters of the first explicit
    ``__init__`` in the MRO. (diffusers' ``from_config`` reads ``model_cls.__init__`` only, so for a
    subclass with ``__init__(self, *args, **kwargs)`` it silently drops the whole config.)"""
    for klass in model_cls.__mro__:
        params = inspect.signature(klass.__init__).parameters.values()
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            names = {p.name for p in params} - {"self"}
            return {k: v for k, v in config.items() if k in names}
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_transformer(
    path: str | os.PathLike,
    config: dict | None = None,
    model_cls: type = WanTransformer3DModel,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
):
    """Build ``model_cls`` and load weights strictly from any supported checkpoint (module doc).

    ``config``: constructor kwargs; default: ``config.json`` beside the weights (a Self-Forcing
    ``.pt`` has none, so pass ``WAN21_T2V_1P3B``); it is bounded first (`packforcing.config_checks`:
    sizes, types, weights against the free memory of ``device``). Floating weights are cast to ``dtype`` except
    ``model_cls._keep_in_fp32_modules`` (as diffusers' ``from_pretrained`` does). Parameters are
    created empty and filled tensor by tensor as the checkpoint's copies are freed, so a
    full-size model is never held twice. Returns the model in eval mode on ``device``. Raises `WeightLoadError`,
    `FileNotFoundError` (see `read_state_dict`), `ModelConfigError` (a bad config, naming its file) or
    `ValueError` (no config).
    """
    from accelerate import init_empty_weights

    device, dtype = check_device_dtype(device, dtype)
    path = Path(path)
    files = find_weight_files(path)
    cfg, cfg_source = _resolve_config(path, config, files)
    check_transformer_config(cfg, cfg_source, devices=_devices(device), dtype=dtype)
    shown = files[0] if len(files) == 1 else files[0].parent
    try:
        state_dict = convert_self_forcing_state_dict(read_state_dict(path), use_ema=use_ema)
    except ValueError as e:
        if isinstance(e, WeightLoadError):
            raise
        raise WeightLoadError(shown, str(e)) from None

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (RoPE) real
        try:
            model = model_cls(**_init_kwargs(model_cls, cfg))
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # values the bounds let through
            raise ModelConfigError(cfg_source, f"{type(e).__name__}: {e}") from None
    check_state_dict(state_dict, model, shown)
    keep = getattr(model_cls, "_keep_in_fp32_modules", None) or []
    owned = {}
    for name in list(state_dict):  # pop as we go: the source tensors are freed one by one
        tensor = state_dict.pop(name)
        target = torch.float32 if any(m in name.split(".") for m in keep) else dtype
        # Always copy: safetensors hands out unaligned buffers (different CPU kernels, last-bit
        # differences) and torch.load(mmap=True) tensors are backed by the file.
        owned[name] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else None,
                                copy=True).contiguous()
    model.load_state_dict(owned, strict=False, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen after check_state_dict unless model_cls has unusual parameters
        raise WeightLoadError(shown, "parameters left uninitialised", missing=leftover)
    return model.to(device).eval()


def save_transformer(model, path: str | os.PathLike) -> Path:
    """Save weights as safetensors plus ``config.json`` beside them; returns the weights file.

    ``path`` ending in ``.safetensors`` names the file; any other path is a directory that gets
    ``diffusion_pytorch_model.safetensors`` (diffusers layout, loadable by ``from_pretrained``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / "diffusion_pytorch_model.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
    model.to_json_file(str(file.parent / "config.json"))
    return file


# ---------------------------------------------------------------------------------------- pipeline
class WanComponents(NamedTuple):
    transformer: Any  # model_cls
    vae: Any  # diffusers.AutoencoderKLWan
    text_encoder: Any  # packforcing.text.UMT5TextEncoder


def resolve_pretrained_dir(path_or_hub_id: str | os.PathLike, local_files_only: bool = True) -> Path:
    """A local directory for a diffusers Wan pipeline: the path itself or a hub snapshot.

    With ``local_files_only`` only the local Hugging Face cache is consulted (no network);
    a missing directory or uncached hub id raises `FileNotFoundError` at once.
    """
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(path_or_hub_id), local_files_only=local_files_only,
                                      allow_patterns=_PIPELINE_PATTERNS))
    except HFValidationError:
        raise FileNotFoundError(f"{path_or_hub_id} is neither a directory nor a hub id") from None
    except FileNotFoundError as e:  # LocalEntryNotFoundError is one
        if not local_files_only:
            raise
        raise FileNotFoundError(
            f"{path_or_hub_id} is not a local directory and is not in the Hugging Face cache; "
            "local_files_only=True forbids downloading it") from e


def load_wan_pipeline_components(
    path_or_hub_id: str | os.PathLike,
    local_files_only: bool = True,
    model_cls: type = WanTransformer3DModel,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype | None = None,
    text_max_length: int | None = None,
    transformer_checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> WanComponents:
    """Transformer, `AutoencoderKLWan` and `UMT5TextEncoder` of a diffusers-format Wan2.1 pipeline.

    ``path_or_hub_id``: a directory with ``transformer/``, ``vae/``, ``text_encoder/`` and
    ``tokenizer/``, or a hub id (e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``). With
    ``transformer_checkpoint`` (e.g. Self-Forcing's ``.pt``) the transformer is built from
    ``transformer/config.json`` and filled from that file instead (the directory's own transformer
    weights are not read). Every config is bounded before anything is built
    (`packforcing.config_checks`; ``device`` is where the transformer will run). The text encoder
    must be safetensors. ``text_dtype`` defaults to ``dtype``. All on CPU. Raises `WeightLoadError`,
    `ModelConfigError` (both ``ValueError``) or `FileNotFoundError`.
    """
    from diffusers import AutoencoderKLWan

    from .text import UMT5TextEncoder

    device, dtype = check_device_dtype(device, dtype)
    root = resolve_pretrained_dir(path_or_hub_id, local_files_only)
    if transformer_checkpoint is None:
        find_weight_files(root / "transformer")  # FileNotFoundError first for a directory without weights
    check_pipeline_dir(root, _devices(device), dtype, text_dtype)
    if transformer_checkpoint is None:
        # Same result and dtypes as model_cls.from_pretrained(root, subfolder="transformer"), but
        # strict, with one WeightLoadError (diffusers only warns about missing keys).
        transformer = load_transformer(root / "transformer", model_cls=model_cls, dtype=dtype)
    else:
        config = read_config(root / "transformer" / "config.json")
        transformer = load_transformer(transformer_checkpoint, config=config, model_cls=model_cls, dtype=dtype)
    _require_safetensors(root / "text_encoder", "text encoder")
    try:
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True)
        text_encoder = UMT5TextEncoder.from_pretrained(root, max_length=text_max_length, dtype=text_dtype or dtype)
    except (TypeError, AssertionError, RuntimeError, KeyError) as e:  # values the config bounds let through
        raise ModelConfigError(root, f"{type(e).__name__}: {e}") from None
    return WanComponents(transformer, vae.eval(), text_encoder)


def _require_safetensors(folder: Path, what: str) -> None:
    """`WeightLoadError` unless ``folder`` holds safetensors weights (pickled ``.bin`` is refused)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no {what} folder at {folder}")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        raise WeightLoadError(folder, f"the {what} must be in safetensors format"
                                      + (f"; found {', '.join(found)} (pickled weights are refused)" if found else ""))


def load_compressor(path: str | os.PathLike, model_dim: int | None = None, device: str | torch.device = "cpu"):
    """A trained `Compressor` from a ``.safetensors`` file written by `Compressor.save`.

    Raises `WeightLoadError` (naming the file) for another format, an unreadable file, or a
    compressor of another width than ``model_dim``; `FileNotFoundError` if it does not exist.
    """
    from .compressor import Compressor

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no compressor weights at {path}")
    if path.suffix != ".safetensors":
        raise WeightLoadError(path, "compressor weights must be a .safetensors file written by Compressor.save "
                                    f"(got {path.suffix or 'no suffix'})")
    try:
        compressor = Compressor.load(str(path))
    except WeightLoadError:
        raise
    except Exception as e:  # SafetensorError, bad metadata JSON, wrong shapes (ValueError)
        raise WeightLoadError(path, f"not a readable compressor file: {type(e).__name__}: {e}") from None
    if model_dim is not None and compressor.model_dim != model_dim:
        raise WeightLoadError(path, f"compressor of width {compressor.model_dim} does not fit a model of width {model_dim}")
    return compressor.to(device).eval()
