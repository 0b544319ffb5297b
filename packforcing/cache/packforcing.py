"""PackForcing's three-partition cache: sink / compressed top-k mid / recent (+ current).

Per layer, one preallocated *workspace* is what attention reads::

    [ current (T) | sink (n_sink·T) | recent (n_recent·T) | selected mid (k·N_c) | scratch (N_c) ]

T = tokens of one block, N_c = compressed tokens of one block. Sink and recent blocks live in the
workspace itself (full resolution). Compressed blocks live in a FIFO *archive* (optionally in host
memory); at the first denoising step of each block the top-k of them are scored, gathered into the
"selected mid" region and re-rotated; the remaining steps and the commit pass reuse that view.

Full↔Reduced exchange: a committed block enters `recent` with its full K/V *and* a compressed backup
(the K/V its compressed tokens got in the same commit pass). When it leaves `recent`, the full K/V
are overwritten and the backup joins the archive.

Temporal RoPE adjustment (``rope_adjust``): the kept blocks get contiguous temporal positions —
sink at [0, S), the selected mid blocks after it (``mid_span`` positions each), then recent, then the
current block. RoPE is relative, so this equals the paper's Fig. 2(c) anchoring at the recent end
up to one constant shift, and keeps every position below ``S + k·span + R + B`` at any video length.
Recent/current keep their natural distances. With the adjustment off, keys keep the absolute
positions they were committed at (the ablation).

Selection score (paper): s_m = mean over a query subsample i and half the heads h of
Σ_j q_i·k_{m,j}/√d. Since the sum over j is linear, it equals q_i·(Σ_j k_{m,j}) — so only a
per-block key *sum* is kept on the device for scoring, exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .base import CacheGeometry, CachePolicy, allocate_kv, heads_first

MID_SPANS = ("span", "compressed", "single")
SELECTIONS = ("topk", "recency")
SCOPES = ("layer", "shared")


@dataclass
class PackForcingConfig:
    """Knobs of the policy. Frames are latent frames and must be whole blocks."""

    sink_frames: int = 8
    recent_frames: int = 4
    top_k: int = 16
    archive_blocks: int = 128  # FIFO capacity of the compressed mid archive, in blocks
    selection: str = "topk"  # "topk" (paper) or "recency" (FIFO ablation: the k newest)
    scope: str = "layer"  # "layer": each layer selects; "shared": one selection from summed scores
    score_queries: int = 256  # query tokens sampled per block for scoring (current + recent)
    rope_adjust: bool = True
    mid_span: str = "span"  # temporal positions a mid block occupies: B_f, ceil(B_f/2), or 1
    archive_device: str | None = None  # e.g. "cpu" to keep the archive in host memory

    def validate(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.archive_blocks < self.top_k or self.archive_blocks < 1:
            raise ValueError(f"archive_blocks ({self.archive_blocks}) must be >= max(1, top_k={self.top_k})")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose from {SELECTIONS}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose from {SCOPES}")
        if self.mid_span not in MID_SPANS:
            raise ValueError(f"unknown mid_span {self.mid_span!r}; choose from {MID_SPANS}")
        if self.score_queries < 1:
            raise ValueError(f"score_queries must be >= 1, got {self.score_queries}")


@dataclass
class _Held:
    """A cached block. ``pos``: temporal start its keys are rotated to now (latent frames)."""

    block: int
    pos: float
    slot: int


class PackForcingCache(CachePolicy):
    name = "packforcing"
    compresses = True

    def __init__(self, geometry: CacheGeometry, compressed_t_offsets: torch.Tensor, recorder=None, config=None):
        super().__init__(geometry, recorder)
        self.config = config = config or PackForcingConfig()
        config.validate()
        g = geometry
        self.n_sink = g.frames_to_blocks(config.sink_frames, "sink_frames")
        self.n_recent = g.frames_to_blocks(config.recent_frames, "recent_frames")
        if config.scope == "shared" and self.n_recent == 0:
            raise ValueError("scope='shared' scores with the recent blocks' queries: needs recent_frames > 0")
        # temporal centre of each compressed token relative to its block start, latent frames [N_c]
        self.t_offsets = compressed_t_offsets.double().cpu()
        self.n_c = len(self.t_offsets)
        self.span = {"span": g.block_frames, "compressed": math.ceil(g.block_frames / 2), "single": 1}[
            config.mid_span
        ]
        T = g.tokens_per_block
        self.sink_off = T
        self.recent_off = T + self.n_sink * T
        self.mid_off = self.recent_off + self.n_recent * T
        self.score_heads = torch.arange(0, g.num_heads, 2)  # half of the heads, evenly spread

    # -- allocation ----------------------------------------------------------------------------
    def reset(self, max_blocks: int) -> None:
        g, c = self.geometry, self.config
        self.ws_k, self.ws_v = allocate_kv(g, self.mid_off + c.top_k * self.n_c + self.n_c)
        self.pend_k, self.pend_v = allocate_kv(g, self.n_c)  # compressed K/V of the current block
        self.backup_k, self.backup_v = allocate_kv(g, self.n_recent * self.n_c)
        self.arch_k, self.arch_v = allocate_kv(g, c.archive_blocks * self.n_c, device=c.archive_device)
        n_heads = len(self.score_heads)
        self.arch_ksum = torch.zeros(g.num_layers, g.batch_size, n_heads, c.archive_blocks, g.head_dim, device=g.device)
        self.n_q = max(1, c.score_queries // (1 + self.n_recent))  # queries kept per block
        self.pend_q = torch.zeros(g.num_layers, g.batch_size, self.n_q, n_heads, g.head_dim, device=g.device)
        self.recent_q = torch.zeros(g.num_layers, g.batch_size, self.n_recent, self.n_q, n_heads, g.head_dim, device=g.device)
        self.sink: list[_Held] = []
        self.recent: list[_Held] = []  # oldest first; slot = index into the recent region
        self.archive: list[_Held] = []  # oldest first; pos = temporal start at commit
        self.recent_backup_pos: dict[int, float] = {}
        self.selected: list[list[_Held] | None] = [None] * g.num_layers
        self.block_index = -1
        self.committing = False

    # -- lifecycle -----------------------------------------------------------------------------
    def _n_selected(self) -> int:
        return min(self.config.top_k, len(self.archive))

    def begin_block(self, block_index: int) -> float:
        g, B = self.geometry, self.geometry.block_frames
        self.block_index = block_index
        self.step = 0
        self.selected = [None] * g.num_layers
        self._select_seconds = self._rope_seconds = 0.0
        if not self.config.rope_adjust:
            self.current_pos = float(block_index * B)
            return self.current_pos
        tic = time.perf_counter()
        base = len(self.sink) * B + self._n_selected() * self.span
        for i, held in enumerate(self.recent):  # recent keeps contiguous positions after the mid
            self._move_recent(held, base + i * B)
        self.current_pos = float(base + len(self.recent) * B)
        self._rope_seconds += time.perf_counter() - tic
        if self.config.scope == "shared" and self.archive:
            self._select_shared()
        return self.current_pos

    def _move_recent(self, held: _Held, new_pos: float) -> None:
        delta = new_pos - held.pos
        if delta == 0:
            return
        T = self.geometry.tokens_per_block
        region = slice(self.recent_off + held.slot * T, self.recent_off + (held.slot + 1) * T)
        self.rope.rotate_temporal_(self.ws_k[:, :, :, region], delta)
        self.rope.rotate_temporal_(self.recent_q[:, :, held.slot].transpose(-2, -3), delta)  # [L,B,Hs,nq,d]
        held.pos = new_pos

    def needs_compression(self, block_index: int) -> bool:
        return block_index >= self.n_sink

    # -- attention views ------------------------------------------------------------------------
    def _valid_end(self) -> int:
        T = self.geometry.tokens_per_block
        if self.archive:
            return self.mid_off + self._n_selected() * self.n_c
        return T + len(self.sink) * T + len(self.recent) * T

    def context_for(self, layer, q, k, v):
        T = self.geometry.tokens_per_block
        self.ws_k[layer, :, :, :T].copy_(heads_first(k))
        self.ws_v[layer, :, :, :T].copy_(heads_first(v))
        if self.selected[layer] is None:
            self._select_layer(layer, q)
            self._record_occupancy(layer)
        elif self.recorder.enabled:
            self._record_occupancy(layer)
        if self.committing:  # keep a query sample for scoring while this block is recent
            self.pend_q[layer].copy_(self._query_sample(q))
        end = self._valid_end()
        return self.ws_k[layer, :, :, :end], self.ws_v[layer, :, :, :end]

    def compressed_context_for(self, layer, q, k, v):
        """Commit pass, compressed stream: attends context + block + itself; keeps its K/V."""
        self.store_compressed(layer, k, v)
        end = self._valid_end()
        scratch = slice(end, end + self.n_c)
        self.ws_k[layer, :, :, scratch].copy_(self.pend_k[layer])
        self.ws_v[layer, :, :, scratch].copy_(self.pend_v[layer])
        return self.ws_k[layer, :, :, : end + self.n_c], self.ws_v[layer, :, :, : end + self.n_c]

    def store_compressed(self, layer, k, v):
        """k, v [B, N_c, heads, d] rotated at this block's positions."""
        self.pend_k[layer].copy_(heads_first(k))
        self.pend_v[layer].copy_(heads_first(v))

    def _query_sample(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, N, heads, d] -> deterministic uniform subsample [B, n_q, heads/2, d]."""
        idx = torch.linspace(0, q.shape[1] - 1, self.n_q).round().long().to(q.device)
        return q[:, idx][:, :, self.score_heads.to(q.device)].float()

    # -- selection ------------------------------------------------------------------------------
    def _scoring_keys(self, layer: int) -> torch.Tensor:
        """Per-block key sums [B, Hs, M, d], placed as if every candidate were kept (Fig. 2c-i)."""
        slots = torch.tensor([h.slot for h in self.archive], device=self.arch_ksum.device)
        keys = self.arch_ksum[layer].index_select(2, slots).clone()
        if self.config.rope_adjust:
            shift = (len(self.archive) - self._n_selected()) * self.span
            base = len(self.sink) * self.geometry.block_frames - shift
            delta = torch.tensor([base + j * self.span - h.pos for j, h in enumerate(self.archive)])
            self.rope.rotate_temporal_(keys, delta)
        return keys

    def _scores(self, layer: int, q_current: torch.Tensor | None) -> torch.Tensor:
        """[M] scores of the archive candidates for one layer."""
        queries = [self.recent_q[layer, :, h.slot] for h in self.recent]
        if q_current is not None:
            queries.append(self._query_sample(q_current))
        queries = torch.cat(queries, dim=1)  # [B, n, Hs, d]
        keys = self._scoring_keys(layer)
        logits = torch.einsum("bnhd,bhmd->bnhm", queries, keys) / math.sqrt(self.geometry.head_dim)
        return logits.mean(dim=(0, 1, 2))

    def _choose(self, scores: torch.Tensor | None) -> list[_Held]:
        n = self._n_selected()
        if scores is None or self.config.selection == "recency" or n == len(self.archive):
            return self.archive[len(self.archive) - n :]
        order = torch.argsort(scores, descending=True, stable=True)[:n]
        return [self.archive[i] for i in sorted(order.tolist())]  # temporal order

    def _select_layer(self, layer: int, q: torch.Tensor) -> None:
        tic = time.perf_counter()
        scores = None
        if self.archive and self.config.selection == "topk":
            scores = self._scores(layer, q)
        chosen = self._choose(scores)
        self._select_seconds += time.perf_counter() - tic
        self._install(layer, chosen, scores)

    def _select_shared(self) -> None:
        tic = time.perf_counter()
        scores = None
        if self.config.selection == "topk":
            scores = sum(self._scores(layer, None) for layer in range(self.geometry.num_layers))
        chosen = self._choose(scores)
        self._select_seconds += time.perf_counter() - tic
        for layer in range(self.geometry.num_layers):
            self._install(layer, chosen, scores)

    def _install(self, layer: int, chosen: list[_Held], scores: torch.Tensor | None) -> None:
        """Gather the chosen archive blocks into the workspace and re-rotate them."""
        tic = time.perf_counter()
        self.selected[layer] = chosen
        if chosen:
            n_c, B = self.n_c, self.geometry.block_frames
            arange = torch.arange(n_c)
            src = torch.cat([h.slot * n_c + arange for h in chosen]).to(self.arch_k.device)
            dst = slice(self.mid_off, self.mid_off + len(chosen) * n_c)
            self.ws_k[layer, :, :, dst].copy_(self.arch_k[layer].index_select(2, src))
            self.ws_v[layer, :, :, dst].copy_(self.arch_v[layer].index_select(2, src))
            if self.config.rope_adjust:
                starts = torch.tensor([len(self.sink) * B + i * self.span for i in range(len(chosen))])
                old = torch.tensor([h.pos for h in chosen], dtype=torch.float64)
                new_t = (starts[:, None] + self.t_offsets[None] * self.span / B).flatten()
                old_t = (old[:, None] + self.t_offsets[None]).flatten()
                self.rope.rotate_temporal_(self.ws_k[layer, :, :, dst], new_t - old_t)
        self._rope_seconds += time.perf_counter() - tic
        if self.recorder.enabled:
            self._record_selection(layer, chosen, scores)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self) -> None:
        T, b = self.geometry.tokens_per_block, self.block_index
        if len(self.sink) < self.n_sink:
            slot = len(self.sink)
            self._copy_block(self.sink_off + slot * T)
            self.sink.append(_Held(b, self.current_pos, slot))
        elif self.n_recent == 0:
            self._archive_push(self.pend_k, self.pend_v, slice(0, self.n_c), b, self.current_pos)
        else:
            if len(self.recent) == self.n_recent:  # Full -> Reduced: the oldest recent block leaves
                old = self.recent.pop(0)
                backup = slice(old.slot * self.n_c, (old.slot + 1) * self.n_c)
                self._archive_push(self.backup_k, self.backup_v, backup, old.block, self.recent_backup_pos.pop(old.block))
                slot = old.slot
            else:
                slot = len(self.recent)
            self._copy_block(self.recent_off + slot * T)
            backup = slice(slot * self.n_c, (slot + 1) * self.n_c)
            self.backup_k[:, :, :, backup].copy_(self.pend_k)
            self.backup_v[:, :, :, backup].copy_(self.pend_v)
            self.recent_q[:, :, slot].copy_(self.pend_q)
            self.recent_backup_pos[b] = self.current_pos
            self.recent.append(_Held(b, self.current_pos, slot))
        if self.recorder.enabled:
            self.recorder.phase(b, "select", self._select_seconds)
            self.recorder.phase(b, "rope", self._rope_seconds)

    def _copy_block(self, offset: int) -> None:
        T = self.geometry.tokens_per_block
        self.ws_k[:, :, :, offset : offset + T].copy_(self.ws_k[:, :, :, :T])
        self.ws_v[:, :, :, offset : offset + T].copy_(self.ws_v[:, :, :, :T])

    def _archive_push(self, k, v, src: slice, block: int, pos: float) -> None:
        if len(self.archive) == self.config.archive_blocks:  # FIFO beyond capacity
            slot = self.archive.pop(0).slot
        else:
            slot = len(self.archive)
        dst = slice(slot * self.n_c, (slot + 1) * self.n_c)
        self.arch_k[:, :, :, dst].copy_(k[:, :, :, src])
        self.arch_v[:, :, :, dst].copy_(v[:, :, :, src])
        heads = self.score_heads.to(k.device)
        self.arch_ksum[:, :, :, slot].copy_(k[:, :, :, src].index_select(2, heads).float().sum(dim=3))
        self.archive.append(_Held(block, pos, slot))

    # -- reporting ------------------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        T = self.geometry.tokens_per_block
        layer0 = self.selected[0] if self.selected else None
        n_sel = len(layer0) if layer0 is not None else self._n_selected()
        return {
            "sink": len(self.sink) * T,
            "mid_archive": (len(self.archive) + len(self.recent)) * self.n_c,  # archive + recent backups
            "mid_selected": n_sel * self.n_c,
            "recent": len(self.recent) * T,
            "current": T if self.block_index >= 0 else 0,
        }

    def kv_tokens(self) -> int:
        """Stored tokens: the selected mid blocks are *copies* gathered into the workspace, so they count."""
        return super().kv_tokens() + self.occupancy()["mid_selected"]

    def budget_tokens(self) -> int:
        c, T = self.config, self.geometry.tokens_per_block
        return T * (1 + self.n_sink + self.n_recent) + self.n_c * (c.top_k + c.archive_blocks + self.n_recent)

    def positions(self, layer: int = 0) -> list[tuple[str, int, float]]:
        """(region, source block, temporal start) of every block attended by ``layer`` now."""
        B = self.geometry.block_frames
        out = [("sink", h.block, h.pos) for h in self.sink]
        mids = self.selected[layer] or []
        for i, h in enumerate(mids):
            pos = len(self.sink) * B + i * self.span if self.config.rope_adjust else h.pos
            out.append(("mid_selected", h.block, float(pos)))
        out += [("recent", h.block, h.pos) for h in self.recent]
        out.append(("current", self.block_index, self.current_pos))
        return out

    def _record_selection(self, layer: int, chosen: list[_Held], scores: torch.Tensor | None) -> None:
        B, rec = self.geometry.block_frames, self.recorder
        if self.archive:
            chosen_blocks = {h.block for h in chosen}
            values = scores.tolist() if scores is not None else [float("nan")] * len(self.archive)
            rec.mid_scores(
                self.block_index, layer, [h.block for h in self.archive], [h.block * B for h in self.archive],
                [(h.block + 1) * B for h in self.archive], values, [h.block in chosen_blocks for h in self.archive],
            )
        for region, block, pos in self.positions(layer):
            rec.positions(self.block_index, layer, region, block, block * B, (block + 1) * B, float(block * B), pos)
