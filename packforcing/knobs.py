"""Cache-policy options ("knobs") for the Studio: which options each registered policy accepts
(its config dataclass, whose field metadata carries label, help and limits — so a new policy needs
no UI code), how to present them for a model's block size (`KnobSpec`), and the validation of
user-supplied values (`coerce_knob`). No UI here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .cache import POLICIES
from .cache.config import knob_kind, maximum_of

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
    """How to present one policy option. ``kind``: int | float | bool | choice | text.

    ``minimum``/``maximum``: the Studio's limits (its control's range, and what it accepts);
    ``library_maximum``: the library's and CLI's limit when the Studio's is tighter (else equal)."""

    name: str
    kind: str
    label: str
    info: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False  # shown in a collapsed "advanced" group
    library_maximum: float | None = None


def _spec(f: dataclasses.Field, block_frames: int) -> KnobSpec:
    """The presentation of one config field (`packforcing.cache.config.knob` metadata) for a model
    whose blocks have ``block_frames`` latent frames: frame counts step by whole blocks."""
    meta, kind = f.metadata, knob_kind(f)
    lo = hi = step = library_hi = None
    if kind in ("int", "float"):
        lo, library_hi = meta.get("minimum"), maximum_of(f)  # None for token counts (geometry-dependent)
        hi = library_hi
    if meta.get("studio_range") is not None:
        lo, hi = meta["studio_range"]
        if meta.get("block_multiple"):
            lo, hi, step = lo * block_frames, hi * block_frames, block_frames
    info = meta.get("help", "")
    if meta.get("block_multiple"):
        info = f"{info} (latent frames, a multiple of the block ({block_frames}))"
    return KnobSpec(f.name, kind, meta.get("label") or f.name.replace("_", " ").capitalize(), info, lo, hi, step,
                    tuple(meta.get("choices", ())), bool(meta.get("advanced")), library_hi)


def _fields(policy: str) -> list[dataclasses.Field]:
    cls = POLICIES.get(policy)
    if cls is None:
        raise StudioError(f"unknown cache policy {policy!r}; choose from {policy_names()}")
    return cls.config_class.knobs()


def introspect(policy: str) -> dict[str, tuple[Any, str]]:
    """name -> (default, kind) for every option of a policy, from its config dataclass. A default of
    None means "derived" (frame counts: blocks of the model's block size) or "automatic"."""
    return {f.name: (f.default, knob_kind(f)) for f in _fields(policy)}


def policy_knobs(policy: str, block_frames: int = 4) -> dict[str, Any]:
    """The options a policy accepts, with their defaults for ``block_frames``-frame blocks (read from
    its config dataclass, so new policies work). None means "automatic" (deep_sink's ``keep_tokens``)."""
    cls = POLICIES[policy] if policy in POLICIES else None
    if cls is None:
        raise StudioError(f"unknown cache policy {policy!r}; choose from {policy_names()}")
    defaults = cls.config_class().resolved(block_frames)
    return {f.name: getattr(defaults, f.name) for f in _fields(policy)}


def knob_specs(block_frames: int = 4) -> dict[str, KnobSpec]:
    """A spec for every knob of every registered policy (union, in a stable order)."""
    out: dict[str, KnobSpec] = {}
    for policy in policy_names():
        for f in _fields(policy):
            out.setdefault(f.name, _spec(f, block_frames))
    return out


KNOB_SPECS = knob_specs()


def shown(value, limit: int = 60) -> str:
    """``repr(value)``, shortened: error messages echo user input without flooding the page."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"… ({len(text)} chars)"


def coerce_knob(policy: str, name: str, value, default, kind: str, block_frames: int = 4):
    """A user-supplied value checked against the knob's control range (its field metadata)."""
    specs = knob_specs(block_frames)
    what = f"{policy}: {specs[name].label if name in specs else name}"
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
        spec = specs.get(name)
        if spec is not None and spec.minimum is not None and value < spec.minimum:
            raise StudioError(f"{what} must be at least {spec.minimum:g}, got {value:g}")
        if spec is not None and spec.maximum is not None and value > spec.maximum:
            wider = spec.library_maximum is not None and spec.library_maximum > spec.maximum
            note = f" in the Studio (the library and the CLI accept up to {spec.library_maximum:g})" if wider else ""
            raise StudioError(f"{what} must be at most {spec.maximum:g}{note}, got {value:g}")
        return value
    value = str(value)
    spec = specs.get(name)
    if spec is not None and spec.choices and value not in spec.choices:
        raise StudioError(f"{what} must be one of {list(spec.choices)}, got {shown(value)}")
    return value
