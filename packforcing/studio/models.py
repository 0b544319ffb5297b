"""Models the Studio can run: the embedded one, the named real model (Self-Forcing DMD on
Wan2.1-T2V-1.3B, offered when its files are in the local Hugging Face cache) and allow-listed Wan2.1
checkpoints, loaded once and cached (least recently used dropped beyond `MAX_LOADED_MODELS`).

At start-up `choose_default_model` picks the real model when CUDA is available and its files are
cached (a GPU Space with ``preload_from_hub``), the embedded tiny world otherwise."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import re
import threading
from collections.abc import Callable

import torch

from .. import safety, self_forcing
from ..embedded import default_pipeline
from ..knobs import StudioError
from ..pipeline import Pipeline

MAX_LOADED_MODELS = 2  # pipelines kept in memory (the embedded one always stays)


# ---- models ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelChoice:
    key: str
    label: str
    loader: Callable[[], Pipeline]
    available: bool = True
    note: str = ""
    available_if: Callable[[], bool] | None = None  # checked when the choices are listed

    def is_available(self) -> bool:
        return self.available and (self.available_if is None or bool(self.available_if()))


log = logging.getLogger(__name__)
REAL_MODEL_SIZE_ENV = "PACKFORCING_REAL_MODEL_SIZE"  # "WIDTHxHEIGHT" of the real model's videos (832x480)
REAL_COMPRESSOR_ENV = "PACKFORCING_SELF_FORCING_COMPRESSOR"  # trained compressor .safetensors for it


def real_model_size() -> tuple[int, int]:
    """(width, height) for the real model: ``PACKFORCING_REAL_MODEL_SIZE`` or 832x480. Sides must be
    multiples of 16 in [64, 1280]; a malformed value is ignored with a warning."""
    raw = os.environ.get(REAL_MODEL_SIZE_ENV, "").strip()
    m = re.fullmatch(r"(\d{2,4})x(\d{2,4})", raw)
    if m and all(64 <= int(v) <= 1280 and int(v) % 16 == 0 for v in m.groups()):
        return int(m.group(1)), int(m.group(2))
    if raw:
        log.warning("ignoring %s=%r: expected WIDTHxHEIGHT, multiples of 16 in [64, 1280]", REAL_MODEL_SIZE_ENV, raw)
    return 832, 480


def real_compressor_path():
    """The trained compressor for the real model (``PACKFORCING_SELF_FORCING_COMPRESSOR``), or None
    (zero-shot LR branch). The operator's path must be an existing ``.safetensors`` file."""
    raw = os.environ.get(REAL_COMPRESSOR_ENV, "").strip()
    return raw or None


def _load_self_forcing() -> Pipeline:
    """The real model on CUDA when available (bf16; at module level on ZeroGPU), else the CPU."""
    width, height = real_model_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return self_forcing.load_pipeline(device=device, compressor_path=real_compressor_path(), height=height,
                                      width=width)


MODELS: dict[str, ModelChoice] = {
    "embedded": ModelChoice("embedded", "Embedded tiny model (runs on CPU)", default_pipeline),
    self_forcing.KEY: ModelChoice(self_forcing.KEY, self_forcing.SELF_FORCING_DMD.label + " (GPU)", _load_self_forcing,
                                  note=self_forcing.SELF_FORCING_DMD.note, available_if=self_forcing.is_cached),
}


def choose_default_model(load: bool = True) -> str:
    """The real model when CUDA is available and its files are cached, else the embedded one.

    With ``load`` the real model is loaded right away (start-up, module level: weights go to
    ``cuda`` there, ZeroGPU's convention); if that fails the embedded model is chosen and the
    reason logged, so a broken cache never stops the app."""
    if not (torch.cuda.is_available() and MODELS[self_forcing.KEY].is_available()):
        return "embedded"
    if load:
        try:
            get_pipeline(self_forcing.KEY)
        except Exception as err:  # StudioError, or what CUDA / a broken file raises: the app must start
            log.warning("the real model is cached but cannot be loaded; using the embedded model: %s: %s",
                        type(err).__name__, err)
            return "embedded"
    return self_forcing.KEY
CHECKPOINT_NOTE = (
    f"{self_forcing.SELF_FORCING_DMD.label}: {self_forcing.SELF_FORCING_DMD.note} Other Wan2.1 models: an allow-listed Hugging Face hub id (PACKFORCING_ALLOWED_MODELS, loaded from the "
    "Space's cache only) or a directory inside PACKFORCING_MODELS_DIR; they need a GPU Space."
)

_PIPELINES: collections.OrderedDict[str, Pipeline] = collections.OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def model_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for a dropdown: the embedded model(s) and the allow-listed hub ids."""
    choices = [(m.label, m.key) for m in MODELS.values() if m.is_available()]
    return choices + [(f"{hub_id} (Hugging Face hub, GPU)", hub_id) for hub_id in safety.allowed_models()
                      if hub_id not in MODELS]


def model_description(model: str) -> str:
    """What a named model is and what it costs (empty for hub ids and directories)."""
    choice = MODELS.get(model)
    return choice.note if choice is not None else ""


def max_seconds() -> float:
    """The duration limit: 120 s unless ``PACKFORCING_MAX_SECONDS`` says otherwise."""
    return safety.max_seconds()


def min_seconds() -> float:
    """The shortest duration: 5 s unless ``PACKFORCING_MIN_SECONDS`` says otherwise (at least 1 s)."""
    return safety.min_seconds()


def _load_pretrained(source: str) -> Pipeline:
    cuda = torch.cuda.is_available()
    return Pipeline.from_pretrained(source, device="cuda" if cuda else "cpu",
                                    dtype=torch.bfloat16 if cuda else torch.float32, local_files_only=True)


def _public(text: str) -> str:
    """A message without server paths (`packforcing.safety.public_text`: ``<models>/...``, ``<hf-cache>/...``)."""
    return safety.public_text(text)


def model_key(model) -> str:
    """The canonical key of a model the user named (a :data:`MODELS` key, hub id or resolved path);
    raises :class:`StudioError` for a model that is not allowed."""
    if isinstance(model, str) and model in MODELS:
        return model
    try:
        return safety.resolve_model(model).key
    except safety.UnsafeInput as err:
        raise StudioError(str(err)) from None


def get_pipeline(model: str | None = None) -> Pipeline:
    """The (cached) pipeline of a model; its duration limit follows :func:`max_seconds`.

    ``model``: a key of :data:`MODELS` (the embedded model), an allow-listed hub id, or a directory
    inside ``PACKFORCING_MODELS_DIR`` (see :func:`packforcing.safety.resolve_model`; anything else is
    refused before the file system is touched). At most :data:`MAX_LOADED_MODELS` pipelines stay
    loaded (least recently used ones are dropped; the embedded model is kept).
    """
    key = model_key(DEFAULT_MODEL if model is None else model)
    if key in MODELS:
        choice = MODELS[key]
        if not choice.is_available():
            raise StudioError(f"model {choice.label!r} is not available here")
        label, loader = choice.label, choice.loader
    else:
        label, loader = key, functools.partial(_load_pretrained, key)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            try:
                pipe = loader()
            except (OSError, ValueError) as err:  # FileNotFoundError, WeightLoadError, bad config
                raise StudioError(f"model {_public(label)!r} cannot be loaded: {_public(str(err))}") from None
            _PIPELINES[key] = pipe
            evictable = [k for k in _PIPELINES if k not in MODELS]
            while len(_PIPELINES) > MAX_LOADED_MODELS and evictable:
                _PIPELINES.pop(evictable.pop(0))  # a run still using it keeps its own reference
        _PIPELINES.move_to_end(key)
    pipe.max_seconds = max_seconds()
    return pipe


DEFAULT_MODEL = choose_default_model()
