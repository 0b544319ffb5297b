"""Block-slot caches at full resolution: `full`, `window` and `sink_window`.

One preallocated buffer per layer holds ``[current | slot 1 | slot 2 | …]``, each slot one block of
K/V. Slots are filled in order, so the valid entries are always a prefix and the attention view is
a slice (no copy, no concatenation). Attention is invariant to the order of keys (each key carries
its own RoPE position), so a ring of slots needs no reordering. Keys keep their absolute temporal
positions (Self-Forcing's rolling cache); positions are computed on the fly, so nothing runs off a
table at any length.

``window_frames`` counts the *history* only. Self-Forcing's ``local_attn_size`` counts the whole
attended span, the current block and any sink included: ``window_frames = local_attn_size −
sink_frames − block_frames`` (`window_from_local_attn_size`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PolicyConfig, frames_knob, sink_frames_knob
from .plan import BlockPlan, CommitPlan, Held
from .policy import CachePolicy
from .store import CacheStore, KVBuffer

def window_from_local_attn_size(local_attn_size: int, block_frames: int, sink_frames: int = 0) -> int:
    """Self-Forcing's ``local_attn_size`` (latent frames attended, current block and sink included)
    -> our ``window_frames`` (history frames after the sink)."""
    window = local_attn_size - sink_frames - block_frames
    if window <= 0:
        raise ValueError(f"local_attn_size={local_attn_size} leaves no history after the sink ({sink_frames}) "
                         f"and the current block ({block_frames})")
    return window


def window_knob():
    return frames_knob("Window frames", "most recent history frames kept at full resolution, FIFO (the current "
                       "block is not counted: Self-Forcing's local_attn_size = window + sink + block)", 3, (1, 32))


@dataclass
class FullConfig(PolicyConfig):
    """`full` has no knobs."""


@dataclass
class WindowConfig(PolicyConfig):
    window_frames: int | None = window_knob()


@dataclass
class SinkWindowConfig(PolicyConfig):
    sink_frames: int | None = sink_frames_knob()
    window_frames: int | None = window_knob()


class SlotPolicy(CachePolicy):
    """Shared bookkeeping; subclasses choose the number of slots and the slot of each block."""

    sink_blocks = 0  # leading slots that are never overwritten (reported as "sink")

    def num_slots(self, max_blocks: int) -> int:
        raise NotImplementedError

    def slot_of(self, block_index: int) -> int:
        """1-based slot a committed block is written to."""
        raise NotImplementedError

    def reset(self, max_blocks: int) -> None:
        super().reset(max_blocks)
        self.n_slots = self.num_slots(max_blocks)
        self.slot_blocks: list[int | None] = [None] * (self.n_slots + 1)  # source block per slot
        self.filled = 0

    def cached_blocks(self) -> list[int]:
        """Source block indices currently held, oldest first."""
        return sorted(b for b in self.slot_blocks[1:] if b is not None)

    def plan(self, block: int) -> BlockPlan:
        self._start(block)
        block_frames, T = self.geometry.block_frames, self.geometry.tokens_per_block
        slot = self.slot_of(block)
        by_block = sorted((b, s) for s, b in enumerate(self.slot_blocks) if b is not None)
        starts = {b: float(b * block_frames) for b, _ in by_block}  # absolute positions
        held = tuple(("sink" if b < self.sink_blocks else "recent", Held(b, s, starts[b], starts[b])) for b, s in by_block)
        self.current = BlockPlan(block, float(block * block_frames), (1 + self.filled) * T, self.occupancy(), held,
                                 CommitPlan("slot", slot))
        return self.current

    def commit(self, plan: BlockPlan) -> None:
        self.slot_blocks[plan.commit.slot] = plan.block
        self.filled = max(self.filled, plan.commit.slot)

    def occupancy(self) -> dict[str, int]:
        t = self.geometry.tokens_per_block
        held = self.cached_blocks()
        sink = sum(1 for b in held if b < self.sink_blocks)
        return {"sink": sink * t, "mid_archive": 0, "mid_selected": 0, "recent": (len(held) - sink) * t,
                "current": t if self.block_index >= 0 else 0}

    def budget_tokens(self):
        return (1 + self.n_slots) * self.geometry.tokens_per_block


class SlotStore(CacheStore):
    """``workspace`` [L, B, heads, (1 + slots)·T, d]: the current block, then one slot per held block."""

    def __init__(self, policy: SlotPolicy, geometry):
        super().__init__(geometry)
        self.workspace = KVBuffer(geometry, (1 + policy.n_slots) * geometry.tokens_per_block)

    def update(self, plan, layer, k, v):
        self.workspace.write(layer, 0, k, v)
        return self.workspace.view(layer, plan.attend_tokens)

    def commit(self, plan) -> None:
        T = self.geometry.tokens_per_block
        self.workspace.copy_from(self.workspace, 0, plan.commit.slot * T, T)


class FullCache(SlotPolicy):
    """Keeps every block (memory grows linearly; Self-Forcing within its training length)."""

    name, config_class, store_class = "full", FullConfig, SlotStore

    def num_slots(self, max_blocks):
        return max_blocks

    def slot_of(self, block_index):
        return 1 + block_index

    def budget_tokens(self):
        return None


class WindowCache(SlotPolicy):
    """Keeps the last ``window_frames`` latent frames of history, FIFO."""

    name, config_class, store_class = "window", WindowConfig, SlotStore

    def __init__(self, geometry, config=None):
        super().__init__(geometry, config)
        self.window_blocks = geometry.frames_to_blocks(self.config.window_frames, "window_frames")
        if self.window_blocks == 0:
            raise ValueError("window_frames must be at least one block")

    def num_slots(self, max_blocks):
        return self.window_blocks

    def slot_of(self, block_index):
        return 1 + block_index % self.window_blocks


class SinkWindowCache(SlotPolicy):
    """First ``sink_frames`` + last ``window_frames`` latent frames (LongLive, StreamingLLM)."""

    name, config_class, store_class = "sink_window", SinkWindowConfig, SlotStore

    def __init__(self, geometry, config=None):
        super().__init__(geometry, config)
        self.sink_blocks = geometry.frames_to_blocks(self.config.sink_frames, "sink_frames")
        self.window_blocks = geometry.frames_to_blocks(self.config.window_frames, "window_frames")
        if self.window_blocks == 0:
            raise ValueError("window_frames must be at least one block")

    def num_slots(self, max_blocks):
        return self.sink_blocks + self.window_blocks

    def slot_of(self, block_index):
        if block_index < self.sink_blocks:
            return 1 + block_index
        return 1 + self.sink_blocks + (block_index - self.sink_blocks) % self.window_blocks
