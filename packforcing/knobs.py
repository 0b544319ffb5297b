"""Cache-policy options ("knobs") for the Studio: which options each registered policy accepts
(introspected from its ``__init__`` or config dataclass, so a new policy needs no UI code), how to
present them (`KnobSpec`), and the validation of user-supplied values (`coerce_knob`). No UI here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import numpy as np

from .cache import POLICIES

POLICY_ORDER = ("packforcing", "sink_window", "window", "deep_sink", "full")


class StudioError(ValueError):
    """A bad input or an unavailable feature, with a message meant for the user."""


def policy_names() -> list[str]:
    """Registered cache policies (`packforcing.cache.POLICIES`), in a friendly order."""
    known = [p for p in POLICY_ORDER if p in POLICIES]
    return known + sorted(set(POLICIES) - set(known))


def policy_compresses(policy: str) -> bool:
    return bool(getattr(POLICIES.get(policy), "compresses", False))


@dataclasses.dataclass(frozen=True)
class KnobSpec:
    """How to present one policy option. ``kind``: int | float | bool | choice | text."""

    name: str
    kind: str
    label: str
    info: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False  # shown in a collapsed "advanced" group


def _known_specs() -> dict[str, KnobSpec]:
    from .cache.packforcing import MID_SPANS, SCOPES, SELECTIONS

    frames = "latent frames, a multiple of the block (4)"
    specs = [
        KnobSpec("sink_frames", "int", "Sink frames", f"first frames kept at full resolution, never evicted ({frames})",
                 0, 64, 4),
        KnobSpec("window_frames", "int", "Window frames", f"most recent frames kept at full resolution ({frames})",
                 4, 128, 4),
        KnobSpec("recent_frames", "int", "Recent frames", f"newest frames kept at full resolution ({frames})",
                 4, 32, 4),
        KnobSpec("top_k", "int", "Top-k mid blocks", "compressed mid blocks attended per generation block",
                 0, 64, 1),
        KnobSpec("keep_tokens", "int", "Kept middle tokens",
                 "tokens kept by attention score between sink and recent (empty = automatic: two blocks)", 0),
        KnobSpec("archive_blocks", "int", "Mid archive (blocks)", "compressed mid blocks stored, FIFO beyond it",
                 1, 512, 1, advanced=True),
        KnobSpec("selection", "choice", "Mid selection", "topk = paper's scores; recency = the k newest (ablation)",
                 choices=tuple(SELECTIONS), advanced=True),
        KnobSpec("scope", "choice", "Selection scope", "each layer selects, or one selection shared by all layers",
                 choices=tuple(SCOPES), advanced=True),
        KnobSpec("score_queries", "int", "Scoring queries", "query tokens sampled for the top-k scores",
                 16, 4096, 16, advanced=True),
        KnobSpec("rope_adjust", "bool", "Temporal RoPE adjustment",
                 "re-position kept blocks contiguously (off = absolute positions, the ablation)"),
        KnobSpec("mid_span", "choice", "Mid-span mode", "temporal positions one mid block occupies after adjustment",
                 choices=tuple(MID_SPANS)),
    ]
    return {s.name: s for s in specs}


KNOB_SPECS = _known_specs()
_SKIPPED_PARAMS = {"self", "geometry", "recorder", "compressed_t_offsets"}
_HIDDEN_KNOBS = {"archive_device"}


def _config_class(cls) -> type | None:
    """The config dataclass of a policy that takes ``config=`` (e.g. PackForcingConfig)."""
    explicit = getattr(cls, "config_class", None)
    if dataclasses.is_dataclass(explicit):
        return explicit
    try:
        import typing

        hint = typing.get_type_hints(cls.__init__).get("config")
        for candidate in (hint, *getattr(hint, "__args__", ())):
            if dataclasses.is_dataclass(candidate):
                return candidate
    except Exception:  # unresolvable annotations: fall through to the naming convention
        pass
    module = inspect.getmodule(cls)
    name = cls.__name__.removesuffix("Cache") + "Config"
    candidate = getattr(module, name, None)
    return candidate if dataclasses.is_dataclass(candidate) else None


def _annotation_kind(annotation, default) -> str | None:
    """The knob kind of a parameter: from its default, else from its (possibly string) annotation."""
    kind = _knob_kind(default)
    if kind is not None or default is not None:
        return kind
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = str(text).replace("typing.", "").replace("Optional", "")
    for word, kind in (("bool", "bool"), ("int", "int"), ("float", "float"), ("str", "text")):
        if word in text.replace("|", " ").replace("[", " ").replace("]", " ").split():
            return kind
    return None


def introspect(policy: str) -> dict[str, tuple[Any, str]]:
    """name -> (default, kind) for every option a policy accepts (``__init__`` or config dataclass)."""
    cls = POLICIES.get(policy)
    if cls is None:
        raise StudioError(f"unknown cache policy {policy!r}; choose from {policy_names()}")
    knobs: dict[str, tuple[Any, str | None]] = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _SKIPPED_PARAMS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name == "config":
            config = _config_class(cls)
            if config is not None:
                for f in dataclasses.fields(config):
                    if f.default is not dataclasses.MISSING:
                        default = f.default
                    elif f.default_factory is not dataclasses.MISSING:
                        default = f.default_factory()
                    else:
                        continue
                    knobs[f.name] = (default, _annotation_kind(f.type, default))
            continue
        if param.default is not param.empty:
            knobs[param.name] = (param.default, _annotation_kind(param.annotation, param.default))
    return {k: (d, kind) for k, (d, kind) in knobs.items() if k not in _HIDDEN_KNOBS and kind is not None}


def policy_knobs(policy: str) -> dict[str, Any]:
    """The options a policy accepts, with their defaults (introspected, so new policies work).

    A default of None means "automatic" (e.g. deep_sink's ``keep_tokens``)."""
    return {name: default for name, (default, _) in introspect(policy).items()}


def _knob_kind(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "text"
    return None


def knob_specs() -> dict[str, KnobSpec]:
    """A spec for every knob of every registered policy (union, in a stable order)."""
    out: dict[str, KnobSpec] = {}
    for policy in policy_names():
        for name, (_, kind) in introspect(policy).items():
            if name not in out:
                out[name] = KNOB_SPECS.get(name) or KnobSpec(name, kind, name.replace("_", " ").capitalize())
    order = list(KNOB_SPECS)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def shown(value, limit: int = 60) -> str:
    """``repr(value)``, shortened: error messages echo user input without flooding the page."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"… ({len(text)} chars)"


def coerce_knob(policy: str, name: str, value, default, kind: str):
    what = f"{policy}: {KNOB_SPECS[name].label if name in KNOB_SPECS else name}"
    if value is None or (isinstance(value, str) and not value.strip() and kind != "text"):
        return default
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise StudioError(f"{what} must be true or false, got {shown(value)}")
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            try:
                value = float(str(value).strip())
            except ValueError:
                raise StudioError(f"{what} must be a number, got {shown(value)}") from None
        try:
            value = float(value)
        except OverflowError:
            value = math.inf if value > 0 else -math.inf
        if not math.isfinite(value):
            raise StudioError(f"{what} must be a finite number, got {value}")
        if kind == "int":
            if not value.is_integer():
                raise StudioError(f"{what} must be a whole number, got {value:g}")
            value = int(value)
        spec = KNOB_SPECS.get(name)
        if spec is not None and spec.minimum is not None and value < spec.minimum:
            raise StudioError(f"{what} must be at least {spec.minimum:g}, got {value:g}")
        if spec is not None and spec.maximum is not None and value > spec.maximum:
            raise StudioError(f"{what} must be at most {spec.maximum:g}, got {value:g}")
        return value
    value = str(value)
    spec = KNOB_SPECS.get(name)
    if spec is not None and spec.choices and value not in spec.choices:
        raise StudioError(f"{what} must be one of {list(spec.choices)}, got {shown(value)}")
    return value
