"""Streaming block decode equals a full decode of the same latents."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from packforcing.vae import WanVAE, conv3d_backend, pixel_frames, tiny_vae_config, use_onednn_conv3d


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(AutoencoderKLWan(**tiny_vae_config()).eval())


@pytest.mark.parametrize("block_frames", [3, 4])
def test_streaming_decode_equals_full_decode(vae, block_frames):
    latents = torch.randn(1, 16, 3 * block_frames, 4, 6)
    full = vae.decode(latents)
    decoder = vae.streaming_decoder()
    parts = []
    for start in range(0, latents.shape[2], block_frames):
        parts.append(decoder.decode_block(latents[:, :, start : start + block_frames]))
        vae.encode(torch.zeros(1, 3, 5, 32, 48))  # an encode in between must not disturb the decoder
    assert parts[0].shape[2] == pixel_frames(block_frames, first=True)
    assert all(p.shape[2] == pixel_frames(block_frames, first=False) for p in parts[1:])
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=0, atol=1e-6)


def test_reset_starts_a_new_video(vae):
    latents = torch.randn(1, 16, 4, 4, 6)
    decoder = vae.streaming_decoder()
    first = decoder.decode_block(latents)
    decoder.reset()
    assert torch.equal(decoder.decode_block(latents), first)


def test_encode_needs_1_plus_4k_frames(vae):
    with pytest.raises(ValueError, match="1\\+4k"):
        vae.encode(torch.zeros(1, 3, 8, 32, 32))
    assert vae.encode(torch.zeros(1, 3, 9, 32, 32)).shape == (1, 16, 3, 4, 4)


def test_onednn_conv_path_matches_aten_and_restores():
    conv = torch.nn.Conv3d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 3, 10, 10)
    with conv3d_backend(conv, onednn=False) as n:
        ref = conv(x)
    assert n == 1 and "_conv_forward" not in vars(conv)  # restored to the class method
    assert use_onednn_conv3d(conv) == 1
    torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-5)
    with conv3d_backend(conv, onednn=False):
        torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    assert "_conv_forward" in vars(conv)  # the permanent routing is back


def test_concurrent_encodes_and_streams_give_the_results_of_sequential_ones(vae):
    """Two runs sharing one VAE (the Studio with PACKFORCING_CONCURRENCY > 1): one thread encodes
    (the LR branch) while another resets and streams (a new video). Each result must equal the one
    computed alone: diffusers' module-level cache is only touched under ``WanVAE.lock``."""
    import threading

    pixels = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    latents = torch.randn(1, 16, 8, 4, 6)
    alone_encode = vae.encode(pixels)
    results = {"encode": [], "stream": []}

    def encoder():
        for _ in range(8):
            results["encode"].append(vae.encode(pixels))

    def stream():
        decoder = vae.streaming_decoder()
        return torch.cat([decoder.decode_block(latents[:, :, i : i + 4]) for i in (0, 4)], dim=2)

    def streamer():
        for _ in range(8):
            results["stream"].append(stream())

    alone_stream = stream()
    threads = [threading.Thread(target=encoder), threading.Thread(target=streamer)]
    with torch.inference_mode():
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert all(torch.equal(e, alone_encode) for e in results["encode"]) and len(results["encode"]) == 8
    assert all(torch.equal(s, alone_stream) for s in results["stream"]) and len(results["stream"]) == 8
