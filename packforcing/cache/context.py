"""The per-forward attention context: the only cache object the attention processor sees."""

from __future__ import annotations

import torch


class AttentionContext:
    """One forward of one block against a store, following its plan.

    The processor calls, per layer: ``score(layer, q)`` when ``wants_queries`` (top-k scoring at
    step 0, query samples at the commit pass), then ``update(layer, k, v)`` which writes the
    block's K/V [B, N, heads, d] and returns the attended keys/values [B, heads, T, d] (views of
    preallocated buffers). Compressed tokens of the commit pass use `update_compressed`."""

    def __init__(self, store, plan, step: int, commit: bool = False):
        self.store, self.plan, self.step, self.commit = store, plan, step, commit
        self.wants_queries = store.wants_queries(plan, step, commit)

    @property
    def block(self) -> int:
        return self.plan.block

    @property
    def block_frames(self) -> int:
        return self.store.geometry.block_frames

    @property
    def attend_tokens(self) -> int:
        return self.plan.attend_tokens

    def score(self, layer: int, q: torch.Tensor) -> None:
        self.store.take_queries(self.plan, layer, q, self.step, self.commit)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys_values = self.store.update(self.plan, layer, k, v)
        if self.commit and self.store.inspects:
            self.store.inspect(self.plan, layer)
        return keys_values

    def update_compressed(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Commit pass, compressed stream: attends context + block + itself; keeps its K/V."""
        return self.store.update_compressed(self.plan, layer, k, v)

    def write_compressed(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """'projection' mode: the compressed tokens' K/V, computed without attention."""
        self.store.write_compressed(layer, k, v)
