"""Cache policies, swappable by name with `make_policy`: a pure policy, a store, a per-forward context.

    policy (pure, no tensors)        store (preallocated K/V)          attention context
    history metadata ──plan(b)──▶ BlockPlan ──apply──▶ rotations, index ──context(plan, step)──▶
    sink/recent/archive lists     positions, layout,   tensors on the    update(layer, k, v) -> views
                                  evictions, selection device            score(layer, q) at step 0

One block's life (the sampler owns it; nothing else changes the cache):
    plan = policy.plan(b)          # where every held block sits, at which RoPE position; what leaves
    store.apply(plan)              # re-rotate moved blocks; shared / fixed selections; index tensors
    for step in steps + commit:    # each forward gets store.context(plan, step, commit)
        model.forward_block(..., context)   # per layer: [score(q)], update(k, v) -> attend
    store.commit(plan); policy.commit(plan)  # K/V into their region; metadata follows the plan
    policy.record(recorder, plan, store.report(plan), steps)   # trace rows, after the block
"""

from __future__ import annotations

from .config import PolicyConfig, build_config
from .context import AttentionContext
from .deep_sink import DeepSinkCache, DeepSinkConfig
from .geometry import PARTITIONS, CacheGeometry
from .packforcing import PackForcingCache, PackForcingConfig
from .plan import BlockPlan
from .policy import CachePolicy
from .simple import FullCache, SinkWindowCache, WindowCache, window_from_local_attn_size
from .store import CacheStore, KVBuffer

POLICIES = {
    "full": FullCache,
    "window": WindowCache,
    "sink_window": SinkWindowCache,
    "packforcing": PackForcingCache,
    "deep_sink": DeepSinkCache,
}


def make_policy(name: str, geometry: CacheGeometry, compressed_t_offsets=None, **options) -> CachePolicy:
    """Build a policy by name. ``options`` are its config fields (e.g. ``window_frames=12``,
    ``top_k=16``); ``compressed_t_offsets`` [N_c] (from `Compressor.token_centres`) is needed by
    compressing policies."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose from {sorted(POLICIES)}")
    cls = POLICIES[name]
    try:
        config = build_config(cls.config_class, options, name)
    except ValueError as err:
        if cls.compresses:
            raise
        raise ValueError(f"bad option for policy {name!r}: {err}") from None
    if cls.compresses:
        if compressed_t_offsets is None:
            raise ValueError(f"policy {name!r} needs compressed_t_offsets (from the compressor)")
        return cls(geometry, compressed_t_offsets, config=config)
    return cls(geometry, config=config)


__all__ = ["PARTITIONS", "POLICIES", "AttentionContext", "BlockPlan", "CacheGeometry", "CachePolicy", "CacheStore",
           "DeepSinkConfig", "KVBuffer", "PackForcingConfig", "PolicyConfig", "make_policy",
           "window_from_local_attn_size"]
