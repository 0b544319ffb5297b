"""Issue 11 item 4: cache knobs come from the policies' config dataclasses, and their defaults and
control steps follow the model's block size (Self-Forcing checkpoints have 3-latent-frame blocks)."""

from __future__ import annotations

import dataclasses

import imageio.v3 as iio
import pytest
import torch

from packforcing import knobs, studio
from packforcing.__main__ import build_parser, main, policy_fields
from packforcing.cache import POLICIES, make_policy
from packforcing.cache.config import knob_kind
from packforcing.compressor import Compressor
from packforcing.configs import TINY
from packforcing.model import CausalWanTransformer
from packforcing.pipeline import Pipeline
from tests.conftest import tiny_geometry
from tests.test_loading import self_forcing_checkpoint, to_original
from tests.test_real_format import write_wan_dir

PROMPT = "a red circle over a navy background"


@pytest.mark.parametrize("block_frames", [3, 4])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_default_policies_build_for_the_block_size(name, block_frames):
    geometry = tiny_geometry(block_frames, frame_hw=(4, 4))
    offsets = Compressor.token_centres(block_frames, 8, 8)[0]
    policy = make_policy(name, geometry, compressed_t_offsets=offsets)
    for f in dataclasses.fields(policy.config):
        if f.metadata.get("block_multiple"):
            value = getattr(policy.config, f.name)
            assert value == f.metadata["default_blocks"] * block_frames, f.name
    specs = knobs.knob_specs(block_frames)
    for name_, default in knobs.policy_knobs(name, block_frames).items():
        spec = specs[name_]
        if spec.step == block_frames:  # frame knobs: whole blocks, and the default is on the grid
            assert spec.minimum % block_frames == 0 and spec.maximum % block_frames == 0
            assert spec.minimum <= default <= spec.maximum and default % block_frames == 0


def test_one_source_of_limits():
    """The library, the CLI and the Studio read the same field metadata."""
    fields = policy_fields()
    parser = build_parser()
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["generate"]._actions}
    assert set(fields) <= flags  # every knob has a CLI flag
    for name, (f, _) in fields.items():
        assert knobs.knob_specs()[name].label == f.metadata["label"]
        if knob_kind(f) == "int" and f.metadata.get("maximum") is not None and f.metadata["maximum"] != "frames_of_tokens":
            with pytest.raises(ValueError, match="too large"):
                make_policy(fields[name][1][0], tiny_geometry(4), compressed_t_offsets=torch.zeros(2),
                            **{name: int(f.metadata["maximum"]) + 4})


@pytest.fixture(scope="module")
def self_forcing(tmp_path_factory):
    """A diffusers directory plus a Self-Forcing-format checkpoint (3-frame blocks), tiny width."""
    root = tmp_path_factory.mktemp("sf")
    write_wan_dir(root / "wan", seed=0)
    torch.manual_seed(1)
    other = CausalWanTransformer(**TINY)
    torch.save(self_forcing_checkpoint({to_original(k): v for k, v in other.state_dict().items()}),
               root / "self_forcing_dmd.pt")
    return root


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_self_forcing_checkpoint_runs_every_policy_with_defaults_from_the_cli(self_forcing, policy, tmp_path):
    out = tmp_path / "v.mp4"
    code = main(["generate", "--model", str(self_forcing / "wan"), "--checkpoint", str(self_forcing / "self_forcing_dmd.pt"),
                 "--height", "64", "--width", "64", "--prompt", PROMPT, "--seconds", "3.75", "--policy", policy,
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert iio.imread(out).shape == (4 * 3 * 5 - 3, 64, 64, 3)  # 5 blocks of 3 latent frames: past sink + recent


def test_self_forcing_checkpoint_runs_every_policy_with_defaults_from_the_app(self_forcing, tmp_path, monkeypatch):
    """The app's handlers with the defaults it shows (`on_policy`) for a 3-frame-block model."""
    import app

    pipe = Pipeline.from_pretrained(self_forcing / "wan", self_forcing / "self_forcing_dmd.pt", height=64, width=64)
    assert pipe.block_frames == 3
    monkeypatch.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    monkeypatch.setenv(studio.RUNS_DIR_ENV, str(tmp_path / "runs"))
    for policy in sorted(POLICIES):
        shown = app.on_policy(policy)[3:]  # the knob controls' updates: visible ones carry the defaults
        values = {name: u.get("value") for name, u in zip(app.KNOB_NAMES, shown) if u.get("visible")}
        assert values == knobs.policy_knobs(policy, 3)
        inputs = dict.fromkeys(app.INPUTS)
        inputs.update(prompt=PROMPT, seconds=5, seed=0, policy=policy, randomize_seed=False, **values)
        request, _ = app._request_from([inputs[name] for name in app.INPUTS])
        final = studio.GenerationWorker(request, tmp_path / policy, segments=False).run(timeout=300)
        assert final.kind == "done", (policy, final.message)
        assert final.frames_done == 4 * 3 * request.num_blocks - 3
