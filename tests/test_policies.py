"""Full-resolution policies: what they keep, their budgets, their errors."""

import pytest
import torch

from packforcing.cache import POLICIES, make_policy
from tests.conftest import SyntheticDriver, tiny_geometry

B = 4  # latent frames per block


def kept_blocks_from_view(driver, keys, layer):
    """Identify which committed blocks a view holds by matching their stored keys."""
    g = driver.g
    T = g.tokens_per_block
    found = []
    for start in range(T, keys.shape[2], T):  # slot 0 is the current block
        chunk = keys[:, :, start : start + T]
        for block, t0 in driver.t_starts.items():
            ref = driver.rotated(driver.raw(block, layer, "k", T), driver.block_positions(t0)).transpose(1, 2)
            if torch.equal(chunk, ref):
                found.append(block)
                break
        else:
            raise AssertionError(f"view slot at token {start} holds no committed block")
    return sorted(found)


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("window", dict(window_frames=12), lambda b: list(range(max(0, b - 3), b))),
        ("sink_window", dict(sink_frames=8, window_frames=8), lambda b: sorted({0, 1} & set(range(b)) | set(range(max(2, b - 2), b)))),
        ("full", {}, lambda b: list(range(b))),
    ],
)
def test_keeps_exactly_the_promised_frames(name, options, expected):
    geometry = tiny_geometry(B)
    policy = make_policy(name, geometry, **options)
    driver = SyntheticDriver(policy, steps=1)
    budget_checked = []

    def on_view(block, step, layer, keys, values):
        assert kept_blocks_from_view(driver, keys, layer) == expected(block)
        assert keys.shape[2] == (1 + len(expected(block))) * geometry.tokens_per_block
        assert values.shape == keys.shape
        if policy.budget_tokens() is not None:
            assert policy.kv_tokens() <= policy.budget_tokens()
            assert policy.kv_bytes() <= policy.budget_tokens() * geometry.bytes_per_token
            budget_checked.append(block)

    driver.rollout(50, on_view=on_view)
    assert name == "full" or len(budget_checked) == 50 * 2 * geometry.num_layers


def test_full_grows_linearly():
    geometry = tiny_geometry(B)
    policy = make_policy("full", geometry)
    sizes = []
    SyntheticDriver(policy, steps=0).rollout(10, after_block=lambda b: sizes.append(policy.kv_tokens()))
    T = geometry.tokens_per_block
    assert sizes == [(b + 2) * T for b in range(10)]  # committed blocks + current slot


def test_buffers_are_preallocated_and_views_alias_them():
    geometry = tiny_geometry(B)
    policy = make_policy("window", geometry, window_frames=8)
    views, policy_store = [], []
    driver = SyntheticDriver(policy, steps=1)
    driver.on_store = policy_store.append
    driver.rollout(10, on_view=lambda b, s, layer, k, v: views.append(k.untyped_storage().data_ptr()))
    assert set(views) == {policy_store[0].workspace.keys.untyped_storage().data_ptr()}  # every view is a slice of one buffer


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("window", dict(window_frames=6), "not a multiple of the block size"),
        ("window", dict(window_frames=0), "at least one block"),
        ("window", dict(window_frames=-4), ">= 0"),
        ("sink_window", dict(sink_frames=3), "not a multiple"),
        ("window", dict(top_k=3), "bad option"),
        ("nonsense", {}, "unknown cache policy"),
    ],
)
def test_bad_knobs_are_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, tiny_geometry(B), **options)


def test_release_frees_buffers():
    policy = make_policy("full", tiny_geometry(B))
    store = policy.allocate(3)
    store.release()
    assert store.workspace is None and not store.buffers()


def test_registry_lists_the_policies():
    assert {"full", "window", "sink_window", "packforcing"} <= set(POLICIES)


def test_deep_sink_bounded_and_realigned():
    """deep_sink: token budget holds over 60 blocks, kept tokens sit before recent, fresh-rotation exact."""
    geometry = tiny_geometry(B, frame_hw=(2, 2))
    policy = make_policy("deep_sink", geometry, sink_frames=4, recent_frames=4, keep_tokens=20)
    driver = SyntheticDriver(policy, steps=1)
    T = geometry.tokens_per_block
    limit = T * (1 + 1 + 1) + 20

    def on_view(block, step, layer, keys, values):
        assert keys.shape[2] <= limit
        assert policy.kv_tokens() <= policy.budget_tokens()
        store = driver.store
        n = policy.kept_tokens
        if step == 0 and n:
            pos = store.kept_pos[layer, :n]
            recent_pos = policy.recent[0].pos
            assert pos.max() < recent_pos and pos.min() >= policy.sink[0].pos + B  # between sink and recent
            assert (pos[1:] >= pos[:-1]).all()  # temporal order kept
            # each kept token equals its raw key freshly rotated at its assigned temporal position
            src = store.kept_source[layer, :n]
            got = store.workspace.keys[layer, :, :, policy.kept_offset : policy.kept_offset + n]
            grid = driver.block_positions(0.0)
            for i in range(n):
                blk, j = divmod(int(src[i]), T)
                pos = grid[j : j + 1].clone()
                pos[0, 0] = float(store.kept_pos[layer, i])
                ref = driver.rotated(driver.raw(blk, layer, "k", T)[:, j : j + 1], pos)
                torch.testing.assert_close(got[:, :, i], ref[:, 0], rtol=0, atol=1e-5)
            if block == 59:
                assert n == 20

    driver.rollout(60, on_view=on_view)


def test_deep_sink_drops_only_low_attention_tokens():
    geometry = tiny_geometry(B, frame_hw=(2, 2))
    policy = make_policy("deep_sink", geometry, sink_frames=4, recent_frames=4, keep_tokens=8, rope_adjust=False)
    driver = SyntheticDriver(policy, steps=0)
    driver.rollout(12)
    assert policy.kept_tokens == 8  # in every layer
    frames = driver.store.kept_frame(driver.plan, 0)
    assert (frames >= 4).all() and (frames < 40).all()  # neither sink nor recent frames
