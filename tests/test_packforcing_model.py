"""PackForcing with the real (tiny) transformer: invariants and exact correspondences."""

import pytest
import torch

from packforcing.cache import make_policy
from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.sampler import SamplerConfig, generate_blocks
from packforcing.trace import NullRecorder, TraceRecorder
from tests.conftest import tiny_geometry

HW = (8, 8)  # latent; 4x4 tokens per frame


@pytest.fixture(scope="module")
def compressor():
    torch.manual_seed(1)
    return Compressor(TINY["num_attention_heads"] * TINY["attention_head_dim"], mode="hr").eval()


def geometry():
    return tiny_geometry(4, (4, 4), TINY["num_layers"], TINY["num_attention_heads"], 32)


def pf(compressor, **options):
    offsets = compressor.token_centres(4, *HW)[0]
    return make_policy("packforcing", geometry(), compressed_t_offsets=offsets, **options)


def rollout(model, policy, compressor=None, blocks=8, recorder=None, compressed_kv="commit"):
    text = torch.ones(1, 4, 64)
    config = SamplerConfig(compressed_kv=compressed_kv)
    return [b.latents for b in generate_blocks(model, text, policy, blocks, HW, config, seed=5,
                                               compressor=compressor, recorder=recorder)]


@pytest.mark.parametrize("compressed_kv", ["commit", "projection"])
def test_full_resolution_kv_identical_with_compression_on_and_off(tiny_model, compressor, compressed_kv):
    """The commit pass with compressed tokens riding along writes bit-identical block K/V."""
    policy = pf(compressor, sink_frames=4, recent_frames=4, top_k=2, archive_blocks=4)
    store = policy.allocate(4)
    ws = store.workspace
    text, x0 = torch.ones(1, 4, 64), torch.randn(1, 16, 4, *HW)
    T = policy.geometry.tokens_per_block
    for block in range(2):  # block 0 -> sink; block 1 -> recent, with compression
        plan = policy.plan(block)
        store.apply(plan)
        t_start = plan.current_pos
        with torch.no_grad():
            plain = tiny_model.forward_block(x0, torch.zeros(1), text, store.context(plan, 4, True), step=4,
                                             t_start=t_start, commit=True)
            k_plain, v_plain = ws.keys[:, :, :, :T].clone(), ws.values[:, :, :, :T].clone()
            tokens = compressor(x0) if policy.needs_compression(block) else None
            positions = None
            if tokens is not None:
                t_c, h_c, w_c = compressor.token_centres(4, *HW)
                positions = torch.stack([t_c + t_start, h_c, w_c], -1)
            with_c = tiny_model.forward_block(x0, torch.zeros(1), text, store.context(plan, 4, True), step=4,
                                              t_start=t_start, commit=True,
                                              compressed=tokens, compressed_positions=positions,
                                              compressed_kv=compressed_kv)
        assert torch.equal(ws.keys[:, :, :, :T], k_plain) and torch.equal(ws.values[:, :, :, :T], v_plain)
        assert torch.equal(with_c, plain)
        if tokens is not None:
            assert store.pending.keys.abs().sum() > 0  # the compressed K/V were produced
        store.commit(plan)
        policy.commit(plan)


def test_no_mid_and_no_adjustment_is_exactly_sink_window(tiny_model, compressor):
    """top_k = 0 and rope_adjust off: PackForcing attends sink + recent + current at absolute
    positions, which is sink_window with window = recent, block for block (same buffer order)."""
    packed = rollout(tiny_model, pf(compressor, sink_frames=4, recent_frames=8, top_k=0, archive_blocks=2,
                                    rope_adjust=False), compressor)
    window = rollout(tiny_model, make_policy("sink_window", geometry(), sink_frames=4, window_frames=8))
    assert all(torch.equal(a, b) for a, b in zip(packed, window))


def test_all_mid_selected_before_any_drop_equals_full_history_positions(tiny_model, compressor):
    """Until more than k blocks are archived nothing is dropped: 'span' positions equal absolute ones."""
    with_adjust = rollout(tiny_model, pf(compressor, sink_frames=4, recent_frames=4, top_k=4, archive_blocks=4),
                          compressor, blocks=6)
    without = rollout(tiny_model, pf(compressor, sink_frames=4, recent_frames=4, top_k=4, archive_blocks=4,
                                     rope_adjust=False), compressor, blocks=6)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(with_adjust, without))


def test_trace_does_not_change_latents_and_round_trips(tiny_model, compressor, tmp_path):
    recorder = TraceRecorder()
    traced = rollout(tiny_model, pf(compressor, sink_frames=4, recent_frames=4, top_k=2, archive_blocks=3),
                     compressor, recorder=recorder)
    plain = rollout(tiny_model, pf(compressor, sink_frames=4, recent_frames=4, top_k=2,
                                   archive_blocks=3), compressor, recorder=NullRecorder())
    assert all(torch.equal(a, b) for a, b in zip(traced, plain))
    tables = recorder.tables()
    assert len(tables["scores"]) > 0 and tables["scores"]["selected"].any()
    assert set(tables["occupancy"]["partition"]) == {"sink", "mid_archive", "mid_selected", "recent", "current"}
    assert set(tables["timing"]["phase"]) >= {"denoise", "commit", "compress", "select", "rope"}
    assert list(tables["blocks"]["block"]) == list(range(8))
    loaded = TraceRecorder.load(recorder.save(tmp_path / "trace.parquet")).tables()
    for name, frame in tables.items():
        assert loaded[name].equals(frame), name
