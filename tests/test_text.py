"""Text encoders: Wan-style zero padding, offline tiny encoder round trip, prompt edge cases."""

from __future__ import annotations

import types

import pytest
import torch

from packforcing.text import TinyTextEncoder, UMT5TextEncoder

CAPTIONS = [
    "a cat walks along the beach at sunset",
    "a red car drives fast on a wet road at night",
    "a dog runs through a green park, chasing a ball",
    "waves crash on rocks under a cloudy sky",
]


@pytest.fixture(scope="module")
def encoder():
    return TinyTextEncoder.build(CAPTIONS, text_dim=64, max_length=16, seed=0)


def test_shape_dtype_and_text_dim(encoder):
    emb = encoder.encode(["a cat on the road", "a dog"])
    assert encoder.text_dim == 64
    assert emb.shape == (2, 16, 64) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()


def test_padding_positions_are_zero(encoder):
    prompts = ["a cat", "a red car at night"]
    emb = encoder.encode(prompts)
    _, mask = encoder.tokenize(prompts)
    assert 0 < mask[0].sum() < mask[1].sum() < 16
    assert (emb[mask == 0] == 0).all()
    assert (emb[mask == 1].abs().sum(-1) > 0).all()


def test_matches_diffusers_wan_pipeline_prompt_embeds(encoder):
    from diffusers import WanPipeline

    prompts = ["a cat  walks &amp; runs", "waves"]
    pipe = types.SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model,
                                 _execution_device=torch.device("cpu"))
    with torch.no_grad():  # grad mode picks other CPU kernels (~1e-6 differences)
        theirs = WanPipeline._get_t5_prompt_embeds(pipe, prompts, max_sequence_length=16,
                                                   device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(encoder.encode(prompts), theirs)


def test_save_load_round_trip_is_identical(encoder, tmp_path):
    encoder.save(tmp_path)
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    loaded = TinyTextEncoder.load(tmp_path)
    assert loaded.max_length == 16 and loaded.text_dim == 64
    prompts = ["a cat walks", "sunset over the park", "猫が歩く"]
    assert torch.equal(loaded.encode(prompts), encoder.encode(prompts))
    via_umt5 = UMT5TextEncoder.from_pretrained(tmp_path)  # diffusers layout
    assert via_umt5.max_length == 16
    assert torch.equal(via_umt5.encode(prompts), encoder.encode(prompts))


def test_build_is_deterministic(encoder):
    again = TinyTextEncoder.build(CAPTIONS, text_dim=64, max_length=16, seed=0)
    other = TinyTextEncoder.build(CAPTIONS, text_dim=64, max_length=16, seed=1)
    assert torch.equal(again.encode(["a cat"]), encoder.encode(["a cat"]))
    assert not torch.equal(other.encode(["a cat"]), encoder.encode(["a cat"]))


@pytest.mark.parametrize("prompt", ["猫がビーチを歩く", "Кошка идёт по пляжу", "🐱🌅", "مرحبا"])
def test_non_latin_prompts_encode(encoder, prompt):
    ids, mask = encoder.tokenize([prompt])
    assert encoder.tokenizer.unk_token_id in ids[0].tolist()
    emb = encoder.encode([prompt])
    assert emb.shape == (1, 16, 64) and torch.isfinite(emb).all()
    assert (emb[0, mask[0] == 1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_prompt_raises(encoder, bad):
    with pytest.raises(ValueError, match="prompt is empty"):
        encoder.encode([bad])
    with pytest.raises(ValueError, match="prompt is empty"):
        encoder.encode(["a cat", bad])


def test_long_prompt_is_truncated(encoder):
    ids, mask = encoder.tokenize(["a cat walks " * 100])
    assert ids.shape == (1, 16) and mask.all()
    assert ids[0, -1].item() == encoder.tokenizer.eos_token_id  # EOS kept last
    emb = encoder.encode(["a cat walks " * 100])
    assert emb.shape == (1, 16, 64) and (emb[0].abs().sum(-1) > 0).all()


class _OffloadSpy:
    """Stands in for a text encoder that lives on another device (here "meta") between prompts."""

    def __init__(self, fail=False):
        self.device, self.calls, self.fail = torch.device("meta"), [], fail

    def to(self, device=None, dtype=None):
        self.device = torch.device(device)
        self.calls.append(("to", str(device)))
        return self

    def encode(self, prompts):
        self.calls.append(("encode", str(self.device)))
        if self.fail:
            raise RuntimeError("boom")
        return torch.ones(len(prompts), 3, 4, device=self.device)


@pytest.mark.parametrize("fail", [False, True])
def test_text_offload_visits_the_transformer_device_only_while_encoding(fail):
    from packforcing.pipeline import Pipeline

    pipe = Pipeline.tiny_random()
    spy = pipe.text_encoder = _OffloadSpy(fail)
    pipe.text_offload = True
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            pipe.encode_prompt("a red circle")
    else:
        assert pipe.encode_prompt("a red circle").device == pipe.transformer.device
    # moved to the transformer's device, encoded there, sent back to the CPU even after an error
    assert spy.calls == [("to", "cpu"), ("encode", "cpu"), ("to", "cpu")]
    pipe.text_offload = False
    spy.calls.clear()
    spy.fail = False
    pipe.encode_prompt("a red circle")
    assert spy.calls == [("encode", "cpu")]  # without offload the encoder is never moved
