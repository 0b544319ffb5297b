"""Data-free compressor self-distillation (issue 14, item 4) on tiny configs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from packforcing.embedded import default_pipeline
from packforcing.loading import load_compressor
from packforcing.pipeline import Pipeline
from packforcing.sampler import SamplerConfig
from packforcing.trace import TraceRecorder
from packforcing.training import distill as D
from tests.test_self_forcing import hub  # noqa: F401  (the fake Hugging Face cache fixture)

TRAIN = ["a red circle over a navy background", "a blue square and a yellow triangle over black",
         "a white circle over dark grey", "a green square over white"]
HELDOUT = ["a green circle over white", "a red square over black"]


@pytest.fixture(scope="module")
def world():
    return default_pipeline()


def test_trained_hr_beats_untrained_on_heldout_rollouts_and_loss_falls(world):
    cfg = D.DistillConfig(seconds=5, steps=120, lr=3e-4, seed=0)
    untrained = D.new_compressor(world, seed=0)
    rollouts = D.make_rollouts(world, untrained, TRAIN, cfg.seconds, seed=0)
    heldout = D.make_rollouts(world, untrained, HELDOUT, cfg.seconds, seed=100)
    assert all(len(r.latents) == 5 for r in rollouts)  # 5 s of the tiny world = 5 blocks (the training length)
    before = D.heldout_loss(world, untrained, heldout, cfg), D.heldout_loss(world, untrained, rollouts, cfg)
    trained, losses = D.distill(world, [], cfg, compressor=D.new_compressor(world, seed=0), rollouts=rollouts)
    after = D.heldout_loss(world, trained, heldout, cfg), D.heldout_loss(world, trained, rollouts, cfg)
    assert len(losses) == cfg.steps
    assert after[1] < 0.9 * before[1]  # the loss falls on the training rollouts
    assert after[0] < 0.95 * before[0]  # and the trained HR branch beats the untrained one on held-out rollouts
    assert sum(losses[-30:]) < sum(losses[:30])
    for p in world.transformer.parameters():  # the transformer stayed frozen
        assert p.grad is None


def test_compressed_mid_is_placed_exactly_as_inference_places_it():
    pipe = Pipeline.tiny_random(height=64, width=64)
    pipe.sampler = SamplerConfig(block_frames=3)
    recorder = TraceRecorder()
    pipe.generate("a red circle", seconds=5, policy="packforcing", recorder=recorder)  # top_k 16 >= archive
    rows = recorder.tables()["positions"].query("block == 6 and layer == 0")
    compressor = pipe.compressor
    sample = D.Sample(rollout=0, current=6, mid=3, selected=(2, 3, 4), timestep=625.0, noise_seed=0)
    history, current_pos, comp_t = D.placement(pipe, compressor, sample)
    placed = {block: start for block, start, _ in history}
    expected = {int(r.source_block): float(r.pos_after) for r in rows.itertuples() if r.region != "current"}
    assert sorted(placed) == [0, 1, 2, 3, 4, 5]
    assert placed == pytest.approx(expected)
    current = rows.query("region == 'current'")
    assert current_pos == pytest.approx(float(current.iloc[0]["pos_after"]))
    # m's compressed tokens: its start plus the compressor's temporal centres (span mode 'span')
    t_offsets = compressor.centres(3, 8, 8)[0].double()
    assert torch.allclose(comp_t, placed[3] + t_offsets)
    # a partial selection closes the gap (temporal RoPE adjustment): 2 and 4 contiguous after the sink
    history, current_pos, _ = D.placement(pipe, compressor, D.Sample(0, 6, 4, (2, 4), 625.0, 0))
    assert [(b, s) for b, s, _ in history] == [(0, 0.0), (1, 3.0), (2, 6.0), (4, 9.0), (5, 12.0)]
    assert current_pos == 15.0
    _, _, single_t = D.placement(pipe, compressor, D.Sample(0, 6, 4, (2, 4), 625.0, 0), mid_span="single")
    assert torch.allclose(single_t, 7.0 + t_offsets / 3)


def test_command_line_output_loads_with_compressor_weights(tmp_path, capsys):
    from packforcing.__main__ import main as generate_main

    out = tmp_path / "hr.safetensors"
    assert D.main(["--model", "embedded", "--prompt", TRAIN[0], "--heldout-prompt", HELDOUT[0], "--steps", "4",
                   "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["losses"]) == 4 and "heldout_trained" in report
    compressor = load_compressor(out, model_dim=256)
    assert compressor.mode == "both" and compressor.hr is not None
    video = tmp_path / "v.mp4"
    assert generate_main(["generate", "--prompt", TRAIN[0], "--seconds", "5", "--compressor-weights", str(out),
                          "--compressor", "both", "--out", str(video)]) == 0
    assert video.stat().st_size > 0
    for bad in (["--seconds", "10"], ["--out", str(tmp_path / "hr.pt")], []):
        args = ["--prompt", TRAIN[0], "--out", str(out), *bad] if bad != [] else ["--out", str(out)]
        assert D.main(["--model", "embedded", "--steps", "1", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_real_model_distills_and_its_compressor_loads_in_the_app(hub, tmp_path, monkeypatch):  # noqa: F811
    from packforcing import self_forcing
    from packforcing.studio import models

    pipe = self_forcing.load_pipeline(height=64, width=64)
    compressor, losses = D.distill(pipe, ["a red circle"], D.DistillConfig(seconds=5, steps=3))
    path = tmp_path / "sf_hr.safetensors"
    compressor.save(str(path))
    monkeypatch.setenv(models.REAL_COMPRESSOR_ENV, str(path))
    models._PIPELINES.pop(self_forcing.KEY, None)
    loaded = models.get_pipeline(self_forcing.KEY)
    models._PIPELINES.pop(self_forcing.KEY, None)
    assert loaded.compressor.mode == "both"
    for name, tensor in compressor.hr.state_dict().items():
        assert torch.equal(loaded.compressor.hr.state_dict()[name], tensor)
    video = loaded.generate("a red circle", seconds=5, policy="packforcing", compressor_mode="both")
    assert video.shape[0] == 4 * 3 * 7 - 3


def test_clip_returns_finds_each_return_with_the_mid_blocks_that_showed_the_object():
    from packforcing.training.memory_distill import clip_returns

    ranges = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]
    in_view = np.zeros(24, dtype=bool)
    in_view[0:6] = True  # sink and half of block 1
    in_view[17:24] = True  # back in block 4, after an absence in blocks 2-3
    assert clip_returns(in_view, ranges, n_sink=1, n_recent=1) == ((4, (1,)),)
    assert clip_returns(in_view, ranges, n_sink=1, n_recent=3) == ()  # block 1 is recent for block 4: no mid view
    in_view[4:6] = False
    assert clip_returns(in_view, ranges, n_sink=1, n_recent=1) == ()  # only the sink showed it
    in_view[4:7] = True  # 3 of 4 frames of block 1
    assert clip_returns(in_view, ranges, n_sink=1, n_recent=1) == ((4, (1,)),)
    in_view[13] = True  # back already in block 3: block 4 is no return, block 3 is
    assert clip_returns(in_view, ranges, n_sink=1, n_recent=1) == ((3, (1,)),)


def test_memory_samples_leave_the_sink_out_and_draw_the_mid_block_that_shows_the_object(world):
    from packforcing.training.memory_distill import memory_rollouts

    options = dict(sink_frames=4, recent_frames=4)
    cfg = D.DistillConfig(steps=0, policy_options=options)
    compressor = D.new_compressor(world, seed=0)
    clips = memory_rollouts(world, compressor, 3, policy_options=options, seed=0)
    assert all(len(c.latents) == 5 and c.returns for c in clips)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        sample = D.draw_sample(world, compressor, clips, cfg, gen)
        assert sample.drop_sink and (sample.current, ) in {(n,) for n, _ in clips[sample.rollout].returns}
        assert sample.mid in dict(clips[sample.rollout].returns)[sample.current] and sample.mid in sample.selected
    clip = clips[sample.rollout]
    with torch.no_grad():
        loss = D.sample_loss(world, compressor, clip, sample, cfg)
        moved_sink = D.Rollout([clip.latents[0] + 3.0, *clip.latents[1:]], clip.lr_tokens, clip.text, clip.returns)
        assert float(D.sample_loss(world, compressor, moved_sink, sample, cfg)) == pytest.approx(float(loss), rel=1e-5)
        with_sink = dataclasses.replace(sample, drop_sink=False)
        assert float(D.sample_loss(world, compressor, moved_sink, with_sink, cfg)) != pytest.approx(
            float(D.sample_loss(world, compressor, clip, with_sink, cfg)), rel=1e-3)
    with pytest.raises(ValueError, match="at most 5 s"):
        memory_rollouts(world, compressor, 1, seconds=8.0)


def test_command_line_adds_memory_clips_and_reports_their_heldout_loss(tmp_path):
    out = tmp_path / "hr.safetensors"
    assert D.main(["--model", "embedded", "--prompt", TRAIN[0], "--memory-clips", "2", "--sink-frames", "4",
                   "--recent-frames", "4", "--steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["memory_clips"] == 2 and report["config"]["policy_options"] == {"sink_frames": 4, "recent_frames": 4}
    assert report["heldout_returns_trained"] > 0 and "heldout_returns_untrained" in report
