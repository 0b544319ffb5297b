"""`deep_sink`: a training-free Deep Forcing baseline (deep sink + participative compression). Pure policy.

Per layer, the store's workspace is ``[current | sink | recent | kept (C tokens) | incoming (T)]``,
all at full resolution. When a block leaves ``recent`` its tokens become *incoming*; at the first
denoising step of the next block each layer scores the kept + incoming tokens by the attention the
current block's queries (a deterministic subsample, half the heads) pay them, keeps the top C, and
drops the rest for good. Token-level selection is this policy's difference from PackForcing's
block-level, compressed mid.

RoPE re-alignment (as PackForcing's adjustment): sink at [0, S); the kept tokens' distinct source
frames are packed, in temporal order, into the ``M = min(C / tokens_per_frame, frames that ever
reached the middle)`` positions before the recent blocks (anchored at the recent end, fractional
spacing if they come from more than M frames); then recent, then current. ``M`` does not depend on
the layer, so the current block has one position for all layers. Kept keys are stored at the
position they entered the middle with, and attention reads a rotated copy (no rounding drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import PolicyConfig, knob, recent_frames_knob, rope_adjust_knob, score_queries_knob, sink_frames_knob
from .deep_sink_store import DeepSinkStore
from .plan import BlockPlan, CommitPlan, Held, TokenSelection
from .policy import SinkRecentPolicy

@dataclass
class DeepSinkConfig(PolicyConfig):
    sink_frames: int | None = sink_frames_knob()
    recent_frames: int | None = recent_frames_knob()
    keep_tokens: int | None = knob(None, help="tokens kept by attention score between sink and recent "
                                              "(empty = automatic: two blocks)", label="Kept middle tokens",
                                   unit="tokens", minimum=0, maximum="frames_of_tokens")
    score_queries: int = score_queries_knob("query tokens sampled for the attention scores")
    rope_adjust: bool = rope_adjust_knob("tokens")


class DeepSinkCache(SinkRecentPolicy):
    name, config_class, store_class = "deep_sink", DeepSinkConfig, DeepSinkStore

    def __init__(self, geometry, config: DeepSinkConfig | None = None):
        super().__init__(geometry, config)
        g, c = geometry, self.config
        self.n_sink = g.frames_to_blocks(c.sink_frames, "sink_frames")
        self.n_recent = g.frames_to_blocks(c.recent_frames, "recent_frames")
        if self.n_recent == 0:
            raise ValueError("deep_sink needs recent_frames >= one block")
        self.keep = 2 * g.tokens_per_block if c.keep_tokens is None else int(c.keep_tokens)
        T = g.tokens_per_block
        self.sink_offset, self.recent_offset = T, T * (1 + self.n_sink)
        self.kept_offset = T * (1 + self.n_sink + self.n_recent)
        self.incoming_offset = self.kept_offset + self.keep
        self.mid_capacity_frames = math.ceil(self.keep / g.tokens_per_frame)

    def reset(self, max_blocks: int) -> None:
        super().reset(max_blocks)
        self.incoming: Held | None = None  # the block that just left recent
        self.middle_frames = 0  # frames that ever entered the middle
        self.kept_tokens = 0  # per layer (the same count in every layer)

    def _middle_span(self) -> int:
        return min(self.mid_capacity_frames, self.middle_frames)

    def plan(self, block: int) -> BlockPlan:
        self._start(block)
        block_frames, T, c = self.geometry.block_frames, self.geometry.tokens_per_block, self.config
        moves, current = [], float(block * block_frames)
        if c.rope_adjust:
            moves, current = self._reposition_recent(len(self.sink) * block_frames + self._middle_span())
        before = self.kept_tokens
        after = min(self.keep, before + T) if self.incoming is not None else before
        sink_end = float(len(self.sink) * block_frames)
        selection = TokenSelection(self.incoming, before, after, sink_end, self._middle_span(), c.rope_adjust)
        self.kept_tokens = after
        attend = T * (1 + len(self.sink) + len(self.recent)) if self.middle_frames == 0 else self.kept_offset + after
        if len(self.sink) < self.n_sink:
            commit = CommitPlan("sink", len(self.sink))
        elif len(self.recent) == self.n_recent:  # the oldest recent block becomes incoming
            commit = CommitPlan("recent", self.recent[0].slot, self.recent[0])
        else:
            commit = CommitPlan("recent", len(self.recent))
        self.current = BlockPlan(block, current, attend, self.occupancy(), self._held(), commit, tuple(moves),
                                 selection=selection)
        return self.current

    def commit(self, plan: BlockPlan) -> None:
        c, pos = plan.commit, plan.current_pos
        self.incoming = None  # every layer has scored it in this block's first step
        if c.region == "sink":
            self.sink.append(Held(plan.block, c.slot, pos, pos))
            return
        if c.evicted is not None:
            self.incoming = self.recent.pop(0)
            self.middle_frames += self.geometry.block_frames
        self.recent.append(Held(plan.block, c.slot, pos, pos))

    # -- reporting ------------------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        T = self.geometry.tokens_per_block
        return {"sink": len(self.sink) * T, "mid_archive": self.kept_tokens, "mid_selected": self.kept_tokens,
                "recent": len(self.recent) * T, "current": T if self.block_index >= 0 else 0}

    def budget_tokens(self) -> int:
        return self.incoming_offset + self.geometry.tokens_per_block

    def record(self, recorder, plan, report, num_steps: int) -> None:
        """``report`` per layer: (scores, candidate frames, kept mask, kept frames, kept positions)."""
        super().record(recorder, plan, report, num_steps)
        block_frames, b = self.geometry.block_frames, plan.block
        for layer, (scores, frames, kept_mask, kept_frames, kept_pos) in enumerate(report):
            per_block: dict[int, list] = {}
            for score, frame, kept in zip(scores, frames, kept_mask):
                entry = per_block.setdefault(frame // block_frames, [0.0, False])
                entry[0] += score
                entry[1] = entry[1] or kept
            if per_block:
                keys = sorted(per_block)
                recorder.mid_scores(b, layer, keys, [k * block_frames for k in keys],
                                    [(k + 1) * block_frames for k in keys], [per_block[k][0] for k in keys],
                                    [per_block[k][1] for k in keys])
            for region, h in plan.held:
                if region == "sink":
                    self._record_position(recorder, b, layer, "sink", h.block, h.pos)
            first: dict[int, float] = {}
            for frame, pos in zip(kept_frames, kept_pos):
                first[frame // block_frames] = min(pos, first.get(frame // block_frames, math.inf))
            for blk in sorted(first):
                self._record_position(recorder, b, layer, "mid_selected", blk, first[blk])
            for region, h in plan.held:
                if region == "recent":
                    self._record_position(recorder, b, layer, "recent", h.block, h.pos)
            self._record_position(recorder, b, layer, "current", b, plan.current_pos)
