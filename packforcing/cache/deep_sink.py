"""`deep_sink`: a training-free Deep Forcing baseline (deep sink + participative compression).

Per layer, the workspace is ``[current | sink | recent | kept (C tokens) | incoming (T)]``, all at
full resolution. When a block leaves ``recent`` its tokens become *incoming*; at the first denoising
step of the next block each layer scores the kept + incoming tokens by the attention the current
block's queries (a deterministic subsample, half the heads) pay them, keeps the top C, and drops the
rest for good. Token-level selection is this policy's difference from PackForcing's block-level,
compressed mid.

RoPE re-alignment (as PackForcing's adjustment): sink at [0, S); the kept tokens' distinct source
frames are packed, in temporal order, into the ``M = min(C / tokens_per_frame, frames that ever
reached the middle)`` positions before the recent blocks (anchored at the recent end, fractional
spacing if they come from more than M frames); then recent, then current. ``M`` does not depend on
the layer, so the current block has one position for all layers.
"""

from __future__ import annotations

import math
import time
import torch

from .base import CacheGeometry, CachePolicy, allocate_kv, heads_first


class DeepSinkCache(CachePolicy):
    name = "deep_sink"

    def __init__(self, geometry: CacheGeometry, recorder=None, sink_frames: int = 8, recent_frames: int = 4,
                 keep_tokens: int | None = None, score_queries: int = 256, rope_adjust: bool = True):
        super().__init__(geometry, recorder)
        g = geometry
        self.n_sink = g.frames_to_blocks(sink_frames, "sink_frames")
        self.n_recent = g.frames_to_blocks(recent_frames, "recent_frames")
        if self.n_recent == 0:
            raise ValueError("deep_sink needs recent_frames >= one block")
        self.keep = 2 * g.tokens_per_block if keep_tokens is None else int(keep_tokens)
        if self.keep < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        if score_queries < 1:
            raise ValueError(f"score_queries must be >= 1, got {score_queries}")
        self.score_queries, self.rope_adjust = score_queries, rope_adjust
        T = g.tokens_per_block
        self.sink_off, self.recent_off = T, T * (1 + self.n_sink)
        self.kept_off = T * (1 + self.n_sink + self.n_recent)
        self.in_off = self.kept_off + self.keep
        self.mid_capacity_frames = math.ceil(self.keep / g.tokens_per_frame)
        self.score_heads = torch.arange(0, g.num_heads, 2)

    def reset(self, max_blocks: int) -> None:
        g = self.geometry
        self.ws_k, self.ws_v = allocate_kv(g, self.in_off + g.tokens_per_block)
        self.kept_src = torch.zeros(g.num_layers, self.keep, dtype=torch.long)  # source token: block·T + index
        self.kept_pos = torch.zeros(g.num_layers, self.keep, dtype=torch.float64)  # rotated-at temporal pos
        self.kept_count = [0] * g.num_layers
        self.sink, self.recent = [], []  # [block, pos, slot]
        self.incoming = None  # (block, pos) of the block that just left recent
        self.middle_frames = 0  # frames that ever entered the middle
        self.selected = [False] * g.num_layers
        self.block_index = -1

    # -- lifecycle -----------------------------------------------------------------------------
    def _middle_span(self) -> int:
        return min(self.mid_capacity_frames, self.middle_frames)

    def begin_block(self, block_index: int) -> float:
        B = self.geometry.block_frames
        self.block_index, self.step = block_index, 0
        self.selected = [False] * self.geometry.num_layers
        self._select_seconds = self._rope_seconds = 0.0
        if not self.rope_adjust:
            self.current_pos = float(block_index * B)
            return self.current_pos
        tic = time.perf_counter()
        base = len(self.sink) * B + self._middle_span()
        T = self.geometry.tokens_per_block
        for i, held in enumerate(self.recent):
            delta = base + i * B - held[1]
            if delta:
                region = slice(self.recent_off + held[2] * T, self.recent_off + (held[2] + 1) * T)
                self.rope.rotate_temporal_(self.ws_k[:, :, :, region], delta)
                held[1] = base + i * B
        self.current_pos = float(base + len(self.recent) * B)
        self._rope_seconds += time.perf_counter() - tic
        return self.current_pos

    def _valid_end(self, layer: int) -> int:
        T = self.geometry.tokens_per_block
        if self.middle_frames == 0:
            return T * (1 + len(self.sink) + len(self.recent))
        return self.kept_off + self.kept_count[layer]

    def context_for(self, layer, q, k, v):
        T = self.geometry.tokens_per_block
        self.ws_k[layer, :, :, :T].copy_(heads_first(k))
        self.ws_v[layer, :, :, :T].copy_(heads_first(v))
        if not self.selected[layer]:
            self._select(layer, q)
            self.selected[layer] = True
        self._record_occupancy(layer)
        end = self._valid_end(layer)
        return self.ws_k[layer, :, :, :end], self.ws_v[layer, :, :, :end]

    # -- participative compression --------------------------------------------------------------
    def _select(self, layer: int, q: torch.Tensor) -> None:
        if self.incoming is None:
            if self.recorder.enabled:
                self._record(layer, torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
            return
        tic = time.perf_counter()
        g, T, n = self.geometry, self.geometry.tokens_per_block, self.kept_count[layer]
        in_block, in_pos = self.incoming
        sources = torch.cat([self.kept_src[layer, :n], in_block * T + torch.arange(T)])
        frames = sources // g.tokens_per_frame
        positions = torch.cat([self.kept_pos[layer, :n], in_pos + (torch.arange(T) // g.tokens_per_frame).double()])
        cand = torch.cat([torch.arange(n), self.keep + torch.arange(T)])  # offsets from kept_off
        keys = self.ws_k[layer, :, :, self.kept_off + cand]  # [B, H, n+T, d]
        scores = self._attention_scores(q, keys)
        if len(cand) <= self.keep:
            keep = torch.arange(len(cand))
        else:
            keep = torch.argsort(scores, descending=True, stable=True)[: self.keep]
            keep = keep[torch.argsort(frames[keep] * (len(cand) + 1) + keep, stable=True)]  # temporal order
        idx = self.kept_off + cand[keep]
        dst = slice(self.kept_off, self.kept_off + len(keep))
        self.ws_k[layer, :, :, dst].copy_(self.ws_k[layer, :, :, idx])
        self.ws_v[layer, :, :, dst].copy_(self.ws_v[layer, :, :, idx])
        self.kept_src[layer, : len(keep)] = sources[keep]
        self.kept_pos[layer, : len(keep)] = positions[keep]
        self.kept_count[layer] = len(keep)
        self._select_seconds += time.perf_counter() - tic
        if self.rope_adjust:
            self._realign(layer)
        if self.recorder.enabled:
            kept_mask = torch.zeros(len(cand), dtype=torch.bool)
            kept_mask[keep] = True
            self._record(layer, scores, frames, kept_mask)

    def _attention_scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Mean attention probability each candidate key gets from sampled queries, half the heads."""
        heads = self.score_heads.to(q.device)
        n_q = min(self.score_queries, q.shape[1])
        idx = torch.linspace(0, q.shape[1] - 1, n_q).round().long().to(q.device)
        queries = q[:, idx][:, :, heads].float()  # [B, n, Hs, d]
        logits = torch.einsum("bnhd,bhmd->bhnm", queries, keys[:, heads].float()) / math.sqrt(q.shape[-1])
        return logits.softmax(dim=-1).mean(dim=(0, 1, 2)).cpu()

    def _realign(self, layer: int) -> None:
        tic = time.perf_counter()
        n = self.kept_count[layer]
        frames = self.kept_frame(layer)
        distinct, rank = torch.unique(frames, sorted=True, return_inverse=True)
        span, count = self._middle_span(), len(distinct)
        base = len(self.sink) * self.geometry.block_frames
        if count <= span:
            new = base + (span - count) + rank.double()
        else:
            new = base + rank.double() * span / count
        region = slice(self.kept_off, self.kept_off + n)
        self.rope.rotate_temporal_(self.ws_k[layer, :, :, region], new - self.kept_pos[layer, :n])
        self.kept_pos[layer, :n] = new
        self._rope_seconds += time.perf_counter() - tic

    # -- commit ---------------------------------------------------------------------------------
    def commit(self) -> None:
        T, b = self.geometry.tokens_per_block, self.block_index
        self.incoming = None  # every layer has scored it in this block's first step
        if len(self.sink) < self.n_sink:
            slot = len(self.sink)
            self._copy_current(self.sink_off + slot * T)
            self.sink.append([b, self.current_pos, slot])
        else:
            if len(self.recent) == self.n_recent:  # the oldest recent block becomes incoming
                old = self.recent.pop(0)
                src = slice(self.recent_off + old[2] * T, self.recent_off + (old[2] + 1) * T)
                self.ws_k[:, :, :, self.in_off : self.in_off + T].copy_(self.ws_k[:, :, :, src])
                self.ws_v[:, :, :, self.in_off : self.in_off + T].copy_(self.ws_v[:, :, :, src])
                self.incoming = (old[0], old[1])
                self.middle_frames += self.geometry.block_frames
                slot = old[2]
            else:
                slot = len(self.recent)
            self._copy_current(self.recent_off + slot * T)
            self.recent.append([b, self.current_pos, slot])
        if self.recorder.enabled:
            self.recorder.phase(b, "select", self._select_seconds)
            self.recorder.phase(b, "rope", self._rope_seconds)

    def _copy_current(self, offset: int) -> None:
        T = self.geometry.tokens_per_block
        self.ws_k[:, :, :, offset : offset + T].copy_(self.ws_k[:, :, :, :T])
        self.ws_v[:, :, :, offset : offset + T].copy_(self.ws_v[:, :, :, :T])

    def kept_frame(self, layer: int) -> torch.Tensor:
        """Source latent frame of each kept token of ``layer`` [kept_count]."""
        return self.kept_src[layer, : self.kept_count[layer]] // self.geometry.tokens_per_frame

    # -- reporting ------------------------------------------------------------------------------
    def occupancy(self) -> dict[str, int]:
        T = self.geometry.tokens_per_block
        kept = self.kept_count[0] if self.kept_count else 0
        return {
            "sink": len(self.sink) * T,
            "mid_archive": kept + (T if self.incoming is not None and not self.selected[0] else 0),
            "mid_selected": kept,
            "recent": len(self.recent) * T,
            "current": T if self.block_index >= 0 else 0,
        }

    def budget_tokens(self) -> int:
        return self.in_off + self.geometry.tokens_per_block

    def _record(self, layer, scores, frames, kept_mask) -> None:
        B, rec = self.geometry.block_frames, self.recorder
        blocks = (frames // B).tolist()
        per_block: dict[int, list] = {}
        for i, blk in enumerate(blocks):
            entry = per_block.setdefault(blk, [0.0, False])
            entry[0] += float(scores[i])
            entry[1] = entry[1] or bool(kept_mask[i])
        if per_block:
            keys = sorted(per_block)
            rec.mid_scores(self.block_index, layer, keys, [k * B for k in keys], [(k + 1) * B for k in keys],
                           [per_block[k][0] for k in keys], [per_block[k][1] for k in keys])
        for blk, pos, _ in self.sink:
            rec.positions(self.block_index, layer, "sink", blk, blk * B, (blk + 1) * B, float(blk * B), float(pos))
        n = self.kept_count[layer]
        for blk in sorted(set((self.kept_frame(layer) // B).tolist())):
            in_blk = (self.kept_frame(layer) // B) == blk
            rec.positions(self.block_index, layer, "mid_selected", blk, blk * B, (blk + 1) * B, float(blk * B),
                          float(self.kept_pos[layer, :n][in_blk].min()))
        for blk, pos, _ in self.recent:
            rec.positions(self.block_index, layer, "recent", blk, blk * B, (blk + 1) * B, float(blk * B), float(pos))
        rec.positions(self.block_index, layer, "current", self.block_index, self.block_index * B,
                      (self.block_index + 1) * B, float(self.block_index * B), self.current_pos)
