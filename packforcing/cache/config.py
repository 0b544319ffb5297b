"""Policy configs: one dataclass per policy whose fields carry their limits and help (field
metadata). The library's validation, the CLI's flags and the Studio's controls all read them.

Frame-count fields default to None = a number of *blocks* (``default_blocks``) of the model's block
size, so a 3-latent-frame checkpoint (Self-Forcing) gets 6 sink frames where 4-frame blocks get 8.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MAX_CACHE_FRAMES = 1024  # latent frames (4 min of 16 fps video): keeps an absurd value from allocating
MAX_CACHE_BLOCKS = 1024
MAX_SCORE_QUERIES = 65536


def knob(default=None, *, help: str, label: str, unit: str = "", minimum: float | None = None,
         maximum: float | None = None, default_blocks: int | None = None, block_multiple: bool = False,
         choices: tuple[str, ...] = (), advanced: bool = False, hidden: bool = False,
         studio_range: tuple[float, float] | None = None):
    """A config field with its presentation and limits.

    ``block_multiple``: a latent-frame count that must be whole blocks (UI step = block size);
    ``default_blocks``: the default, in blocks (the field's default must be None); ``maximum`` may
    be "frames_of_tokens" (`MAX_CACHE_FRAMES` frames' worth of tokens).

    Limits: ``minimum``/``maximum`` are the library's (and the CLI's), a guard against absurd
    allocations. ``studio_range`` is the public Studio's (min, max), in blocks for ``block_multiple``
    fields: a tighter cost guard for a shared Space, declared here beside the library's so that both
    live in one place; it must lie inside the library's limits (tested), and the Studio's error names
    both. Without it the Studio uses the library's limits."""
    meta = dict(help=help, label=label, unit=unit, minimum=minimum, maximum=maximum, default_blocks=default_blocks,
                block_multiple=block_multiple, choices=tuple(choices), advanced=advanced, hidden=hidden, studio_range=studio_range)
    return field(default=default, metadata=meta)


def frames_knob(label: str, help: str, default_blocks: int, studio_blocks: tuple[int, int]):
    """A latent-frame count in whole blocks, defaulting to ``default_blocks`` blocks."""
    return knob(help=help, label=label, unit="latent frames", minimum=0, maximum=MAX_CACHE_FRAMES,
                default_blocks=default_blocks, block_multiple=True, studio_range=studio_blocks)


def sink_frames_knob():
    return frames_knob("Sink frames", "first frames kept at full resolution, never evicted", 2, (0, 16))


def recent_frames_knob():
    return frames_knob("Recent frames", "newest frames kept at full resolution", 1, (1, 8))


def score_queries_knob(help: str):
    return knob(256, help=help, label="Scoring queries", unit="query tokens", minimum=1, maximum=MAX_SCORE_QUERIES,
                studio_range=(16, 4096), advanced=True)


def rope_adjust_knob(what: str):
    return knob(True, help=f"re-position kept {what} contiguously (off = absolute positions, the ablation)",
                label="Temporal RoPE adjustment")


def knob_kind(f: dataclasses.Field) -> str:
    """int | float | bool | choice | text, from the field's type and metadata."""
    if f.metadata.get("choices"):
        return "choice"
    text = str(f.type)
    for word, kind in (("bool", "bool"), ("int", "int"), ("float", "float")):
        if word in text.replace("|", " ").split():
            return kind
    return "text"


def maximum_of(f: dataclasses.Field, tokens_per_frame: int | None = None) -> float | None:
    limit = f.metadata.get("maximum")
    if limit == "frames_of_tokens":  # a token count: MAX_CACHE_FRAMES frames' worth
        return None if tokens_per_frame is None else MAX_CACHE_FRAMES * tokens_per_frame
    return limit


@dataclass
class PolicyConfig:
    """Base of the per-policy configs (see `knob`)."""

    def resolved(self, block_frames: int) -> PolicyConfig:
        """A copy with block-derived defaults filled in (``default_blocks`` × ``block_frames``)."""
        updates = {}
        for f in dataclasses.fields(self):
            value, blocks = getattr(self, f.name), f.metadata.get("default_blocks")
            if blocks is not None and value is None:
                updates[f.name] = blocks * block_frames
            elif knob_kind(f) == "int" and not isinstance(value, bool) and hasattr(value, "__index__"):
                updates[f.name] = int(value)  # numpy integers
            elif knob_kind(f) == "int" and isinstance(value, float) and value.is_integer():
                updates[f.name] = int(value)  # 8.0 is 8
        return dataclasses.replace(self, **updates)

    def validate(self, geometry) -> None:
        """Types, limits, choices and whole blocks; raises ValueError with the field's name."""
        for f in dataclasses.fields(self):
            value, meta, kind = getattr(self, f.name), f.metadata, knob_kind(f)
            if value is None:
                continue
            if kind == "choice":
                if value not in meta["choices"]:
                    raise ValueError(f"unknown {f.name} {value!r}; choose from {meta['choices']}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif kind in ("int", "float"):
                check_number(f, value, geometry.tokens_per_frame)
                if meta.get("block_multiple"):
                    geometry.frames_to_blocks(value, f.name)

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("hidden")]


def check_number(f: dataclasses.Field, value: Any, tokens_per_frame: int | None = None) -> None:
    meta, kind = f.metadata, knob_kind(f)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not float(value).is_integer()):
        raise ValueError(f"{f.name} must be a whole number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{f.name} must be finite, got {value}")
    unit = f" {meta['unit']}" if meta.get("unit") else ""
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ValueError(f"{f.name} must be >= {meta['minimum']:g}{unit}, got {value}")
    limit = maximum_of(f, tokens_per_frame)
    if limit is not None and value > limit:
        raise ValueError(f"{f.name}={value} is too large: at most {limit:g}{unit}")


def build_config(cls: type[PolicyConfig], options: dict, policy: str) -> PolicyConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - names
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for policy {policy!r}; valid: {sorted(names)}")
    return cls(**options)
