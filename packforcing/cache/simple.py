"""Block-slot caches at full resolution: `full`, `window` and `sink_window`.

One preallocated buffer per layer holds ``[current | slot 1 | slot 2 | …]``, each slot one block of
K/V. Slots are filled in order, so the valid entries are always a prefix and the attention view is
a slice (no copy, no concatenation). Attention is invariant to the order of keys (each key carries
its own RoPE position), so a ring of slots needs no reordering. Keys keep their absolute temporal
positions (Self-Forcing's rolling cache); positions are computed on the fly, so nothing runs off a
table at any length.
"""

from __future__ import annotations

from .base import CacheGeometry, CachePolicy, allocate_kv, heads_first


class SlotCache(CachePolicy):
    """Shared machinery; subclasses choose the number of slots and the slot of each block."""

    sink_blocks = 0  # leading slots that are never overwritten (reported as "sink")

    def __init__(self, geometry: CacheGeometry, recorder=None):
        super().__init__(geometry, recorder)
        self.k = self.v = None

    def num_slots(self, max_blocks: int) -> int:
        raise NotImplementedError

    def slot_of(self, block_index: int) -> int:
        """1-based slot a committed block is written to."""
        raise NotImplementedError

    def reset(self, max_blocks: int) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self.max_blocks = max_blocks
        self.n_slots = self.num_slots(max_blocks)
        self.k, self.v = allocate_kv(self.geometry, (1 + self.n_slots) * self.geometry.tokens_per_block)
        self.slot_blocks: list[int | None] = [None] * (self.n_slots + 1)  # source block per slot
        self.filled = 0
        self.block_index = -1

    def begin_block(self, block_index: int) -> float:
        if self.k is None:
            raise RuntimeError("cache not allocated: call reset(max_blocks) first")
        if block_index >= self.max_blocks:
            raise ValueError(f"block {block_index} beyond the {self.max_blocks} blocks this cache was reset for")
        self.block_index = block_index
        self.step = 0
        return float(block_index * self.geometry.block_frames)

    def _span(self, slot: int) -> slice:
        t = self.geometry.tokens_per_block
        return slice(slot * t, (slot + 1) * t)

    def context_for(self, layer, q, k, v):
        cur = self._span(0)
        self.k[layer, :, :, cur].copy_(heads_first(k))
        self.v[layer, :, :, cur].copy_(heads_first(v))
        self._record_occupancy(layer)
        end = (1 + self.filled) * self.geometry.tokens_per_block
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self) -> None:
        slot = self.slot_of(self.block_index)
        src, dst = self._span(0), self._span(slot)
        self.k[:, :, :, dst].copy_(self.k[:, :, :, src])
        self.v[:, :, :, dst].copy_(self.v[:, :, :, src])
        self.slot_blocks[slot] = self.block_index
        self.filled = max(self.filled, slot)

    def cached_blocks(self) -> list[int]:
        """Source block indices currently held, oldest first."""
        return sorted(b for b in self.slot_blocks[1:] if b is not None)

    def occupancy(self) -> dict[str, int]:
        t = self.geometry.tokens_per_block
        held = self.cached_blocks()
        sink = sum(1 for b in held if b < self.sink_blocks)
        return {
            "sink": sink * t,
            "mid_archive": 0,
            "mid_selected": 0,
            "recent": (len(held) - sink) * t,
            "current": t if self.block_index >= 0 else 0,
        }

    def budget_tokens(self):
        return (1 + self.n_slots) * self.geometry.tokens_per_block


class FullCache(SlotCache):
    """Keeps every block (memory grows linearly; Self-Forcing within its training length)."""

    name = "full"

    def num_slots(self, max_blocks):
        return max_blocks

    def slot_of(self, block_index):
        return 1 + block_index

    def budget_tokens(self):
        return None


class WindowCache(SlotCache):
    """Keeps the last ``window_frames`` latent frames, FIFO (Self-Forcing ``local_attn_size``)."""

    name = "window"

    def __init__(self, geometry, recorder=None, window_frames: int = 12):
        super().__init__(geometry, recorder)
        self.window_blocks = geometry.frames_to_blocks(window_frames, "window_frames")
        if self.window_blocks == 0:
            raise ValueError("window_frames must be at least one block")

    def num_slots(self, max_blocks):
        return self.window_blocks

    def slot_of(self, block_index):
        return 1 + block_index % self.window_blocks


class SinkWindowCache(SlotCache):
    """First ``sink_frames`` + last ``window_frames`` latent frames (LongLive, StreamingLLM)."""

    name = "sink_window"

    def __init__(self, geometry, recorder=None, sink_frames: int = 8, window_frames: int = 12):
        super().__init__(geometry, recorder)
        self.sink_blocks = geometry.frames_to_blocks(sink_frames, "sink_frames")
        self.window_blocks = geometry.frames_to_blocks(window_frames, "window_frames")
        if self.window_blocks == 0:
            raise ValueError("window_frames must be at least one block")

    def num_slots(self, max_blocks):
        return self.sink_blocks + self.window_blocks

    def slot_of(self, block_index):
        if block_index < self.sink_blocks:
            return 1 + block_index
        return 1 + self.sink_blocks + (block_index - self.sink_blocks) % self.window_blocks

