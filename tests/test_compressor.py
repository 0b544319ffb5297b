"""Tests of the dual-branch compressor (HR CNN, LR pool→VAE→patch, fusion, save/load)."""

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch import nn

from packforcing.compressor import (
    PAPER_WIDTHS, Compressor, HRBranch, LRBranch, hr_token_grid, lr_token_grid, scaled_widths,
)
from packforcing.configs import TINY, WAN21_T2V_1P3B, WAN_LATENT_HW
from packforcing.vae import WanVAE, tiny_vae_config

D_TINY = TINY["num_attention_heads"] * TINY["attention_head_dim"]  # 128
D_FULL = WAN21_T2V_1P3B["num_attention_heads"] * WAN21_T2V_1P3B["attention_head_dim"]  # 1536


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(AutoencoderKLWan(**tiny_vae_config()).eval())


@pytest.fixture(scope="module")
def patch_embedding():
    torch.manual_seed(1)
    return nn.Conv3d(16, D_TINY, kernel_size=(1, 2, 2), stride=(1, 2, 2))


def test_scaled_widths():
    assert scaled_widths(D_FULL) == PAPER_WIDTHS
    assert scaled_widths(D_TINY) == (8, 8, 40, 168)
    assert all(w >= 8 for w in scaled_widths(16))


def test_full_size_grids_arithmetic():
    h, w = WAN_LATENT_HW
    assert hr_token_grid(4, h, w) == (2, 7, 13)
    assert hr_token_grid(3, h, w) == (2, 7, 13)
    assert lr_token_grid(4, h, w) == (2, 7, 13)
    assert lr_token_grid(3, h, w) == (2, 7, 13)
    assert Compressor.num_tokens(4, h, w) == 182
    assert Compressor.compression_ratio(4, h, w) == pytest.approx(6240 / 182)  # ≈34.3


def test_hr_full_size_paper_widths_on_meta():
    hr = HRBranch(D_FULL, PAPER_WIDTHS).to("meta")
    convs = [m for m in hr.net if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (16, 32, (2, 1, 1)), (32, 128, (1, 2, 2)), (128, 512, (1, 2, 2)),
        (512, 2048, (1, 2, 2)), (2048, D_FULL, (1, 1, 1)),
    ]
    assert sum(isinstance(m, nn.SiLU) for m in hr.net) == 4 and isinstance(hr.net[-1], nn.Conv3d)
    for f in (4, 3):
        out = hr(torch.empty(1, 16, f, *WAN_LATENT_HW, device="meta"))
        assert out.shape == (1, 182, D_FULL)


def test_hr_full_spatial_size_small_widths_runs():
    hr = HRBranch(8, widths=(4, 4, 4, 4))
    out = hr(torch.randn(2, 16, 4, *WAN_LATENT_HW))
    assert out.shape == (2, 182, 8) and torch.isfinite(out).all()


def test_lr_pool_pixels_frame_counts():
    # first block: 13 pixel frames -> pad to 16 -> pool 8 -> +1 warm-up = 9 = 1 + 4·2
    assert LRBranch.pool_pixels(torch.zeros(1, 3, 13, 32, 32), 4, 4).shape == (1, 3, 9, 8, 8)
    assert LRBranch.pool_pixels(torch.zeros(1, 3, 16, 32, 32), 4, 4).shape == (1, 3, 9, 8, 8)
    assert LRBranch.pool_pixels(torch.zeros(1, 3, 12, 32, 32), 3, 4).shape == (1, 3, 9, 8, 8)
    assert LRBranch.pool_pixels(torch.zeros(1, 3, 9, 32, 32), 3, 4).shape == (1, 3, 9, 8, 8)
    with pytest.raises(ValueError, match="exceed"):
        LRBranch.pool_pixels(torch.zeros(1, 3, 17, 32, 32), 4, 4)


def test_lr_pool_pixels_padding_and_warmup():
    x = torch.arange(13.0).view(1, 1, 13, 1, 1).expand(1, 3, 13, 4, 4)
    p = LRBranch.pool_pixels(x, 4, 4)[0, 0, :, 0, 0]
    # padded: 0,0,0,0,1,...,12 -> pairs (0,0),(0,0),(1,2),...; warm-up copies the first
    assert p.tolist() == [0.0, 0.0, 0.0, 1.5, 3.5, 5.5, 7.5, 9.5, 11.5]


@pytest.mark.parametrize("first_block,n_pix", [(True, 13), (False, 16)])
def test_lr_tiny_runs_first_and_later_block(vae, patch_embedding, first_block, n_pix):
    torch.manual_seed(2)
    latents = torch.randn(1, 16, 4, 16, 16)
    pixels = torch.rand(1, 3, n_pix, 128, 128) * 2 - 1
    comp = Compressor(D_TINY, mode="lr")
    assert len(list(comp.parameters())) == 0
    out = comp(latents, pixels=pixels, vae=vae, patch_embedding=patch_embedding, first_block=first_block)
    assert out.shape == (1, 8, D_TINY) and torch.isfinite(out).all()
    assert comp.output_grid(4, 16, 16) == lr_token_grid(4, 16, 16) == (2, 2, 2)


def test_lr_tiny_decodes_when_no_pixels(vae, patch_embedding):
    latents = torch.randn(1, 16, 3, 8, 8)  # 64x64 pixels -> grid (2, 1, 1)
    out = Compressor(D_TINY, mode="lr")(latents, vae=vae, patch_embedding=patch_embedding)
    assert out.shape == (1, 2, D_TINY)
    # passing the very pixels the decode gives is the same computation
    pixels = vae.decode(latents)
    out2 = Compressor(D_TINY, mode="lr")(latents, pixels=pixels, vae=vae.vae,
                                         patch_embedding=patch_embedding, first_block=True)
    torch.testing.assert_close(out, out2)


def test_lr_pixels_shape_mismatch(vae, patch_embedding):
    comp = Compressor(D_TINY, mode="lr")
    with pytest.raises(ValueError, match="first_block=False"):
        comp(torch.randn(1, 16, 4, 16, 16), pixels=torch.zeros(1, 3, 13, 128, 128), vae=vae,
             patch_embedding=patch_embedding)


def test_lr_grid_mismatch_is_clear(vae):
    pe = nn.Conv3d(16, D_TINY, kernel_size=1)  # no 2x2 patching -> grid (2, 4, 4) vs (2, 2, 2)
    with pytest.raises(ValueError, match="cannot be aligned"):
        Compressor(D_TINY, mode="lr")(torch.randn(1, 16, 4, 16, 16), vae=vae, patch_embedding=pe)


def test_hr_and_both_tiny_shapes(vae, patch_embedding):
    latents = torch.randn(2, 16, 4, 16, 16)
    torch.manual_seed(3)
    both = Compressor(D_TINY, mode="both")
    hr_out = both.hr(latents)
    assert hr_out.shape == (2, 8, D_TINY)
    out = both(latents, vae=vae, patch_embedding=patch_embedding)
    lr_out = Compressor(D_TINY, mode="lr")(latents, vae=vae, patch_embedding=patch_embedding)
    torch.testing.assert_close(out, hr_out + lr_out)
    assert Compressor(D_TINY, mode="hr")(torch.randn(1, 16, 3, 16, 16)).shape == (1, 8, D_TINY)


def test_compression_ratio_tiny():
    assert 4 * 8 * 8 == 256 and Compressor.num_tokens(4, 16, 16) == 8
    assert Compressor.compression_ratio(4, 16, 16) == 32.0


def test_token_centres_small_grid():
    # F=3, h=10, w=16 latent -> patch grid 5x8; compressed grid (2, 1, 2)
    assert Compressor.output_grid(3, 10, 16) == (2, 1, 2)
    t, h, w = Compressor.token_centres(3, 10, 16)
    assert t.dtype == torch.float32 and t.shape == (4,)
    assert t.tolist() == [0.5, 0.5, 2.0, 2.0]  # frames {0,1}, then {2}
    assert h.tolist() == [1.5] * 4  # rows 0..3
    assert w.tolist() == [1.5, 5.5, 1.5, 5.5]  # cols 0..3, 4..7
    th, hh, wh = Compressor.token_centres(4, *WAN_LATENT_HW)
    assert th.shape == (182,) and hh.max() == 25.5 and wh.max() == 49.5


def test_mode_and_missing_args_errors():
    with pytest.raises(ValueError, match="hr, lr, both"):
        Compressor(D_TINY, mode="fancy")
    with pytest.raises(ValueError, match="vae and patch_embedding"):
        Compressor(D_TINY, mode="lr")(torch.randn(1, 16, 4, 16, 16))
    with pytest.raises(ValueError, match="patch_embedding"):
        Compressor(D_TINY, mode="both")(torch.randn(1, 16, 4, 16, 16), vae=object())


@pytest.mark.parametrize("mode", ["hr", "both", "lr"])
def test_save_load_round_trip(tmp_path, vae, patch_embedding, mode):
    torch.manual_seed(4)
    comp = Compressor(D_TINY, mode=mode)
    path = tmp_path / "comp.safetensors"
    comp.save(path)
    loaded = Compressor.load(path)
    assert loaded.config == comp.config
    for k, v in comp.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    latents = torch.randn(1, 16, 4, 16, 16)
    kw = dict(vae=vae, patch_embedding=patch_embedding)
    assert torch.equal(comp(latents, **kw), loaded(latents, **kw))


def test_load_wrong_shapes_names_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    good = tmp_path / "good.safetensors"
    Compressor(D_TINY, mode="hr").save(good)
    # weights of one config under another config's metadata
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    save_file(Compressor(D_TINY, mode="hr", widths=(8, 8, 8, 8)).state_dict(), str(path), metadata=meta)
    with pytest.raises(ValueError, match="bad.safetensors"):
        Compressor.load(path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors"):
        Compressor.load(tmp_path / "plain.safetensors")
