"""Real-weight paths, with checkpoints written here in the real formats (tiny widths)."""

import imageio.v3 as iio
import torch
from diffusers import AutoencoderKLWan

from packforcing.__main__ import main
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.pipeline import Pipeline
from packforcing.text import TinyTextEncoder
from packforcing.vae import tiny_vae_config
from tests.test_loading import self_forcing_checkpoint, to_original


def write_wan_dir(root, seed=0):
    torch.manual_seed(seed)
    model = CausalWanTransformer(**TINY)
    model.save_pretrained(root / "transformer")
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(root / "vae")
    TinyTextEncoder.build(["a red circle over a navy background"], text_dim=TINY["text_dim"]).save(root)
    return model


def test_diffusers_dir_and_self_forcing_checkpoint_generate_the_same_video(tmp_path):
    root = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    write_wan_dir(root, seed=0)
    torch.manual_seed(1)
    other = CausalWanTransformer(**TINY)  # different weights, saved in the Self-Forcing format
    original = {to_original(k): v for k, v in other.state_dict().items()}
    torch.save(self_forcing_checkpoint(original), tmp_path / "self_forcing_dmd.pt")

    sf = Pipeline.from_pretrained(root, tmp_path / "self_forcing_dmd.pt", height=64, width=64)
    assert sf.block_frames == 3  # the public Self-Forcing checkpoint's block size
    for name, tensor in other.state_dict().items():
        assert torch.equal(sf.transformer.state_dict()[name], tensor), name

    # the same weights saved under diffusers names give the identical video
    other.save_pretrained(root / "transformer")
    plain = Pipeline.from_pretrained(root, height=64, width=64, block_frames=3)
    prompt = "a red circle over a navy background"
    a = sf.generate(prompt, seconds=1.5, policy="packforcing", sink_frames=3, recent_frames=3, top_k=1, seed=3)
    b = plain.generate(prompt, seconds=1.5, policy="packforcing", sink_frames=3, recent_frames=3, top_k=1, seed=3)
    assert a.shape == (4 * 6 - 3, 64, 64, 3) and (a == b).all()


def test_cli_with_model_directory(tmp_path, capsys):
    root = tmp_path / "wan"
    write_wan_dir(root)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(root), "--height", "64", "--width", "96", "--prompt", "a red circle",
                 "--seconds", "1", "--policy", "window", "--window-frames", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert iio.imread(out).shape == (13, 64, 96, 3)
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu",
                 "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
