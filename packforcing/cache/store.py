"""Preallocated K/V storage and its primitives (write, copy, gather, rotate), nothing else.

A `KVBuffer` holds keys and values ``[layers, B, heads, tokens, head_dim]`` written in place (as
gpt-fast's ``KVCache`` or transformers' ``StaticLayer``); attention reads slices of it, never a
concatenation. A `CacheStore` is a policy's set of buffers plus the tensor work a plan asks for;
it makes one `AttentionContext` per forward. Stores take decisions from plans only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..rope import Rope3D
from .geometry import CacheGeometry


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads, d] -> [B, heads, N, d]."""
    return x.transpose(1, 2)


class KVBuffer:
    """Keys and values of ``tokens`` tokens per layer: ``keys``, ``values`` [L, B, heads, tokens, d]."""

    def __init__(self, geometry: CacheGeometry, tokens: int, device=None, values: bool = True):
        g = geometry
        shape = (g.num_layers, g.batch_size, g.num_heads, tokens, g.head_dim)
        device = g.device if device is None else device
        self.keys = torch.zeros(shape, dtype=g.dtype, device=device)
        self.values = torch.zeros(shape, dtype=g.dtype, device=device) if values else None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, N, heads, d] -> tokens [start, start + N) of ``layer``."""
        n = k.shape[1]
        self.keys[layer, :, :, start : start + n].copy_(heads_first(k))
        self.values[layer, :, :, start : start + n].copy_(heads_first(v))

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [0, end) of ``layer`` as [B, heads, end, d] views (no copy)."""
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def copy_from(self, src: KVBuffer, src_start: int, dst_start: int, tokens: int) -> None:
        """All layers: src tokens [src_start, +tokens) -> this buffer's [dst_start, +tokens)."""
        s, d = slice(src_start, src_start + tokens), slice(dst_start, dst_start + tokens)
        self.keys[:, :, :, d].copy_(src.keys[:, :, :, s])
        self.values[:, :, :, d].copy_(src.values[:, :, :, s])

    def copy_layer(self, layer: int, src: KVBuffer, src_start: int, dst_start: int, tokens: int) -> None:
        """One layer: src tokens [src_start, +tokens) -> this buffer's [dst_start, +tokens)."""
        s, d = slice(src_start, src_start + tokens), slice(dst_start, dst_start + tokens)
        self.keys[layer, :, :, d].copy_(src.keys[layer, :, :, s])
        self.values[layer, :, :, d].copy_(src.values[layer, :, :, s])

    def gather_from(self, layer: int, src: KVBuffer, index: torch.Tensor, dst_start: int) -> None:
        """One layer: src tokens ``index`` [n] (on src's device) -> this buffer's [dst_start, +n)."""
        d = slice(dst_start, dst_start + index.numel())
        self.keys[layer, :, :, d].copy_(src.keys[layer].index_select(2, index))
        self.values[layer, :, :, d].copy_(src.values[layer].index_select(2, index))

    def rotate(self, rope: Rope3D, start: int, tokens: int, delta, layer: int | None = None) -> None:
        """Move keys [start, +tokens) (one layer, or all) ``delta`` latent frames in time, in place."""
        region = slice(start, start + tokens)
        keys = self.keys[:, :, :, region] if layer is None else self.keys[layer, :, :, region]
        rope.rotate_temporal_(keys, delta)


class PhaseClock:
    """Seconds per phase inside a block. CPU: wall clock; CUDA: events read once, after the block,
    so timing never synchronises the device in the middle of attention."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """Accumulated seconds per phase (synchronises CUDA once)."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
            self._events.clear()
        return dict(self._seconds)


class CacheStore:
    """Base class of a policy's buffers. Subclasses allocate in ``__init__`` and implement
    `update` (and, if they compress or select, the other hooks); ``CONSTANTS`` names tensor
    attributes that are index/position constants rather than K/V storage."""

    CONSTANTS: frozenset[str] = frozenset()

    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.rope = Rope3D(geometry.head_dim)
        self.clock = PhaseClock(geometry.device)

    # -- the plan's tensor work --------------------------------------------------------------
    def apply(self, plan) -> None:
        """Before the block's first forward: re-rotations and per-block index tensors."""
        self.clock.reset()

    def context(self, plan, step: int, commit: bool = False):
        from .context import AttentionContext

        return AttentionContext(self, plan, step, commit)

    def wants_queries(self, plan, step: int, commit: bool) -> bool:
        return False

    def take_queries(self, plan, layer: int, q: torch.Tensor, step: int, commit: bool) -> None:
        """The scoring hook: q [B, N, heads, d] (rotated) of the current block."""

    def update(self, plan, layer: int, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError

    inspects = False  # True: `inspect` runs after `update` on the commit pass

    def inspect(self, plan, layer: int) -> None:
        """Commit pass, after `update`: measure what the block attends (for the trace; no effect on it)."""

    def update_compressed(self, plan, layer: int, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError(f"{type(self).__name__} does not take compressed tokens")

    def write_compressed(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not take compressed tokens")

    def commit(self, plan) -> None:
        raise NotImplementedError

    def report(self, plan):
        """Host-side results of the block's data-dependent choices (scores, selections), read once
        after the block; None for stores that make none."""
        return None

    def phase_seconds(self) -> dict[str, float]:
        return self.clock.seconds()

    # -- memory ------------------------------------------------------------------------------
    def buffers(self) -> dict[str, torch.Tensor]:
        """Every preallocated tensor (K/V buffers and scoring buffers), by attribute name."""
        out = {}
        for name, value in vars(self).items():
            if isinstance(value, KVBuffer):
                out.update({f"{name}.{i}": t for i, t in enumerate(value.tensors())})
            elif isinstance(value, torch.Tensor) and name not in self.CONSTANTS:
                out[name] = value
        return out

    def placement(self, name: str) -> str:
        """"device" or "host": where the buffer ``name`` (a `buffers` key) is meant to live."""
        return "device"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def release(self) -> None:
        """Free the buffers (a Stop or an error ends the run); constants stay usable."""
        for name, value in list(vars(self).items()):
            if isinstance(value, KVBuffer) or (isinstance(value, torch.Tensor) and name not in self.CONSTANTS):
                setattr(self, name, None)
