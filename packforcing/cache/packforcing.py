"""PackForcing's three-partition cache: sink / compressed top-k mid / recent (+ current). Pure policy.

Per layer the store keeps one *workspace* that attention reads (see `PackForcingStore`)::

    [ current (T) | sink (n_sink·T) | recent (n_recent·T) | selected mid (k·N_c) | scratch (N_c) ]

T = tokens of one block, N_c = compressed tokens of one block. Compressed blocks live in a FIFO
*archive*; at the first denoising step of each block the top-k of them are scored, gathered into
the "selected mid" region and re-rotated; the remaining steps and the commit pass reuse that view.

Full↔Reduced exchange: a committed block enters `recent` with its full K/V *and* a compressed backup
(the K/V its compressed tokens got in the same commit pass). When it leaves `recent`, the full K/V
are overwritten and the backup joins the archive.

Temporal RoPE adjustment (``rope_adjust``): the kept blocks get contiguous temporal positions —
sink at [0, S), the selected mid blocks after it (``mid_span`` positions each), then recent, then the
current block. RoPE is relative, so this equals the paper's Fig. 2(c) anchoring at the recent end
up to one constant shift, and keeps every position below ``S + k·span + R + B_f`` at any video length.
With the adjustment off, keys keep the absolute positions they were committed at (the ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import (MAX_CACHE_BLOCKS, PolicyConfig, knob, recent_frames_knob, rope_adjust_knob, score_queries_knob,
                     sink_frames_knob)
from .packforcing_store import PackForcingStore
from .plan import BlockPlan, CommitPlan, Held, MidSelection
from .policy import SinkRecentPolicy

MID_SPANS = ("span", "compressed", "single")
SELECTIONS = ("topk", "recency")
SCOPES = ("layer", "shared")


@dataclass
class PackForcingConfig(PolicyConfig):
    """Knobs of the policy. Frames are latent frames and must be whole blocks."""

    sink_frames: int | None = sink_frames_knob()
    recent_frames: int | None = recent_frames_knob()
    top_k: int = knob(16, help="compressed mid blocks attended per generation block", label="Top-k mid blocks",
                      unit="blocks", minimum=0, maximum=MAX_CACHE_BLOCKS, studio_range=(0, 64))
    archive_blocks: int = knob(128, help="compressed mid blocks stored, FIFO beyond it", label="Mid archive (blocks)",
                               unit="blocks", minimum=1, maximum=MAX_CACHE_BLOCKS, studio_range=(1, 512), advanced=True)
    selection: str = knob("topk", help="topk = paper's scores; recency = the k newest (ablation)",
                          label="Mid selection", choices=SELECTIONS, advanced=True)
    scope: str = knob("layer", help="each layer selects, or one selection shared by all layers",
                      label="Selection scope", choices=SCOPES, advanced=True)
    score_queries: int = score_queries_knob("query tokens sampled for the top-k scores (current + recent)")
    rope_adjust: bool = rope_adjust_knob("blocks")
    mid_span: str = knob("span", help="temporal positions one mid block occupies after adjustment: B_f, ceil(B_f/2) "
                                      "or 1", label="Mid-span mode", choices=MID_SPANS)
    archive_device: str | None = knob(None, help="e.g. 'cpu' to keep the archive in host memory",
                                      label="Archive device", hidden=True)

    def validate(self, geometry) -> None:
        super().validate(geometry)
        if self.archive_blocks < self.top_k:
            raise ValueError(f"archive_blocks ({self.archive_blocks}) must be >= max(1, top_k={self.top_k})")


class PackForcingCache(SinkRecentPolicy):
    """Sink, recent and archive bookkeeping; plans which blocks are attended where."""

    name, compresses, config_class, store_class = "packforcing", True, PackForcingConfig, PackForcingStore

    def __init__(self, geometry, compressed_t_offsets: torch.Tensor, config: PackForcingConfig | None = None,
                 compressed_grid: tuple[int, int, int] | None = None):
        super().__init__(geometry, config)
        g, c = geometry, self.config
        self.n_sink = g.frames_to_blocks(c.sink_frames, "sink_frames")
        self.n_recent = g.frames_to_blocks(c.recent_frames, "recent_frames")
        if c.scope == "shared" and self.n_recent == 0:
            raise ValueError("scope='shared' scores with the recent blocks' queries: needs recent_frames > 0")
        # temporal centre of each compressed token relative to its block start, latent frames (N_c floats)
        self.t_offsets = tuple(float(t) for t in compressed_t_offsets)
        self.compressed_tokens = len(self.t_offsets)
        self.compressed_grid = tuple(int(n) for n in (compressed_grid or (self.compressed_tokens, 1, 1)))
        if math.prod(self.compressed_grid) != self.compressed_tokens:
            raise ValueError(f"compressed_grid {self.compressed_grid} does not hold {self.compressed_tokens} tokens")
        self.span = {"span": g.block_frames, "compressed": math.ceil(g.block_frames / 2), "single": 1}[c.mid_span]
        T = g.tokens_per_block
        self.sink_offset = T
        self.recent_offset = T + self.n_sink * T
        self.mid_offset = self.recent_offset + self.n_recent * T
        self.workspace_tokens = self.mid_offset + (c.top_k + 1) * self.compressed_tokens

    def reset(self, max_blocks: int) -> None:
        super().reset(max_blocks)
        self.archive: list[Held] = []  # oldest first; pos = temporal start at commit
        self.n_selected = 0

    def needs_compression(self, block_index: int) -> bool:
        return block_index >= self.n_sink

    # -- planning ------------------------------------------------------------------------------
    def plan(self, block: int) -> BlockPlan:
        self._start(block)
        block_frames, T, c = self.geometry.block_frames, self.geometry.tokens_per_block, self.config
        n_compressed = self.compressed_tokens
        self.n_selected = k = min(c.top_k, len(self.archive))
        moves, current = [], float(block * block_frames)
        if c.rope_adjust:  # recent keeps contiguous positions after the mid
            moves, current = self._reposition_recent(len(self.sink) * block_frames + k * self.span)
        selection = None
        if self.archive:
            sink_end = len(self.sink) * block_frames
            shift = (len(self.archive) - k) * self.span  # Fig. 2c-i: every candidate placed, anchored at recent
            selection = MidSelection(
                tuple(self.archive), k, c.selection, c.scope,
                starts=tuple(float(sink_end + i * self.span) for i in range(k)),
                scoring_starts=tuple(float(sink_end - shift + j * self.span) for j in range(len(self.archive))))
        attend = self.mid_offset + k * n_compressed if self.archive else T * (1 + len(self.sink) + len(self.recent))
        self.current = BlockPlan(block, current, attend, self.occupancy(), self._held(), self._commit_plan(),
                                 tuple(moves), self.needs_compression(block), selection)
        return self.current

    def _archive_slot(self) -> tuple[int, Held | None]:
        if len(self.archive) == self.config.archive_blocks:  # FIFO beyond capacity
            return self.archive[0].slot, self.archive[0]
        return len(self.archive), None

    def _commit_plan(self) -> CommitPlan:
        if len(self.sink) < self.n_sink:
            return CommitPlan("sink", len(self.sink))
        if self.n_recent == 0:
            return CommitPlan("archive", -1, None, *self._archive_slot())
        if len(self.recent) == self.n_recent:  # Full -> Reduced: the oldest recent block leaves
            return CommitPlan("recent", self.recent[0].slot, self.recent[0], *self._archive_slot())
        return CommitPlan("recent", len(self.recent))

    def commit(self, plan: BlockPlan) -> None:
        c, pos = plan.commit, plan.current_pos
        if c.dropped is not None:
            self.archive.pop(0)
        if c.region == "sink":
            self.sink.append(Held(plan.block, c.slot, pos, pos))
        elif c.region == "archive":
            self.archive.append(Held(plan.block, c.archive_slot, pos, pos))
        else:
            if c.evicted is not None:
                old = self.recent.pop(0)
                self.archive.append(Held(old.block, c.archive_slot, old.commit_pos, old.commit_pos))
            self.recent.append(Held(plan.block, c.slot, pos, pos))

    # -- reporting ------------------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        T, n_compressed = self.geometry.tokens_per_block, self.compressed_tokens
        return {
            "sink": len(self.sink) * T,
            "mid_archive": (len(self.archive) + len(self.recent)) * n_compressed,  # archive + recent backups
            "mid_selected": self.n_selected * n_compressed,
            "recent": len(self.recent) * T,
            "current": T if self.block_index >= 0 else 0,
        }

    def kv_tokens(self) -> int:
        """Stored tokens: the selected mid blocks are *copies* gathered into the workspace, so they count."""
        return super().kv_tokens() + self.occupancy()["mid_selected"]

    def budget_tokens(self) -> int:
        c, T = self.config, self.geometry.tokens_per_block
        return T * (1 + self.n_sink + self.n_recent) + self.compressed_tokens * (c.top_k + c.archive_blocks + self.n_recent)

    def positions(self, plan: BlockPlan, selected: list[Held]) -> list[tuple[str, int, float]]:
        """(region, source block, temporal start) of every block attended, ``selected`` mid included."""
        out = [(region, h.block, h.pos) for region, h in plan.held if region == "sink"]
        for i, h in enumerate(selected):
            out.append(("mid_selected", h.block, plan.selection.starts[i] if self.config.rope_adjust else h.pos))
        out += [(region, h.block, h.pos) for region, h in plan.held if region == "recent"]
        out.append(("current", plan.block, plan.current_pos))
        return out

    def record(self, recorder, plan, report, num_steps: int) -> None:
        super().record(recorder, plan, report, num_steps)
        block_frames = self.geometry.block_frames
        n_c = self.compressed_tokens
        cells = [divmod(divmod(j, self.compressed_grid[2])[0], self.compressed_grid[1]) + (j % self.compressed_grid[2],)
                 for j in range(n_c)]  # token j -> (t, y, x): the compressor's flatten order
        for layer in range(self.geometry.num_layers):
            chosen = []
            if plan.selection is not None:
                cands = plan.selection.candidates
                scores, index, mass = report[layer]
                chosen = [cands[i] for i in index]
                picked = set(index)
                recorder.mid_scores(plan.block, layer, [h.block for h in cands],
                                    [h.block * block_frames for h in cands], [(h.block + 1) * block_frames for h in cands],
                                    scores if scores is not None else [float("nan")] * len(cands),
                                    [i in picked for i in range(len(cands))])
                if mass is not None and chosen:
                    recorder.mid_attention(plan.block, layer, [h.block for h in chosen for _ in range(n_c)],
                                           list(range(n_c)) * len(chosen), [c[0] for c in cells] * len(chosen),
                                           [c[1] for c in cells] * len(chosen), [c[2] for c in cells] * len(chosen),
                                           mass)
            for region, block, pos in self.positions(plan, chosen):
                self._record_position(recorder, plan.block, layer, region, block, pos)
