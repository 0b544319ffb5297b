"""Models the Studio can run: the embedded one and allow-listed Wan2.1 checkpoints, loaded once
and cached (least recently used dropped beyond `MAX_LOADED_MODELS`)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import torch

from .. import safety
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


MODELS: dict[str, ModelChoice] = {
    "embedded": ModelChoice("embedded", "Embedded tiny model (runs on CPU)", default_pipeline),
}
DEFAULT_MODEL = "embedded"
CHECKPOINT_NOTE = (
    "Wan2.1 models: an allow-listed Hugging Face hub id (PACKFORCING_ALLOWED_MODELS, loaded from the "
    "Space's cache only) or a directory inside PACKFORCING_MODELS_DIR; they need a GPU Space."
)

_PIPELINES: collections.OrderedDict[str, Pipeline] = collections.OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def model_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for a dropdown: the embedded model(s) and the allow-listed hub ids."""
    choices = [(m.label, m.key) for m in MODELS.values() if m.available]
    return choices + [(f"{hub_id} (Hugging Face hub, GPU)", hub_id) for hub_id in safety.allowed_models()
                      if hub_id not in MODELS]


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


def get_pipeline(model: str = DEFAULT_MODEL) -> Pipeline:
    """The (cached) pipeline of a model; its duration limit follows :func:`max_seconds`.

    ``model``: a key of :data:`MODELS` (the embedded model), an allow-listed hub id, or a directory
    inside ``PACKFORCING_MODELS_DIR`` (see :func:`packforcing.safety.resolve_model`; anything else is
    refused before the file system is touched). At most :data:`MAX_LOADED_MODELS` pipelines stay
    loaded (least recently used ones are dropped; the embedded model is kept).
    """
    key = model_key(model)
    if key in MODELS:
        choice = MODELS[key]
        if not choice.available:
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
