"""Weight loading: Self-Forcing / original-Wan / diffusers formats, strict checks, safety."""

from __future__ import annotations

import os
import pickle
import re
import time

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from packforcing.configs import TINY, WAN21_T2V_1P3B
from packforcing.loading import (
    WeightLoadError,
    check_state_dict,
    convert_self_forcing_state_dict,
    load_transformer,
    load_wan_pipeline_components,
    read_state_dict,
    save_transformer,
)
from packforcing.text import TinyTextEncoder, UMT5TextEncoder
from packforcing.vae import tiny_vae_config

# diffusers name fragment -> original Wan name fragment (inverse of diffusers' converter).
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the affine cross-attention norm
    ("proj_out.", "head.head."),
]


def to_original(key: str) -> str:
    """A diffusers `WanTransformer3DModel` key in original Wan naming."""
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", key)
    for new, old in _TO_ORIGINAL:
        key = key.replace(new, old)
    return key


def self_forcing_checkpoint(ema: dict, raw: dict | None = None) -> dict:
    """Self-Forcing layout: {"generator", "generator_ema"} with `model.`-prefixed original keys."""
    wrap = lambda sd: {f"model.{to_original(k)}": v.clone() for k, v in sd.items()}  # noqa: E731
    return {"generator": wrap(raw if raw is not None else ema), "generator_ema": wrap(ema)}


def tiny_model(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, **overrides}).eval()


@torch.no_grad()
def forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 8, TINY["text_dim"], generator=g)
    return model(x, torch.tensor([500.0]), ctx, return_dict=False)[0]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


# ------------------------------------------------------------------------------------- conversion
def test_inverse_mapping_round_trips_through_diffusers_converter(model):
    sd = model.state_dict()
    original = {to_original(k): v for k, v in sd.items()}
    assert len(original) == len(sd)  # injective
    assert {"head.head.weight", "head.modulation", "blocks.0.modulation", "blocks.0.norm3.weight",
            "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.ffn.0.weight",
            "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.bias",
            "time_projection.1.weight", "blocks.0.self_attn.norm_q.weight"} <= set(original)
    converted = convert_self_forcing_state_dict(original)
    assert list(converted) == list(sd)
    assert all(converted[k] is sd[k] for k in sd)  # renamed only, tensors shared
    assert len(original) == len(sd)  # input not consumed (diffusers' converter pops its argument)


def test_diffusers_names_pass_through_unchanged(model):
    sd = model.state_dict()
    assert list(convert_self_forcing_state_dict(sd)) == list(sd)  # no norm2/norm3 swap
    assert list(convert_self_forcing_state_dict({f"model.{k}": v for k, v in sd.items()})) == list(sd)


def test_full_size_wan21_keys_convert_on_meta():
    with torch.device("meta"):
        full = WanTransformer3DModel(**WAN21_T2V_1P3B)
    expected = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert 1.2e9 < sum(p.numel() for p in full.parameters()) < 1.5e9
    ckpt = {"generator_ema": {f"model.{to_original(k)}": torch.empty(s, device="meta")
                              for k, s in expected.items()}}
    assert "model.blocks.29.cross_attn.k.weight" in ckpt["generator_ema"]
    assert tuple(ckpt["generator_ema"]["model.head.modulation"].shape) == (1, 2, 1536)
    converted = convert_self_forcing_state_dict(ckpt)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    check_state_dict(converted, full, "self_forcing_dmd.pt")  # raises on any difference


# ------------------------------------------------------------------------------------------ loading
def test_self_forcing_checkpoint_reproduces_diffusers_outputs(model, tmp_path):
    other = tiny_model(1)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(self_forcing_checkpoint(model.state_dict(), other.state_dict()), path)
    save_transformer(model, tmp_path / "diffusers")  # same weights under diffusers names

    reference = forward(model)
    from_pt = load_transformer(path, config=TINY)
    from_diffusers = load_transformer(tmp_path / "diffusers")
    assert torch.equal(forward(from_pt), reference)
    assert torch.equal(forward(from_diffusers), reference)
    assert torch.equal(forward(load_transformer(path, config=TINY, use_ema=False)), forward(other))


class _Subclass(WanTransformer3DModel):
    """Like CausalWanTransformer: same weights, an ``__init__(*args, **kwargs)`` wrapper."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


def test_subclass_with_varargs_init_gets_the_config(model, tmp_path):
    path = tmp_path / "sf.pt"
    torch.save(self_forcing_checkpoint(model.state_dict()), path)
    loaded = load_transformer(path, config=TINY, model_cls=_Subclass)
    assert type(loaded) is _Subclass and loaded.config.num_layers == TINY["num_layers"]
    assert torch.equal(forward(loaded), forward(model))


def test_save_transformer_file_and_directory_round_trip(model, tmp_path):
    file = save_transformer(model, tmp_path / "ckpt" / "tiny.safetensors")
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert torch.equal(forward(load_transformer(file)), forward(model))
    save_transformer(model, tmp_path / "dir")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "dir")  # diffusers can read it too
    assert torch.equal(forward(loaded), forward(model))


def test_diffusers_sharded_directory_and_fp32_modules(model, tmp_path):
    model.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(forward(load_transformer(tmp_path / "pipe")), forward(model))
    # dtype casting mirrors diffusers' from_pretrained (_keep_in_fp32_modules stay fp32)
    ours = load_transformer(tmp_path / "pipe", dtype=torch.bfloat16)
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer",
                                                   torch_dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in theirs.state_dict().items()}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == dtypes
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16


def test_original_wan_safetensors_loads(model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wan_original.safetensors"
    save_file({to_original(k): v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert torch.equal(forward(load_transformer(path, config=TINY)), forward(model))


# ----------------------------------------------------------------------------------------- failures
def _save_sd(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_truncated_safetensors(model, tmp_path):
    path = _save_sd(model.state_dict(), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="cut.safetensors"):
        read_state_dict(path)
    with pytest.raises(WeightLoadError, match="cut.safetensors"):
        load_transformer(path, config=TINY)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_pt(model, tmp_path, damage):
    path = tmp_path / "bad.pt"
    torch.save(self_forcing_checkpoint(model.state_dict()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(WeightLoadError, match="bad.pt"):
        load_transformer(path, config=TINY)


def test_wrong_width_names_file_key_and_shapes(tmp_path):
    path = _save_sd(tiny_model(0, attention_head_dim=16).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(WeightLoadError) as info:
        load_transformer(path, config=TINY)
    msg = str(info.value)
    assert "narrow.safetensors" in msg  # first mismatches in model order, both shapes shown
    assert "scale_shift_table (checkpoint (1, 2, 64) vs model (1, 2, 128))" in msg
    assert "patch_embedding.weight (checkpoint (64, 16, 1, 2, 2) vs model (128, 16, 1, 2, 2))" in msg
    assert "blocks.3.attn1.to_q.weight" in [k for k, _, _ in info.value.mismatched]
    assert not info.value.missing and not info.value.unexpected


def test_missing_key(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["blocks.1.attn2.to_k.weight"]
    path = _save_sd(sd, tmp_path / "missing.safetensors")
    with pytest.raises(WeightLoadError, match=r"(?s)missing\.safetensors.*missing keys \(1\): blocks\.1\.attn2\.to_k\.weight"):
        load_transformer(path, config=TINY)


def test_unexpected_key(model, tmp_path):
    sd = {**model.state_dict(), "blocks.0.extra.weight": torch.zeros(3)}
    path = tmp_path / "extra.pt"
    torch.save(self_forcing_checkpoint(sd), path)
    with pytest.raises(WeightLoadError, match=r"(?s)extra\.pt.*unexpected keys \(1\): blocks\.0\.extra\.weight"):
        load_transformer(path, config=TINY)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"generator_ema": {"model.patch_embedding.weight": _Evil(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(WeightLoadError, match=r"(?s)evil\.pt.*refused.*posix\.system"):
        read_state_dict(path)
    with pytest.raises(WeightLoadError, match="refused"):
        load_transformer(path, config=TINY)
    assert not marker.exists()


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_transformer(tmp_path / "nope.safetensors", config=TINY)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no weights here")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        read_state_dict(tmp_path / "empty")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "training_state.pt"
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, path)
    with pytest.raises(WeightLoadError, match=r"(?s)training_state\.pt.*non-tensor.*optimizer"):
        load_transformer(path, config=TINY)


def test_missing_config_is_explained(model, tmp_path):
    path = tmp_path / "sf.pt"
    torch.save(self_forcing_checkpoint(model.state_dict()), path)
    with pytest.raises(ValueError, match="config"):
        load_transformer(path)


# ----------------------------------------------------------------------------------------- pipeline
def test_pipeline_components_from_local_directory(model, tmp_path):
    root = tmp_path / "Wan2.1-tiny-Diffusers"
    model.save_pretrained(root / "transformer")
    torch.manual_seed(0)
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(root / "vae")
    text = TinyTextEncoder.build(["a cat on the beach", "a dog in the park"], text_dim=TINY["text_dim"])
    text.save(root)

    parts = load_wan_pipeline_components(str(root))
    assert isinstance(parts.transformer, WanTransformer3DModel)
    assert isinstance(parts.vae, AutoencoderKLWan)
    assert isinstance(parts.text_encoder, UMT5TextEncoder)
    assert parts.text_encoder.text_dim == parts.transformer.config.text_dim
    assert torch.equal(forward(parts.transformer), forward(model))
    assert torch.equal(parts.text_encoder.encode(["a cat"]), text.encode(["a cat"]))

    sd = dict(model.state_dict())
    del sd["blocks.0.attn1.to_q.weight"]  # diffusers' from_pretrained would only warn here
    _save_sd(sd, root / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightLoadError, match=r"(?s)transformer.*blocks\.0\.attn1\.to_q\.weight"):
        load_wan_pipeline_components(root)


def test_missing_hub_id_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        load_wan_pipeline_components("packforcing-tests/no-such-model-xyz", local_files_only=True)
    with pytest.raises(FileNotFoundError):
        load_wan_pipeline_components("/definitely/not/a/dir")
    assert time.monotonic() - start < 5
