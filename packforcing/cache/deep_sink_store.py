"""deep_sink's buffers and its token selection, all on the device (no host reads in attention)."""

from __future__ import annotations

import math

import torch

from .store import CacheStore, KVBuffer


class DeepSinkStore(CacheStore):
    """``workspace`` [current | sink | recent | kept view (C) | incoming (T)] (what attention reads);
    ``kept_keys`` [L, B, heads, C, d]: kept keys at the position they entered the middle with (the
    view holds rotated copies); per layer and kept token: ``kept_source`` (block·T + index),
    ``kept_entry_pos`` and ``kept_pos`` (temporal positions, latent frames, float64)."""

    CONSTANTS = frozenset({"score_heads", "incoming_index", "incoming_frames"})

    def __init__(self, policy, geometry):
        super().__init__(geometry)
        g, keep = geometry, policy.keep
        self.policy = policy
        self.workspace = KVBuffer(g, policy.incoming_offset + g.tokens_per_block)
        self.kept_keys = KVBuffer(g, keep, values=False)
        self.kept_source = torch.zeros(g.num_layers, keep, dtype=torch.long, device=g.device)
        self.kept_entry_pos = torch.zeros(g.num_layers, keep, dtype=torch.float64, device=g.device)
        self.kept_pos = torch.zeros(g.num_layers, keep, dtype=torch.float64, device=g.device)
        self.score_heads = torch.arange(0, g.num_heads, 2, device=g.device)
        self.incoming_index = torch.arange(g.tokens_per_block, device=g.device)
        self.incoming_frames = (self.incoming_index // g.tokens_per_frame).double()
        self._report: list = []

    def apply(self, plan) -> None:
        super().apply(plan)
        p, T = self.policy, self.geometry.tokens_per_block
        with self.clock("rope"):
            for move in plan.moves:
                self.workspace.rotate(self.rope, p.recent_offset + move.slot * T, T, move.delta)
        self._report = [None] * self.geometry.num_layers

    def wants_queries(self, plan, step, commit) -> bool:
        return step == 0  # the block's first forward (the commit pass too when there are no steps)

    def take_queries(self, plan, layer, q, step, commit) -> None:
        sel = plan.selection
        if sel.incoming is None:
            self._report[layer] = (None, None, None)
            return
        with self.clock("select"):
            self._select(plan, layer, q)
        if sel.rope_adjust and sel.kept_after:
            with self.clock("rope"):
                self._realign(plan, layer)
        self._copy_view(layer, sel.kept_after)

    def update(self, plan, layer, k, v):
        self.workspace.write(layer, 0, k, v)
        return self.workspace.view(layer, plan.attend_tokens)

    # -- participative compression --------------------------------------------------------------
    def _select(self, plan, layer: int, q: torch.Tensor) -> None:
        p, sel, g = self.policy, plan.selection, self.geometry
        T, n, keep, ws = g.tokens_per_block, sel.kept_before, sel.kept_after, self.workspace
        view = slice(p.kept_offset, p.kept_offset + n)
        incoming = slice(p.incoming_offset, p.incoming_offset + T)
        keys = torch.cat([ws.keys[layer, :, :, view], ws.keys[layer, :, :, incoming]], dim=2)  # [B, H, n+T, d]
        scores = self._attention_scores(q, keys)
        sources = torch.cat([self.kept_source[layer, :n], sel.incoming.block * T + self.incoming_index])
        entry = torch.cat([self.kept_entry_pos[layer, :n], sel.incoming.pos + self.incoming_frames])
        frames = sources // g.tokens_per_frame
        if n + T <= keep:
            chosen = torch.arange(n + T, device=scores.device)
        else:
            chosen = torch.argsort(scores, descending=True, stable=True)[:keep]
            chosen = chosen[torch.argsort(frames[chosen] * (n + T + 1) + chosen, stable=True)]  # temporal order
        stored = torch.cat([self.kept_keys.keys[layer, :, :, :n], ws.keys[layer, :, :, incoming]], dim=2)
        values = torch.cat([ws.values[layer, :, :, view], ws.values[layer, :, :, incoming]], dim=2)
        self.kept_keys.keys[layer, :, :, :keep].copy_(stored.index_select(2, chosen))
        ws.values[layer, :, :, p.kept_offset : p.kept_offset + keep].copy_(values.index_select(2, chosen))
        self.kept_source[layer, :keep] = sources[chosen]
        self.kept_entry_pos[layer, :keep] = entry[chosen]
        self.kept_pos[layer, :keep] = entry[chosen]
        kept_mask = torch.zeros(n + T, dtype=torch.bool, device=scores.device)
        kept_mask[chosen] = True
        self._report[layer] = (scores, frames, kept_mask)

    def _attention_scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Mean attention probability each candidate key gets from sampled queries, half the heads [n+T]."""
        n_q = min(self.policy.config.score_queries, q.shape[1])
        idx = torch.linspace(0, q.shape[1] - 1, n_q, device=q.device).round().long()
        queries = q[:, idx][:, :, self.score_heads].float()  # [B, n, Hs, d]
        logits = torch.einsum("bnhd,bhmd->bhnm", queries, keys[:, self.score_heads].float()) / math.sqrt(q.shape[-1])
        return logits.softmax(dim=-1).mean(dim=(0, 1, 2))

    def _realign(self, plan, layer: int) -> None:
        """Pack the kept tokens' distinct frames into the middle span (device-side ranks)."""
        sel, n = plan.selection, plan.selection.kept_after
        frames = self.kept_source[layer, :n] // self.geometry.tokens_per_frame  # non-decreasing
        rank = torch.zeros(n, dtype=torch.float64, device=frames.device)
        rank[1:] = (frames[1:] != frames[:-1]).double().cumsum(0)
        count = rank[-1] + 1
        span = float(sel.middle_span)
        self.kept_pos[layer, :n] = torch.where(count <= span, sel.base + (span - count) + rank,
                                               sel.base + rank * span / count)

    def _copy_view(self, layer: int, n: int) -> None:
        """The attended kept keys: the stored keys rotated from their entry to their kept position."""
        dst = self.workspace.keys[layer, :, :, self.policy.kept_offset : self.policy.kept_offset + n]
        dst.copy_(self.kept_keys.keys[layer, :, :, :n])
        if self.policy.config.rope_adjust:
            self.rope.rotate_temporal_(dst, self.kept_pos[layer, :n] - self.kept_entry_pos[layer, :n])

    def commit(self, plan) -> None:
        p, c, T, ws = self.policy, plan.commit, self.geometry.tokens_per_block, self.workspace
        if c.region == "sink":
            ws.copy_from(ws, 0, p.sink_offset + c.slot * T, T)
            return
        if c.evicted is not None:  # the oldest recent block becomes incoming
            ws.copy_from(ws, p.recent_offset + c.evicted.slot * T, p.incoming_offset, T)
        ws.copy_from(ws, 0, p.recent_offset + c.slot * T, T)

    def report(self, plan):
        """Per layer: (scores, candidate frames, kept mask, kept frames, kept positions) as lists."""
        n, out = plan.selection.kept_after, []
        for layer, entry in enumerate(self._report):
            scores, frames, mask = entry if entry is not None else (None, None, None)
            kept_frames = (self.kept_source[layer, :n] // self.geometry.tokens_per_frame).tolist()
            out.append(([] if scores is None else scores.tolist(), [] if frames is None else frames.tolist(),
                        [] if mask is None else mask.tolist(), kept_frames, self.kept_pos[layer, :n].tolist()))
        return out

    def kept_frame(self, plan, layer: int) -> torch.Tensor:
        """Source latent frame of each kept token of ``layer`` [kept tokens]."""
        return self.kept_source[layer, : plan.selection.kept_after] // self.geometry.tokens_per_frame
