"""The named real model "self-forcing", found in a fake Hugging Face cache in the real layouts.

The cache (tests/fake_hub.py) holds tiny-width copies of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` and
``gdhe17/Self-Forcing``; the code under test finds them through ``huggingface_hub`` with
``local_files_only`` exactly as on a Space, loads them and generates on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import pytest
import torch

from packforcing import self_forcing
from packforcing.sampler import warp_timesteps
from packforcing.trace import TraceRecorder
from tests.fake_hub import build_fake_cache

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle over a navy background"
POLICIES = ["packforcing", "sink_window", "window", "deep_sink", "full"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HUB_CACHE pointing at the fake cache for this module (env for subprocesses, constant in-process)."""
    import huggingface_hub.constants as constants

    root = tmp_path_factory.mktemp("hf")
    ema = build_fake_cache(root / "hub", root / "work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("PACKFORCING_REAL_MODEL_SIZE", "64x64")
        yield SimpleNamespace(cache=root / "hub", ema=ema)
    from packforcing.studio import models

    models._PIPELINES.pop(self_forcing.KEY, None)


@pytest.fixture(scope="module")
def pipe(hub):
    return self_forcing.load_pipeline(height=64, width=64)


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_resolves_through_the_hub_cache_only(hub):
    assert self_forcing.is_cached()
    base, checkpoint = self_forcing.resolve()
    assert base.parent.parent.name == "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" and base.parent.name == "snapshots"
    assert (base / "model_index.json").is_file() and (base / "text_encoder").is_dir()
    assert checkpoint.as_posix().endswith("models--gdhe17--Self-Forcing/snapshots/"
                                          f"{checkpoint.parent.parent.name}/checkpoints/self_forcing_dmd.pt")
    assert checkpoint.is_symlink() and checkpoint.resolve().parent.name == "blobs"  # the real cache layout


def test_missing_files_are_reported_with_the_preload_hint(empty_hub):
    assert not self_forcing.is_cached()
    with pytest.raises(FileNotFoundError, match="preload_from_hub"):
        self_forcing.resolve()


def test_loads_the_ema_generator_and_samples_like_self_forcing(hub, pipe):
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in hub.ema.items())  # generator_ema, not generator
    assert pipe.name == "Self-Forcing DMD · Wan2.1-T2V-1.3B"
    assert pipe.block_frames == 3 and pipe.sampler.solver == "renoise" and not pipe.sampler.guided
    assert pipe.sampler.timesteps == pytest.approx([1000, 937.5, 833.333333, 625])
    assert pipe.sampler.timesteps == warp_timesteps([1000, 750, 500, 250], 5.0)
    assert pipe.compressor.mode == "lr"  # zero-shot PackForcing without trained weights


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_generates_at_its_defaults_with_3_frame_blocks(pipe, policy):
    recorder = TraceRecorder()
    video = pipe.generate(PROMPT, seconds=5, policy=policy, recorder=recorder)
    assert video.shape == (4 * 3 * 7 - 3, 64, 64, 3)  # 5 s = 7 blocks of 3 latent frames
    blocks = recorder.tables()["blocks"]
    assert len(blocks) == 7 and recorder.meta["block_frames"] == 3 and recorder.meta["options"] == {}
    if policy == "packforcing":  # mid blocks were compressed, archived and attended
        occupancy = recorder.tables()["occupancy"]
        assert occupancy.query("partition == 'mid_selected'")["tokens"].max() > 0


def _cli(args, env_extra, cwd):
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "packforcing", "generate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_generates_with_self_forcing_from_the_cache(hub, tmp_path):
    out = tmp_path / "sf.mp4"
    done = _cli(["--model", "self-forcing", "--prompt", PROMPT, "--seconds", "2", "--height", "64", "--width", "64",
                 "--device", "cpu", "--out", str(out)], {"HF_HUB_CACHE": str(hub.cache)}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 4 * 3 * 3 - 3  # 2 s = 3 blocks
    missing = _cli(["--model", "self-forcing", "--prompt", PROMPT, "--device", "cpu", "--out", str(out)],
                   {"HF_HUB_CACHE": str(tmp_path / "empty")}, tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    assert "preload_from_hub" in missing.stderr


def test_app_offers_and_generates_with_self_forcing(hub, monkeypatch):
    import app
    from packforcing import studio
    from packforcing.studio import models

    assert ("Self-Forcing DMD · Wan2.1-T2V-1.3B (GPU)", "self-forcing") in studio.model_choices()
    monkeypatch.setattr(studio, "DEFAULT_MODEL", "self-forcing")
    demo = app.build_demo()
    import gradio as gr

    dropdown = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Model")
    assert dropdown.value == "self-forcing" and "self-forcing" in [key for _, key in dropdown.choices]
    notes = " ".join(str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown))
    assert "Self-Forcing DMD · Wan2.1-T2V-1.3B" in notes and "3-latent-frame blocks" in notes

    request = SimpleNamespace(session_hash="self-forcing-test")
    outputs = list(app.generate(request, prompt=PROMPT, seconds=5, seed=1, policy="packforcing", model="self-forcing",
                                occ_layer="mean", occ_unit="tokens", topk_layer="mean", rope_layer="0"))
    final = outputs[-1]
    video = final[2]
    assert video and imageio_ffmpeg.count_frames_and_secs(video)[0] == 4 * 3 * 7 - 3
    assert models._PIPELINES[self_forcing.KEY].block_frames == 3


@pytest.mark.parametrize("cuda, cached, expected", [
    (True, True, "self-forcing"), (False, True, "embedded"), (True, False, "embedded"), (False, False, "embedded"),
])
def test_startup_default_model(hub, tmp_path, monkeypatch, cuda, cached, expected):
    import dataclasses

    import huggingface_hub.constants as constants

    from packforcing.studio import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if not cached:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.choose_default_model(load=False) == expected
    loaded = []
    choice = dataclasses.replace(models.MODELS["self-forcing"], loader=lambda: loaded.append(1) or
                                 self_forcing.load_pipeline(height=64, width=64))  # "cuda" here is the CPU
    monkeypatch.setitem(models.MODELS, "self-forcing", choice)
    monkeypatch.setattr(models, "_PIPELINES", type(models._PIPELINES)())
    assert models.choose_default_model() == expected  # loaded at start-up (module level on ZeroGPU)
    assert loaded == ([1] if expected == "self-forcing" else [])


def test_startup_falls_back_to_the_embedded_model_when_loading_fails(hub, monkeypatch, caplog):
    from packforcing.studio import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA "available", but torch here is CPU-only
    monkeypatch.setattr(models, "_PIPELINES", type(models._PIPELINES)())
    assert models.choose_default_model() == "embedded"
    assert "cannot be loaded" in caplog.text


@pytest.mark.parametrize("policy", POLICIES)
def test_cli_and_app_run_every_policy_at_its_defaults(hub, tmp_path, policy):
    import app
    from packforcing.__main__ import main

    out = tmp_path / f"{policy}.mp4"
    assert main(["generate", "--model", "self-forcing", "--prompt", PROMPT, "--seconds", "5", "--policy", policy,
                 "--height", "64", "--width", "64", "--device", "cpu", "--out", str(out)]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 4 * 3 * 7 - 3
    request = SimpleNamespace(session_hash=f"self-forcing-{policy}")
    final = list(app.generate(request, prompt=PROMPT, seconds=5, seed=2, policy=policy, model="self-forcing",
                              occ_layer="mean", occ_unit="tokens", topk_layer="mean", rope_layer="0"))[-1]
    assert final[2] and imageio_ffmpeg.count_frames_and_secs(final[2])[0] == 4 * 3 * 7 - 3
