"""Model configs are bounded before anything is built (issue 16, item 8): hostile sizes, wrong types
and non-JSON give one `ModelConfigError` naming the file, fast; the CLI turns refused weights into an
``error:`` line; library argument errors are ``ValueError``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from packforcing.config_checks import ModelConfigError, check_transformer_config
from packforcing.configs import TINY, WAN21_T2V_1P3B
from packforcing.loading import WeightLoadError, load_compressor, load_transformer, load_wan_pipeline_components
from packforcing.model import CausalWanTransformer
from tests.test_real_format import write_wan_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def wan_dir(tmp_path):
    root = tmp_path / "wan"
    write_wan_dir(root)
    return root


def edit_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 100000}, "num_attention_heads=100000 is outside"),
    ({"num_layers": 10**6}, "num_layers=1000000 is outside"),
    ({"num_layers": "30"}, "num_layers must be an integer"),
    ({"num_layers": 2.5}, "num_layers must be an integer"),
    ({"num_layers": True}, "num_layers must be an integer"),
    ({"patch_size": "122"}, "patch_size must be a list"),
    ({"attention_head_dim": 33}, "must be even"),
    ({"eps": "tiny"}, "eps must be a finite number"),
    ({"qk_norm": 3}, "qk_norm must be a string"),
    # every size in range, together far more than any machine's memory
    ({"num_layers": 256, "num_attention_heads": 256, "attention_head_dim": 128, "ffn_dim": 262144}, "GiB"),
])
def test_hostile_transformer_config_is_refused_before_building(wan_dir, changes, message):
    config = wan_dir / "transformer" / "config.json"
    edit_config(config, **changes)
    start = time.monotonic()
    for load in (lambda: load_transformer(wan_dir / "transformer", model_cls=CausalWanTransformer),
                 lambda: load_wan_pipeline_components(wan_dir)):
        with pytest.raises(ModelConfigError, match=message) as info:
            load()
        assert str(config) in str(info.value) and isinstance(info.value, ValueError)
    assert time.monotonic() - start < 5  # nothing was built or allocated


@pytest.mark.parametrize("folder, changes, message", [
    ("vae", {"base_dim": 10**6}, "base_dim=1000000 is outside"),
    ("vae", {"dim_mult": [1, 2, 2, 2, 2, 2, 2, 2, 2]}, "dim_mult must be a list"),
    ("vae", {"temperal_downsample": [True]}, "temperal_downsample must be"),
    ("text_encoder", {"num_heads": 100000}, "num_heads=100000 is outside"),
    ("text_encoder", {"vocab_size": "big"}, "vocab_size must be an integer"),
    ("text_encoder", {"d_model": 65536, "d_ff": 262144, "num_layers": 256}, "GiB"),
])
def test_hostile_vae_and_text_encoder_configs_name_their_file(wan_dir, folder, changes, message):
    config = wan_dir / folder / "config.json"
    edit_config(config, **changes)
    with pytest.raises(ModelConfigError, match=message) as info:
        load_wan_pipeline_components(wan_dir)
    assert str(config) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "", "\xff\xfe"])
def test_non_json_config_names_the_file(wan_dir, text):
    config = wan_dir / "vae" / "config.json"
    config.write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelConfigError) as info:
        load_wan_pipeline_components(wan_dir)
    assert str(config) in str(info.value)


def test_the_real_configs_pass_and_are_estimated_right():
    params = check_transformer_config(WAN21_T2V_1P3B, "wan", devices=())
    assert abs(params - 1_418_996_800) / 1_418_996_800 < 0.02  # the real count (tests/test_estimate.py)
    check_transformer_config(TINY, "tiny")


def test_library_argument_errors_are_value_errors(wan_dir):
    weights = wan_dir / "transformer"
    for kwargs in ({"config": "TINY"}, {"device": "warp-drive"}, {"dtype": "fp32"}, {"dtype": torch.int64}):
        with pytest.raises(ValueError):
            load_transformer(weights, model_cls=CausalWanTransformer, **kwargs)
    from packforcing.pipeline import Pipeline

    for size in ({"height": -64}, {"height": 0}, {"width": 64.0}):
        with pytest.raises(ValueError, match="height and width"):
            Pipeline.from_pretrained(wan_dir, **{"height": 64, "width": 64, **size})
    from packforcing import self_forcing

    with pytest.raises(ValueError, match="not a device"):
        self_forcing.load_pipeline(device="warp-drive")


def test_refused_weights(wan_dir, tmp_path):
    pt = tmp_path / "compressor.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(WeightLoadError, match=r"compressor\.pt.*\.safetensors"):
        load_compressor(pt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(WeightLoadError, match="garbage.safetensors"):
        load_compressor(garbage)
    text = wan_dir / "text_encoder"
    weights = next(text.glob("*.safetensors"))
    torch.save({"w": torch.zeros(1)}, text / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(WeightLoadError, match=r"(?s)text encoder must be in safetensors.*pytorch_model\.bin"):
        load_wan_pipeline_components(wan_dir)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "packforcing", "generate", "--prompt", "a red circle", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_turns_refused_weights_and_bad_configs_into_error_lines(wan_dir, tmp_path):
    out = str(tmp_path / "v.mp4")
    pt = tmp_path / "compressor.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    refused_compressor = _cli("--model", str(wan_dir), "--height", "64", "--width", "64", "--device", "cpu",
                              "--compressor-weights", str(pt), "--out", out)
    embedded_compressor = _cli("--compressor-weights", str(pt), "--out", out)
    edit_config(wan_dir / "transformer" / "config.json", num_layers=10**6)
    bad_config = _cli("--model", str(wan_dir), "--height", "64", "--width", "64", "--device", "cpu", "--out", out)
    edit_config(wan_dir / "transformer" / "config.json", num_layers=TINY["num_layers"])
    text = wan_dir / "text_encoder"
    torch.save({"w": torch.zeros(1)}, text / "pytorch_model.bin")
    next(text.glob("*.safetensors")).unlink()
    bin_text = _cli("--model", str(wan_dir), "--height", "64", "--width", "64", "--device", "cpu", "--out", out)
    for done, needle in [(refused_compressor, "compressor.pt"), (embedded_compressor, "compressor.pt"),
                         (bad_config, "num_layers=1000000"), (bin_text, "pytorch_model.bin")]:
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in done.stderr
    assert not Path(out).exists()
