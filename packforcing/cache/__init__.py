"""Cache policies by name (`make_policy`), each in three parts: pure policy, store, attention context.

    policy (no tensors)  --plan(b)-->  BlockPlan  --apply-->  store (preallocated K/V)
      sink/recent/archive             regions, RoPE starts,      --context(plan, step)-->  AttentionContext
      metadata, config                evictions, selection         score(layer, q) at step 0; update(layer, k, v)

One block's life (the sampler owns it; nothing else changes the cache):
    plan = policy.plan(b)               # where every held block sits, at which position; what leaves
    store.apply(plan)                   # re-rotate moved blocks; fixed/shared selection; index tensors
    for step in (*steps, commit):       # one store.context(plan, step, commit) per forward
        model.forward_block(..., ctx)   # each layer: [ctx.score(q)], ctx.update(k, v) -> attended K/V
    store.commit(plan); policy.commit(plan)                     # K/V to their region; metadata follows
    policy.record(recorder, plan, store.report(plan), steps)    # trace rows, read after the block
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


def make_policy(name: str, geometry: CacheGeometry, compressed_t_offsets=None, compressed_grid=None,
                **options) -> CachePolicy:
    """Build a policy by name. ``options`` are its config fields (e.g. ``window_frames=12``,
    ``top_k=16``); ``compressed_t_offsets`` [N_c] (from `Compressor.token_centres`) is needed by
    compressing policies; ``compressed_grid`` (t, h, w) with t·h·w = N_c names each compressed
    token's cell in the trace (default: (N_c, 1, 1))."""
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
        return cls(geometry, compressed_t_offsets, config=config, compressed_grid=compressed_grid)
    return cls(geometry, config=config)


__all__ = ["PARTITIONS", "POLICIES", "AttentionContext", "BlockPlan", "CacheGeometry", "CachePolicy", "CacheStore",
           "DeepSinkConfig", "KVBuffer", "PackForcingConfig", "PolicyConfig", "make_policy",
           "window_from_local_attn_size"]
