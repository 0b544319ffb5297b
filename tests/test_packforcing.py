"""PackForcing cache: bounds, exchange, RoPE adjustment, top-k selection, correspondences."""

import math

import pytest
import torch

from packforcing.cache import CacheGeometry, make_policy
from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.rope import Rope3D
from packforcing.sampler import generate_blocks
from tests.conftest import SyntheticDriver, tiny_geometry

B = 4


def pf_policy(geometry=None, **options):
    geometry = geometry or tiny_geometry(B, frame_hw=(4, 4))
    t_off, h_off, w_off = Compressor.token_centres(B, 8, 8)  # 2x1x1 = 2 compressed tokens
    policy = make_policy("packforcing", geometry, compressed_t_offsets=t_off, **options)
    return policy, SyntheticDriver(policy, steps=2, compressed_hw=(h_off, w_off))


def test_full_size_context_is_27872_tokens():
    g = CacheGeometry(30, 12, 128, 4, (30, 52), dtype=torch.bfloat16)
    n_c = Compressor.num_tokens(4, 60, 104)
    assert (g.tokens_per_frame, g.tokens_per_block, n_c) == (1560, 6240, 182)
    sink, recent, current, k = 8 * 1560, 4 * 1560, g.tokens_per_block, 16
    assert sink + k * n_c + recent + current == 27_872
    assert g.bytes_per_token == 184_320
    history = sink + k * n_c + recent
    assert history == 21_632 and abs(history * g.bytes_per_token / 1e9 - 3.99) < 0.01


@pytest.mark.parametrize(
    "options",
    [dict(sink_frames=8, recent_frames=4, top_k=3, archive_blocks=10), dict(sink_frames=4, recent_frames=8, top_k=2,
     archive_blocks=6, mid_span="single", scope="shared"), dict(sink_frames=0, recent_frames=0, top_k=1, archive_blocks=2)],
)
def test_bounded_over_120_blocks(options):
    policy, driver = pf_policy(**options)
    g, n_c = policy.geometry, policy.compressed_tokens
    limit = options["sink_frames"] * g.tokens_per_frame + options["top_k"] * n_c \
        + options["recent_frames"] * g.tokens_per_frame + g.tokens_per_block
    attended = []

    def on_view(block, step, layer, keys, values):
        attended.append(keys.shape[2])
        assert keys.shape[2] == policy.attended_tokens() or step == driver.steps  # commit view == attended too
        assert keys.shape[2] <= limit
        assert policy.kv_tokens() <= policy.budget_tokens()
        assert policy.kv_bytes() <= policy.budget_tokens() * g.bytes_per_token

    driver.rollout(120, on_view=on_view)
    assert max(attended) == limit  # the bound is reached, not just respected
    assert len(policy.archive) == options["archive_blocks"]  # FIFO kept it at capacity
    assert [h.block for h in policy.archive] == list(range(120 - options["recent_frames"] // B - options["archive_blocks"],
                                                           120 - options["recent_frames"] // B))


def test_full_to_reduced_exchange():
    """A block leaving recent drops its full K/V and its commit-time compressed backup joins the archive."""
    policy, driver = pf_policy(sink_frames=4, recent_frames=8, top_k=4, archive_blocks=8)
    backups = {}

    def after_block(block):
        store, n_c = driver.store, policy.compressed_tokens
        if policy.needs_compression(block):
            backups[block] = store.pending.keys.clone()
        assert [h.block for h in policy.recent] == list(range(max(1, block - 1), block + 1))
        for held in policy.archive:
            slot = slice(held.slot * n_c, (held.slot + 1) * n_c)
            assert torch.equal(store.archive.keys[:, :, :, slot], backups[held.block])

    driver.rollout(8, after_block=after_block)
    assert [h.block for h in policy.archive] == list(range(1, 6))


def positions_of(policy, driver, layer):
    """(region, source block, temporal start) of every block ``layer`` attends in the block in progress."""
    return policy.positions(driver.plan, driver.selected(layer))


def fresh_keys_check(policy, driver, layer):
    """Every attended cached region equals keys freshly rotated at its assigned position."""
    g, T, n_c = policy.geometry, policy.geometry.tokens_per_block, policy.compressed_tokens
    ws = driver.store.workspace.keys[layer]
    for held in policy.sink:
        got = ws[:, :, policy.sink_offset + held.slot * T :][:, :, :T]
        ref = driver.rotated(driver.raw(held.block, layer, "k", T), driver.block_positions(held.pos))
        torch.testing.assert_close(got, ref.transpose(1, 2), rtol=0, atol=1e-5)
    for held in policy.recent:
        got = ws[:, :, policy.recent_offset + held.slot * T :][:, :, :T]
        ref = driver.rotated(driver.raw(held.block, layer, "k", T), driver.block_positions(held.pos))
        torch.testing.assert_close(got, ref.transpose(1, 2), rtol=0, atol=1e-5)
    regions = {block: pos for region, block, pos in positions_of(policy, driver, layer) if region == "mid_selected"}
    for i, held in enumerate(driver.selected(layer)):
        got = ws[:, :, policy.mid_offset + i * n_c :][:, :, :n_c]
        pos = driver.compressed_positions(0.0)
        pos[:, 0] = regions[held.block] + torch.tensor(policy.t_offsets) * policy.span / g.block_frames
        ref = driver.rotated(driver.raw(held.block, layer, "kc", n_c), pos)
        torch.testing.assert_close(got, ref.transpose(1, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mid_span", ["span", "compressed", "single"])
def test_rope_adjustment_repositions_keys_exactly(mid_span):
    policy, driver = pf_policy(sink_frames=8, recent_frames=8, top_k=2, archive_blocks=5, mid_span=mid_span)
    checked = []

    def on_view(block, step, layer, keys, values):
        if step != 0:
            return
        fresh_keys_check(policy, driver, layer)
        positions = positions_of(policy, driver, layer)
        starts = [pos for _, _, pos in positions]
        sizes = [policy.span if region == "mid_selected" else B for region, _, _ in positions]
        assert starts[0] == 0.0 or not policy.sink
        assert all(math.isclose(a + s, b) for a, s, b in zip(starts, sizes, starts[1:]))  # contiguous
        region, cur_block, cur_pos = positions[-1]
        assert region == "current" and cur_pos == driver.t_starts[block]
        for region, src, pos in positions:  # recent keeps its natural distance to the current block
            if region == "recent":
                assert cur_pos - pos == (cur_block - src) * B
        assert cur_pos <= 8 + 2 * policy.span + 8  # positions stay small at any length
        checked.append(block)

    driver.rollout(14, on_view=on_view)
    assert len(set(checked)) == 14


def test_without_adjustment_keys_keep_absolute_positions():
    policy, driver = pf_policy(sink_frames=4, recent_frames=4, top_k=2, archive_blocks=4, rope_adjust=False)

    def on_view(block, step, layer, keys, values):
        assert driver.t_starts[block] == block * B
        for region, src, pos in positions_of(policy, driver, layer):
            assert pos == src * B

    driver.rollout(10, on_view=on_view)


def aligned_policy(rope_adjust, scores_by_block, top_k=3):
    """Compressed keys of block b = scores_by_block[b] · u, queries = u; u lives in the width channels,
    which temporal re-rotation never touches, so the scores are known in advance."""
    policy, driver = pf_policy(sink_frames=4, recent_frames=4, top_k=top_k, archive_blocks=len(scores_by_block),
                               rope_adjust=rope_adjust)
    d, t_dim = policy.geometry.head_dim, driver.rope.t_dim
    u = torch.zeros(d)
    u[-2] = 1.0  # a width channel; its pair partner stays 0 and the w-position of all tokens is 0
    original_raw = driver.raw

    def raw(block, layer, kind, n):
        x = original_raw(block, layer, kind, n)
        if kind == "kc":
            return (scores_by_block.get(block, 0.0) * u).expand_as(x).clone()
        if kind.startswith("q"):
            return u.expand_as(x).clone()
        return x

    driver.raw = raw
    driver.compressed_hw = (torch.zeros(policy.compressed_tokens), torch.zeros(policy.compressed_tokens))
    return policy, driver


@pytest.mark.parametrize("rope_adjust", [False, True])
def test_topk_picks_the_highest_scoring_blocks(rope_adjust):
    gen = torch.Generator().manual_seed(0)
    values = torch.randperm(20, generator=gen).float().tolist()
    scores = {b: values[b] for b in range(20)}
    policy, driver = aligned_policy(rope_adjust, scores, top_k=3)
    calls = []

    def count_scoring(store):
        original = store._scores
        store._scores = lambda layer, q: calls.append((policy.block_index, driver.step, layer)) or original(layer, q)

    driver.on_store = count_scoring
    picks = {}
    driver.rollout(16, after_block=lambda b: picks.setdefault(b, [h.block for h in driver.selected(0)]))
    last = picks[15]
    candidates = list(range(1, 14))  # while block 15 runs: sink = block 0, recent = block 14
    expected = sorted(sorted(candidates, key=lambda b: -scores[b])[:3])
    assert last == expected
    # computed once per block and layer, at the first denoising step only
    assert all(step == 0 for _, step, _ in calls)
    assert len(calls) == len(set(calls))
    # deterministic
    policy2, driver2 = aligned_policy(rope_adjust, scores, top_k=3)
    picks2 = {}
    driver2.rollout(16, after_block=lambda b: picks2.setdefault(b, [h.block for h in driver2.selected(0)]))
    assert picks2 == picks


def test_recency_selection_takes_the_newest():
    policy, driver = pf_policy(sink_frames=4, recent_frames=4, top_k=2, archive_blocks=6, selection="recency")
    picks = {}
    driver.rollout(12, after_block=lambda b: picks.setdefault(b, [h.block for h in driver.selected(0)]))
    assert picks[11] == [8, 9]


def test_bad_config_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        pf_policy(sink_frames=6)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        pf_policy(top_k=-1)
    with pytest.raises(ValueError, match="archive_blocks"):
        pf_policy(top_k=8, archive_blocks=4)
    with pytest.raises(ValueError, match="unknown mid_span"):
        pf_policy(mid_span="wide")
    with pytest.raises(ValueError, match="unknown option"):
        pf_policy(topk=3)
