"""Cache policies, one interface (`CachePolicy`), swappable by name with `make_policy`."""

from __future__ import annotations

import dataclasses

from .base import PARTITIONS, CacheGeometry, CachePolicy
from .deep_sink import DeepSinkCache
from .packforcing import PackForcingCache, PackForcingConfig
from .simple import FullCache, SinkWindowCache, WindowCache

POLICIES = {
    "full": FullCache,
    "window": WindowCache,
    "sink_window": SinkWindowCache,
    "packforcing": PackForcingCache,
    "deep_sink": DeepSinkCache,
}


def make_policy(name: str, geometry: CacheGeometry, recorder=None, compressed_t_offsets=None, **options) -> CachePolicy:
    """Build a policy by name. ``options`` are its knobs (e.g. ``window_frames=12``, ``top_k=16``);
    ``compressed_t_offsets`` [N_c] (from `Compressor.token_centres`) is needed by compressing policies."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose from {sorted(POLICIES)}")
    cls = POLICIES[name]
    if cls is PackForcingCache:
        fields = {f.name for f in dataclasses.fields(PackForcingConfig)}
        unknown = set(options) - fields
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for policy 'packforcing'; valid: {sorted(fields)}")
        if compressed_t_offsets is None:
            raise ValueError("policy 'packforcing' needs compressed_t_offsets (from the compressor)")
        return cls(geometry, compressed_t_offsets, recorder=recorder, config=PackForcingConfig(**options))
    try:
        return cls(geometry, recorder=recorder, **options)
    except TypeError as err:
        raise ValueError(f"bad option for policy {name!r}: {err}") from None


__all__ = ["PARTITIONS", "POLICIES", "CacheGeometry", "CachePolicy", "PackForcingConfig", "make_policy"]
