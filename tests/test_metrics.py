"""Long-video metrics on ground-truth tiny-world clips (must look natural) and on clips
corrupted the way a long autoregressive rollout fails (frozen, drifting, jumping, vanishing).

Bounds stated here: ground truth scores fidelity >= 0.95 per window (1.0 on the long clip),
background similarity 1.0 (>= 0.8 with the generator's own brightness drift), dynamics > 0.2
levels/frame with no frozen frames, and a jump ratio within [0.75, 1.33]."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import (
    METRICS, background_consistency, block_boundaries, dynamics, evaluate_video, frame_table,
    jump_artifacts, prompt_colours, prompt_fidelity, summarize, window_bounds, window_table,
)
from packforcing.world import BACKGROUNDS, Scene

FPS = 16
PROMPT = "a red circle, a blue square and a yellow triangle bouncing over a dark grey background"


@pytest.fixture(scope="module")
def long_clip():
    """60 s at 64x64, three objects, steady background."""
    scene = Scene.from_caption(PROMPT, seed=1)
    return scene, scene.render(60 * FPS, 64, 64, FPS)


def _natural(df, bg_min=1.0):
    assert (df["fidelity"] >= 0.95).all(), df["fidelity"]
    assert (df["background_similarity"] >= bg_min).all(), df["background_similarity"]
    assert (df["dynamics"] > 0.2).all() and (df["frozen_frac"] == 0).all()
    assert df["jump_ratio"].between(0.75, 1.33).all(), df["jump_ratio"]


def test_ground_truth_long_clip_is_natural(long_clip):
    scene, video = long_clip
    df, summary = evaluate_video(video, scene, fps=FPS, window_s=5.0)
    assert len(df) == 12 and df["t_end_s"].iloc[-1] == 60.0
    _natural(df)
    assert (df["fidelity"] == 1.0).all()
    assert set(f"presence_{c}" for c in ("red", "blue", "yellow")) <= set(df.columns)
    assert np.allclose(df[["bg_r", "bg_g", "bg_b"]].to_numpy(), BACKGROUNDS["dark grey"])
    assert summary["fidelity"] == 1.0 and summary["windows"] == 12


def test_ground_truth_many_scenes_are_natural():
    for seed in range(12):  # includes drifting backgrounds, 1-3 objects, all backgrounds
        scene = Scene.sample(seed)
        df, _ = evaluate_video(scene.render(20 * FPS, 48, 48, FPS), scene.caption(), fps=FPS)
        _natural(df, bg_min=1.0 if scene.bg_drift == 0 else 0.8)


def test_noisy_blurred_ground_truth_keeps_fidelity(long_clip):
    scene, video = long_clip
    rng = np.random.default_rng(0)
    x = video[: 20 * FPS].astype(float)
    x = sum(np.roll(x, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    x = np.clip(x + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    df, _ = evaluate_video(x, scene, fps=FPS)
    assert (df["fidelity"] >= 0.95).all() and (df["background_similarity"] >= 0.95).all()
    assert df["jump_ratio"].between(0.75, 1.33).all()


def test_frozen_video_has_no_dynamics(long_clip):
    scene, video = long_clip
    frozen = video[: 40 * FPS].copy()
    frozen[20 * FPS:] = frozen[20 * FPS - 1]
    df = dynamics(frozen, fps=FPS)
    assert (df["dynamics"].iloc[:4] > 0.2).all() and (df["frozen_frac"].iloc[:4] == 0).all()
    assert (df["dynamics"].iloc[4:] == 0).all() and (df["frozen_frac"].iloc[4:] == 1).all()
    assert np.allclose(jump_artifacts(frozen, fps=FPS)["jump_ratio"].iloc[4:], 1.0)  # no jumps either


def test_colour_drift_lowers_fidelity_and_background():
    scene = Scene.from_caption("a red circle and a yellow square bouncing over a navy background", seed=2)
    x = scene.render(30 * FPS, 48, 48, FPS).astype(float)
    alpha = np.linspace(0, 1, len(x))[:, None, None, None]  # hue drift: R,G,B -> G,B,R
    drifted = ((1 - alpha) * x + alpha * x[..., [1, 2, 0]]).round().astype(np.uint8)
    fid = prompt_fidelity(drifted, scene, fps=FPS)
    bg = background_consistency(drifted, scene, fps=FPS)
    assert fid["fidelity"].iloc[0] == 1.0 and fid["fidelity"].iloc[-1] <= 0.5
    assert bg["background_similarity"].iloc[-1] < 0.6
    assert fid["fidelity"].is_monotonic_decreasing and bg["background_similarity"].is_monotonic_decreasing


def test_block_boundary_jumps_are_detected(long_clip):
    scene, video = long_clip
    x = video[: 30 * FPS].copy()
    starts = np.concatenate([[0], block_boundaries(len(x)), [len(x)]])
    for k, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
        x[s:e] = np.roll(x[s:e], 8 * k, axis=2)  # the whole scene shifts 8 px per block
    df = jump_artifacts(x, fps=FPS)
    assert (df["jump_ratio"] > 3).all(), df["jump_ratio"]
    assert evaluate_video(video[: 30 * FPS], scene, fps=FPS)[0]["jump_ratio"].max() < 1.33
    # Misaligned boundaries do not see them (the block layout is a parameter).
    assert (jump_artifacts(x, fps=FPS, first_block_frames=5)["jump_ratio"] < 1.33).all()


def test_vanishing_object_lowers_fidelity(long_clip):
    scene, video = long_clip
    x = video[: 30 * FPS].copy()
    without_red = dataclasses.replace(scene, objects=scene.objects[1:])
    x[10 * FPS:] = without_red.render(len(x), 64, 64, FPS)[10 * FPS:]  # red circle vanishes at 10 s
    df = prompt_fidelity(x, scene, fps=FPS)
    assert (df["presence_red"].iloc[2:] == 0).all() and (df["presence_blue"] == 1).all()
    assert np.allclose(df["fidelity"].iloc[2:], 2 / 3) and (df["fidelity"].iloc[:2] == 1).all()


def test_windows_and_block_boundaries():
    assert block_boundaries(80).tolist() == [13, 29, 45, 61, 77]
    assert block_boundaries(40, frames_per_block=12).tolist() == [9, 21, 33]
    assert window_bounds(200, fps=16, window_s=5) == [(0, 80), (80, 160), (160, 200)]
    assert window_bounds(190, fps=16, window_s=5) == [(0, 80), (80, 190)]  # 30 < 40: merged
    assert window_bounds(50, fps=16, window_s=5) == [(0, 50)]


def test_prompt_forms_and_tables():
    scene = Scene.from_caption("a red circle and a red square bouncing over a black background")
    assert list(prompt_colours(scene)) == ["red"]
    assert prompt_colours("a green triangle") == {"green": (40, 210, 60)}
    assert list(prompt_colours([(1, 2, 3), "blue"])) == ["rgb(1,2,3)", "blue"]
    assert prompt_colours(None) == {}
    video = scene.render(40, 32, 32)
    frames = frame_table(video, scene)
    assert len(frames) == 40 and np.isnan(frames["diff"].iloc[0]) and "area_red" in frames
    df = window_table(frame_table(video), window_s=1.0)
    assert df["fidelity"].isna().all() and not df["dynamics"].isna().any()
    with pytest.raises(ValueError, match="uint8"):
        frame_table(video.astype(np.float32))


def test_summarize_makes_comparison_rows(long_clip):
    scene, video = long_clip
    good, _ = evaluate_video(video[:320], scene, fps=FPS)
    bad = good.assign(fidelity=np.linspace(1, 0, len(good)))
    table = pd.concat([summarize(good, "full"), summarize(bad, "sink-only")])
    assert list(table.index) == ["full", "sink-only"]
    assert set(METRICS) | {m + "_last" for m in METRICS} | {"windows", "duration_s"} == set(table.columns)
    assert table.loc["full", "fidelity"] == 1.0 and table.loc["sink-only", "fidelity"] == 0.5
    assert table.loc["sink-only", "fidelity_last"] == 0.0
