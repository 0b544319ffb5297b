"""The pure-policy interface: history metadata in, one `BlockPlan` per block out. No tensors.

Lifecycle (the sampler drives it)::

    store = policy.allocate(max_blocks)     # resets the policy; preallocates the store
    for block in range(num_blocks):
        plan = policy.plan(block)          # positions, layout, what is evicted / archived / selected
        store.apply(plan)                  # re-rotations, per-block index tensors (on the device)
        ... forwards, each with store.context(plan, step, commit)
        store.commit(plan); policy.commit(plan)   # the block joins the history
"""

from __future__ import annotations

import dataclasses

from .config import PolicyConfig
from .geometry import PARTITIONS, CacheGeometry
from .plan import BlockPlan, Held, Move


class CachePolicy:
    """Base class: config, bookkeeping and the occupancy of the block in progress."""

    name = "base"
    compresses = False  # True if the policy wants compressed tokens at commit
    config_class: type[PolicyConfig] = PolicyConfig
    store_class = None

    def __init__(self, geometry: CacheGeometry, config: PolicyConfig | None = None):
        self.geometry = geometry
        config = (config or self.config_class()).resolved(geometry.block_frames)
        config.validate(geometry)
        self.config = config
        self.max_blocks = 0
        self.block_index = -1
        self.current: BlockPlan | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self, max_blocks: int) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self.max_blocks = max_blocks
        self.block_index = -1
        self.current = None

    def allocate(self, max_blocks: int, device=None):
        """``reset(max_blocks)`` and a fresh store for it (``device="meta"`` allocates nothing)."""
        self.reset(max_blocks)
        geometry = self.geometry if device is None else dataclasses.replace(self.geometry, device=device)
        return self.store_class(self, geometry)

    def _start(self, block: int) -> None:
        if self.max_blocks == 0:
            raise RuntimeError("cache not allocated: call reset(max_blocks) first")
        if block >= self.max_blocks:
            raise ValueError(f"block {block} beyond the {self.max_blocks} blocks this cache was reset for")
        self.block_index = block

    def plan(self, block: int) -> BlockPlan:
        raise NotImplementedError

    def commit(self, plan: BlockPlan) -> None:
        raise NotImplementedError

    def needs_compression(self, block_index: int) -> bool:
        return False

    # -- reporting ---------------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        """Tokens per layer in each partition (see `PARTITIONS`) now."""
        raise NotImplementedError

    def attended_tokens(self) -> int:
        occ = self.occupancy()
        return occ["sink"] + occ["mid_selected"] + occ["recent"] + occ["current"]

    def kv_tokens(self) -> int:
        """Tokens per layer whose K/V are stored (history plus the current block).

        ``mid_selected`` is the attended subset of ``mid_archive`` (the trace's convention), so it
        is not added; a policy that keeps the selection as a separate copy overrides this."""
        occ = self.occupancy()
        return occ["sink"] + occ["mid_archive"] + occ["recent"] + occ["current"]

    def kv_bytes(self) -> int:
        return self.kv_tokens() * self.geometry.bytes_per_token

    def budget_tokens(self) -> int | None:
        """Upper bound of `kv_tokens` at any length (None = unbounded)."""
        return None

    def _record_position(self, recorder, block: int, layer: int, region: str, source: int, pos: float) -> None:
        """One ``positions`` row: ``source`` block's frame span, its natural start and its start now."""
        frames = self.geometry.block_frames
        recorder.positions(block, layer, region, source, source * frames, (source + 1) * frames,
                           float(source * frames), pos)

    def record(self, recorder, plan: BlockPlan, report, num_steps: int) -> None:
        """Write the block's rows (occupancy per step and layer; scores and positions where the
        policy selects) from its plan and the store's `report`. Called after the block."""
        per_layer = self.geometry.bytes_per_token // self.geometry.num_layers
        for step in range(num_steps + 1):
            for layer in range(self.geometry.num_layers):
                for partition in PARTITIONS:
                    tokens = plan.occupancy[partition]
                    recorder.occupancy(plan.block, step, layer, partition, tokens, tokens * per_layer)


class SinkRecentPolicy(CachePolicy):
    """Shared bookkeeping of PackForcing and deep_sink: ``sink`` and ``recent`` lists of `Held` blocks
    at full resolution (oldest first; ``slot`` indexes their region)."""

    def reset(self, max_blocks: int) -> None:
        super().reset(max_blocks)
        self.sink: list[Held] = []
        self.recent: list[Held] = []

    def _reposition_recent(self, base: float) -> tuple[list[Move], float]:
        """Recent blocks at contiguous positions from ``base``; returns the moves and the current
        block's start."""
        block_frames, moves = self.geometry.block_frames, []
        for i, held in enumerate(self.recent):
            new = float(base + i * block_frames)
            if new != held.pos:
                moves.append(Move("recent", held.slot, new - held.pos))
                self.recent[i] = Held(held.block, held.slot, new, held.commit_pos)
        return moves, float(base + len(self.recent) * block_frames)

    def _held(self) -> tuple[tuple[str, Held], ...]:
        return tuple([("sink", h) for h in self.sink] + [("recent", h) for h in self.recent])
