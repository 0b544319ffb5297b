"""RoPE with arbitrary temporal positions: composition, channel split, agreement with diffusers."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from packforcing.rope import Rope3D, split_head_dim


def test_split_matches_wan():
    assert split_head_dim(128) == (44, 42, 42)  # 22/21/21 complex pairs
    for d in (32, 64, 96, 128):
        t, h, w = split_head_dim(d)
        assert t + h + w == d and h == w and t % 2 == 0


@pytest.mark.parametrize("head_dim", [32, 128])
def test_cos_sin_match_diffusers_table(head_dim):
    frames, height, width = 3, 4, 6
    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    ref_cos, ref_sin = ref(torch.zeros(1, 16, frames, 2 * height, 2 * width))  # [1, N, 1, d]
    rope = Rope3D(head_dim)
    cos, sin = rope.cos_sin(Rope3D.grid(frames, height, width))  # [N, d/2], one per pair
    torch.testing.assert_close(cos, ref_cos[0, :, 0, 0::2].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0, :, 0, 1::2].float(), rtol=0, atol=1e-6)


def test_rotate_then_shift_equals_rotate_at_sum():
    rope = Rope3D(128)
    torch.manual_seed(0)
    raw = torch.randn(2, 30, 3, 128)  # [B, N, heads, d]
    pos = Rope3D.grid(5, 2, 3, t_start=7.0)
    delta = torch.linspace(-6.5, 40.25, 30, dtype=torch.float64)  # per token, fractional
    cos, sin = rope.cos_sin(pos)
    rotated = rope.apply_tokens(raw, cos, sin).transpose(1, 2).contiguous()  # cache layout [B, H, N, d]
    rope.rotate_temporal_(rotated, delta)
    moved = pos.clone()
    moved[:, 0] += delta
    cos2, sin2 = rope.cos_sin(moved)
    fresh = rope.apply_tokens(raw, cos2, sin2).transpose(1, 2)
    torch.testing.assert_close(rotated, fresh, rtol=0, atol=1e-5)


def test_shift_leaves_spatial_channels_untouched():
    rope = Rope3D(128)
    keys = torch.randn(1, 2, 10, 128)
    before = keys.clone()
    rope.rotate_temporal_(keys, 3.25)
    assert torch.equal(keys[..., rope.t_dim :], before[..., rope.t_dim :])
    assert not torch.allclose(keys[..., : rope.t_dim], before[..., : rope.t_dim])


def test_zero_shift_is_identity_and_norm_preserving():
    rope = Rope3D(64)
    keys = torch.randn(1, 2, 10, 64)
    before = keys.clone()
    rope.rotate_temporal_(keys, 0.0)
    assert torch.equal(keys, before)
    rope.rotate_temporal_(keys, 11.0)
    torch.testing.assert_close(keys.norm(dim=-1), before.norm(dim=-1))


def test_positions_far_beyond_any_table():
    """A 1-hour video has 14,400 latent frames; nothing indexes a finite table."""
    rope = Rope3D(128)
    cos, sin = rope.cos_sin(Rope3D.grid(2, 2, 2, t_start=14_400.0))
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))


def test_relative_property():
    """q·k depends only on the position difference: the property the re-anchoring relies on."""
    rope = Rope3D(128)
    q, k = torch.randn(1, 1, 1, 128), torch.randn(1, 1, 1, 128)

    def score(pq, pk):
        cq, sq = rope.cos_sin(torch.tensor([[pq, 1.0, 2.0]]))
        ck, sk = rope.cos_sin(torch.tensor([[pk, 1.0, 2.0]]))
        return (rope.apply_tokens(q, cq, sq) * rope.apply_tokens(k, ck, sk)).sum()

    torch.testing.assert_close(score(10.0, 3.0), score(1007.0, 1000.0), rtol=1e-5, atol=1e-5)
