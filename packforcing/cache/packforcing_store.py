"""PackForcing's buffers and the tensor work its plans ask for (selection runs on the device).

Selection score (paper): s_m = mean over a query subsample i and half the heads h of
Σ_j q_i·k_{m,j}/√d. The sum over j is linear, so it equals q_i·(Σ_j k_{m,j}): only a per-block
key *sum* is kept for scoring. Each token j of a mid block is attended at ``start + t_j·span/B_f``
(``t_j`` its offset in the block), so before summing, token j is rotated by the block-independent
correction ``t_j·(span/B_f − 1)``; the sum then moves to any candidate start with one rotation —
the score equals the one of the keys exactly where attention would see them, for every ``mid_span``.
"""

from __future__ import annotations

import math

import torch

from .store import CacheStore, KVBuffer


class PackForcingStore(CacheStore):
    """``workspace`` (what attention reads, layout in `packforcing.cache.packforcing`), ``pending``
    (the current block's compressed K/V), ``backups`` (compressed K/V of the recent blocks),
    ``archive`` (compressed mid blocks, maybe in host memory), ``archive_key_sums`` [L, B, heads/2,
    archive_blocks, d] f32, query samples ``pending_queries`` [L, B, n_q, heads/2, d] and
    ``recent_queries`` [L, B, n_recent, n_q, heads/2, d] f32."""

    CONSTANTS = frozenset({"score_heads", "t_offsets", "score_correction"})

    def __init__(self, policy, geometry):
        super().__init__(geometry)
        g, c, n_compressed = geometry, policy.config, policy.compressed_tokens
        self.policy = policy
        self.workspace = KVBuffer(g, policy.workspace_tokens)
        self.pending = KVBuffer(g, n_compressed)
        self.backups = KVBuffer(g, policy.n_recent * n_compressed)
        archive_device = g.device if g.device.type == "meta" else c.archive_device  # meta: sizes only
        self.archive = KVBuffer(g, c.archive_blocks * n_compressed, device=archive_device)
        self.score_heads = torch.arange(0, g.num_heads, 2, device=g.device)  # half of the heads, evenly spread
        heads = len(self.score_heads)
        self.archive_key_sums = torch.zeros(g.num_layers, g.batch_size, heads, c.archive_blocks, g.head_dim,
                                            device=g.device)
        self.queries_per_block = max(1, c.score_queries // (1 + policy.n_recent))
        n_q = self.queries_per_block
        self.pending_queries = torch.zeros(g.num_layers, g.batch_size, n_q, heads, g.head_dim, device=g.device)
        self.recent_queries = torch.zeros(g.num_layers, g.batch_size, policy.n_recent, n_q, heads, g.head_dim,
                                          device=g.device)
        self.t_offsets = torch.tensor(policy.t_offsets, dtype=torch.float64, device=g.device)  # [N_c] frames
        scale = policy.span / g.block_frames - 1 if c.rope_adjust else 0.0
        self.corrects_scores = scale != 0.0
        self.score_correction = self.t_offsets * scale  # [N_c] frames, applied before summing
        self.selected_index: list[torch.Tensor | None] = []
        self.scores: list[torch.Tensor | None] = []
        self.mid_mass: list[torch.Tensor | None] = []  # per layer [k·N_c]: see `inspect`

    def placement(self, name: str) -> str:
        device = self.policy.config.archive_device
        on_host = device is not None and torch.device(device).type == "cpu"
        return "host" if on_host and name.startswith("archive.") else "device"

    # -- per block -----------------------------------------------------------------------------
    def apply(self, plan) -> None:
        super().apply(plan)
        p, T, L = self.policy, self.geometry.tokens_per_block, self.geometry.num_layers
        with self.clock("rope"):
            for move in plan.moves:  # recent blocks: full K/V and their query samples
                self.workspace.rotate(self.rope, p.recent_offset + move.slot * T, T, move.delta)
                self.rope.rotate_temporal_(self.recent_queries[:, :, move.slot].transpose(-2, -3), move.delta)
        self.selected_index, self.scores, self.mid_mass = [None] * L, [None] * L, [None] * L
        sel = plan.selection
        if sel is None:
            return
        device = self.geometry.device
        slots = [h.slot for h in sel.candidates]
        self.candidate_slots = torch.tensor(slots, device=device)
        self.candidate_token_slots = self.candidate_slots.to(self.archive.keys.device)
        self.candidate_commit_pos = torch.tensor([h.pos for h in sel.candidates], dtype=torch.float64, device=device)
        self.starts = torch.tensor(sel.starts, dtype=torch.float64, device=device)
        scoring_starts = torch.tensor(sel.scoring_starts, dtype=torch.float64, device=device)
        self.scoring_delta = scoring_starts - self.candidate_commit_pos
        recent = [h.slot for region, h in plan.held if region == "recent"]
        self.recent_slots = torch.tensor(recent, dtype=torch.long, device=device)
        if not sel.scored:  # recency ablation: the k newest
            fixed = torch.arange(len(slots) - sel.count, len(slots), device=device)
            for layer in range(self.geometry.num_layers):
                self._install(plan, layer, fixed, None)
        elif sel.scope == "shared":
            with self.clock("select"):
                scores = sum(self._scores(layer, None) for layer in range(self.geometry.num_layers))
                index = self._choose(scores, sel.count)
            for layer in range(self.geometry.num_layers):
                self._install(plan, layer, index, scores)

    def wants_queries(self, plan, step, commit) -> bool:
        return commit or (step == 0 and self._scores_per_layer(plan))

    @staticmethod
    def _scores_per_layer(plan) -> bool:
        sel = plan.selection
        return sel is not None and sel.scored and sel.scope == "layer"

    def take_queries(self, plan, layer, q, step, commit) -> None:
        if step == 0 and self._scores_per_layer(plan):  # the block's first forward: select
            with self.clock("select"):
                scores = self._scores(layer, q)
                index = self._choose(scores, plan.selection.count)
            self._install(plan, layer, index, scores)
        if commit:  # keep a query sample for scoring while this block is recent
            self.pending_queries[layer].copy_(self._query_sample(q))

    # -- attention -----------------------------------------------------------------------------
    def update(self, plan, layer, k, v):
        self.workspace.write(layer, 0, k, v)
        return self.workspace.view(layer, plan.attend_tokens)

    def write_compressed(self, layer, k, v) -> None:
        """k, v [B, N_c, heads, d] rotated at this block's positions."""
        self.pending.write(layer, 0, k, v)

    def update_compressed(self, plan, layer, k, v):
        self.write_compressed(layer, k, v)
        end, n_compressed = plan.attend_tokens, self.policy.compressed_tokens
        self.workspace.copy_layer(layer, self.pending, 0, end, n_compressed)
        return self.workspace.view(layer, end + n_compressed)

    inspects = True

    def inspect(self, plan, layer) -> None:
        """Commit pass, after `update`: the attention probability each selected mid token gets from the
        block's query sample (the one kept for scoring: n_q queries, half the heads), softmax over all
        the keys the block attends, mean over queries, heads and batch rows -> ``mid_mass[layer]``
        [k·N_c] f32 (stays on the device; read by `report`)."""
        sel = plan.selection
        if sel is None or sel.count == 0:
            return
        keys = self.workspace.keys[layer, :, :, : plan.attend_tokens].index_select(1, self.score_heads)
        logits = torch.einsum("bnhd,bhtd->bnht", self.pending_queries[layer], keys.float())
        probs = (logits / math.sqrt(self.geometry.head_dim)).softmax(dim=-1)  # [B, n_q, Hs, T]
        start = self.policy.mid_offset
        self.mid_mass[layer] = probs[..., start : start + sel.count * self.policy.compressed_tokens].mean(dim=(0, 1, 2))

    # -- selection -----------------------------------------------------------------------------
    def _query_sample(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, N, heads, d] -> deterministic uniform subsample [B, n_q, heads/2, d] (float32)."""
        idx = torch.linspace(0, q.shape[1] - 1, self.queries_per_block, device=q.device).round().long()
        return q[:, idx][:, :, self.score_heads].float()

    def _scores(self, layer: int, q_current: torch.Tensor | None) -> torch.Tensor:
        """[M] scores of the candidates for one layer (recent query samples, and the current block's)."""
        queries = self.recent_queries[layer].index_select(1, self.recent_slots).flatten(1, 2)  # [B, R·n_q, Hs, d]
        if q_current is not None:
            queries = torch.cat([queries, self._query_sample(q_current)], dim=1)
        keys = self.archive_key_sums[layer].index_select(2, self.candidate_slots)  # [B, Hs, M, d], a copy
        if self.policy.config.rope_adjust:
            self.rope.rotate_temporal_(keys, self.scoring_delta)
        logits = torch.einsum("bnhd,bhmd->bnhm", queries, keys) / math.sqrt(self.geometry.head_dim)
        return logits.mean(dim=(0, 1, 2))

    @staticmethod
    def _choose(scores: torch.Tensor, count: int) -> torch.Tensor:
        """Indices of the ``count`` highest scores (ties: the older), in temporal order [count]."""
        order = torch.argsort(scores, descending=True, stable=True)[:count]
        return order.sort().values

    def _install(self, plan, layer: int, index: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Gather the chosen archive blocks into the workspace and re-rotate them to their starts."""
        self.selected_index[layer], self.scores[layer] = index, scores
        n = plan.selection.count
        if n == 0:
            return
        p, n_compressed, block_frames = self.policy, self.policy.compressed_tokens, self.geometry.block_frames
        with self.clock("rope"):
            arange = torch.arange(n_compressed, device=self.archive.keys.device)
            slots = self.candidate_token_slots[index.to(self.archive.keys.device)]
            src = (slots[:, None] * n_compressed + arange).flatten()
            self.workspace.gather_from(layer, self.archive, src, p.mid_offset)
            if p.config.rope_adjust:
                old = self.candidate_commit_pos[index]
                delta = self.starts[:, None] + self.t_offsets * (p.span / block_frames) - old[:, None] - self.t_offsets
                self.workspace.rotate(self.rope, p.mid_offset, n * n_compressed, delta.flatten(), layer=layer)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, plan) -> None:
        p, c, T, n_compressed = self.policy, plan.commit, self.geometry.tokens_per_block, self.policy.compressed_tokens
        if c.region == "sink":
            self.workspace.copy_from(self.workspace, 0, p.sink_offset + c.slot * T, T)
        elif c.region == "archive":
            self._archive_push(self.pending, 0, c.archive_slot)
        else:
            if c.evicted is not None:
                self._archive_push(self.backups, c.evicted.slot * n_compressed, c.archive_slot)
            self.workspace.copy_from(self.workspace, 0, p.recent_offset + c.slot * T, T)
            self.backups.copy_from(self.pending, 0, c.slot * n_compressed, n_compressed)
            self.recent_queries[:, :, c.slot].copy_(self.pending_queries)

    def _archive_push(self, src: KVBuffer, start: int, slot: int) -> None:
        n_compressed = self.policy.compressed_tokens
        self.archive.copy_from(src, start, slot * n_compressed, n_compressed)
        keys = src.keys[:, :, :, start : start + n_compressed].index_select(2, self.score_heads).float()
        if self.corrects_scores:
            self.rope.rotate_temporal_(keys, self.score_correction.to(keys.device))
        self.archive_key_sums[:, :, :, slot].copy_(keys.sum(dim=3))

    def report(self, plan):
        """Per layer: (scores as a list or None, chosen candidate indices, mass of each selected mid token
        as a list or None) — read once per block, after it."""
        if plan.selection is None:
            return None
        return [(None if s is None else s.tolist(), i.tolist(), None if m is None else m.tolist())
                for s, i, m in zip(self.scores, self.selected_index, self.mid_mass)]

    def selected(self, plan, layer: int):
        """The `Held` candidates ``layer`` attends this block (reads the device; for inspection)."""
        if plan.selection is None or self.selected_index[layer] is None:
            return []
        return [plan.selection.candidates[i] for i in self.selected_index[layer].tolist()]
