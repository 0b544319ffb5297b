"""Shared fixtures: a tiny model and a synthetic driver that exercises cache policies without it."""

from __future__ import annotations

import socket
import zlib

import pytest
import torch

from packforcing.cache import CacheGeometry
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.rope import Rope3D


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tests run servers and workers in threads on a 2-core machine,
    where torch's default oversubscribes the cores (measured 4–30x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalWanTransformer(**TINY).eval()
    return model


def record_forward_calls(model) -> list[dict]:
    """Wrap ``model.forward_block`` to record each call's inputs and output (x, t, step, t_start, commit,
    out); ``del model.forward_block`` restores it."""
    calls, original = [], model.forward_block

    def wrapped(x, t, text, context, step, t_start, **kw):
        out = original(x, t, text, context, step=step, t_start=t_start, **kw)
        calls.append(dict(x=x.clone(), t=t.clone(), step=step, t_start=t_start, commit=kw.get("commit", False),
                          out=out.clone()))
        return out

    model.forward_block = wrapped
    return calls


def teacher_forcing_layout(num_blocks: int, block_frames: int):
    """The one-pass reference of cached generation: frames [clean blocks | noisy blocks], mask [2F, 2F]
    (clean block-causal; noisy block i sees clean blocks < i and itself) and positions [2F] (0..F-1 twice)."""
    from packforcing.model import block_causal_mask

    frames = num_blocks * block_frames
    block_of = torch.arange(frames) // block_frames
    mask = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool)
    mask[:frames, :frames] = block_causal_mask(frames, block_frames)
    mask[frames:, :frames] = block_of[None, :] < block_of[:, None]
    mask[frames:, frames:] = block_of[None, :] == block_of[:, None]
    return mask, torch.cat([torch.arange(frames), torch.arange(frames)]).double()


def tiny_geometry(block_frames=4, frame_hw=(2, 3), layers=2, heads=4, head_dim=32) -> CacheGeometry:
    return CacheGeometry(layers, heads, head_dim, block_frames, frame_hw)


class SyntheticDriver:
    """Feeds a policy keys/values as the model would, from reproducible *un-rotated* tensors.

    Drives the lifecycle like the sampler: ``plan = policy.plan(b)``, ``store.apply(plan)``, one
    `AttentionContext` per step (``score`` then ``update`` per layer, as the attention processor),
    ``store.commit(plan)``, ``policy.commit(plan)``. Block b, layer l has raw keys ``raw_key(b, l)``
    [1, T, heads, d]; they are rotated at the positions the plan gives (``current_pos``, the spatial
    grid), exactly as the attention processor does. Compressed tokens (N_c per block) likewise, at
    ``current_pos + offset``. ``store``, ``plan`` and ``step`` are the ones in use.
    """

    def __init__(self, policy, steps: int = 2, compressed_hw=None):
        self.policy, self.steps = policy, steps
        g = policy.geometry
        self.g = g
        self.rope = Rope3D(g.head_dim)
        self.t_starts: dict[int, float] = {}
        self.compressed_hw = compressed_hw  # (h, w) positions [N_c] of compressed tokens
        self.store = self.plan = None
        self.step = -1
        self.on_store = None  # called with the store right after it is allocated

    def raw(self, block: int, layer: int, kind: str, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{block}/{layer}/{kind}".encode()))
        return torch.randn(self.g.batch_size, n, self.g.num_heads, self.g.head_dim, generator=gen)

    def block_positions(self, t_start: float) -> torch.Tensor:
        return Rope3D.grid(self.g.block_frames, *self.g.frame_hw, t_start=t_start)

    def compressed_positions(self, t_start: float) -> torch.Tensor:
        t_off = torch.tensor(self.policy.t_offsets, dtype=torch.float64)
        h, w = self.compressed_hw
        return torch.stack([t_off + t_start, h, w], dim=-1)

    def rotated(self, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope.cos_sin(positions)
        return self.rope.apply_tokens(raw, cos, sin)

    def selected(self, layer: int):
        """The mid blocks ``layer`` attends in the block in progress (PackForcing)."""
        return self.store.selected(self.plan, layer)

    def run_block(self, block: int, on_view=None):
        p, g, T = self.policy, self.g, self.g.tokens_per_block
        self.plan = plan = p.plan(block)
        self.store.apply(plan)
        t_start = plan.current_pos
        self.t_starts[block] = t_start
        pos = self.block_positions(t_start)
        for step in range(self.steps + 1):
            commit = step == self.steps
            self.step = step
            ctx = self.store.context(plan, step, commit)
            for layer in range(g.num_layers):
                kind = "clean" if commit else f"noisy{step}"
                k = self.rotated(self.raw(block, layer, "k" if commit else kind, T), pos)
                q = self.rotated(self.raw(block, layer, "q" + kind, T), pos)
                v = self.raw(block, layer, "v" if commit else "v" + kind, T)
                if ctx.wants_queries:
                    ctx.score(layer, q)
                keys, values = ctx.update(layer, k, v)
                if on_view is not None:
                    on_view(block, step, layer, keys, values)
                if commit and plan.compress:
                    n_c = len(p.t_offsets)
                    cpos = self.compressed_positions(t_start)
                    kc = self.rotated(self.raw(block, layer, "kc", n_c), cpos)
                    ctx.update_compressed(layer, kc, self.raw(block, layer, "vc", n_c))
        self.store.commit(plan)
        p.commit(plan)

    def rollout(self, num_blocks: int, on_view=None, after_block=None):
        self.store = self.policy.allocate(num_blocks)
        if self.on_store is not None:
            self.on_store(self.store)
        for block in range(num_blocks):
            self.run_block(block, on_view)
            if after_block is not None:
                after_block(block)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests only talk to this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(demo) -> str:
    """Launch a Gradio demo in-process on a free localhost port (the app's launch settings);
    returns its URL. The caller closes it."""
    import app

    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **app.launch_kwargs())
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app_url():
    """The Studio launched in-process on a free localhost port, closed after the module."""
    import app

    url = launch_local(app.demo)
    try:
        yield url
    finally:
        app.demo.close()
