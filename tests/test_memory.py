"""Issue 13 item 6: the memory test scenes and their metric, validated on ground truth and on
corrupted clips before any model is scored with it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from analysis.memory import appearances, memory_frame_table, memory_score
from packforcing.world import COLOURS, WORLD_V2, Scene, colours_for, vocabulary
from packforcing.world.memory import GAP_RANGE_S, memory_caption, memory_scene, visible_intervals

H = W = 64
FPS = 16
SECONDS = 60


def render(scene: Scene, seconds: float = SECONDS) -> np.ndarray:
    return scene.render(int(seconds * FPS), H, W, FPS)


@pytest.mark.parametrize("seed", range(8))
def test_memory_scenes_hide_the_object_longer_than_the_recent_window_and_after_the_sink(seed):
    scene = memory_scene(seed)
    caption = memory_caption(scene)
    objects_part = caption.split(" bouncing over ")[0].split()
    assert set(caption.split()) <= set(vocabulary()) and not set(objects_part) & set(COLOURS)  # no colour named
    assert scene.objects[0].shape in caption and scene.background in caption
    assert scene.objects[0].colour in WORLD_V2.colours and scene.background in WORLD_V2.backgrounds
    shown = visible_intervals(scene, SECONDS, H, W, FPS)
    assert shown[0][0] >= GAP_RANGE_S[0] / 2 - 1 / FPS > 2.0  # first seen after the sink's 2 s
    gaps = [b[0] - a[1] for a, b in zip(shown, shown[1:])]
    assert len(gaps) >= 3 and min(gaps) >= GAP_RANGE_S[0] - 2 / FPS  # absences longer than any recent window
    assert memory_scene(seed) == memory_scene(seed) and Scene.from_dict(scene.to_dict()) == scene


def test_a_room_margin_of_zero_is_the_old_world():
    scene = Scene.sample(3, world="v2")
    assert scene.room_margin == 0.0
    tracks = scene.object_tracks(400, H, W, FPS)
    for i, o in enumerate(scene.objects):
        left, right, up, down = o.extents(H, W)
        assert tracks[:, i, 0].min() >= left - 1e-9 and tracks[:, i, 0].max() <= W - right + 1e-9
    with pytest.raises(ValueError, match="room_margin"):
        dataclasses.replace(scene, room_margin=-1.0)


@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_keeps_its_identity_at_every_return(seed):
    scene = memory_scene(seed)
    score = memory_score(render(scene), scene.background, FPS)
    whole = [iv for iv in visible_intervals(scene, SECONDS, H, W, FPS)[1:] if iv[1] < SECONDS - 1.5]
    assert score["returns"] >= len(whole) >= 2
    assert score["colour_kept"] == 1.0 and score["identity_kept"] == 1.0
    assert (score["first_colour"], score["first_shape"]) == (scene.objects[0].colour, scene.objects[0].shape)


def _switched_after_first_absence(scene: Scene, **changes) -> np.ndarray:
    """Ground truth until the middle of the first absence, then the same motion with `changes`."""
    first = visible_intervals(scene, SECONDS, H, W, FPS)[:2]
    cut = int(round((first[0][1] + first[1][0]) / 2 * FPS))
    other = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], **changes),))
    video = render(scene)
    video[cut:] = render(other)[cut:]
    return video


@pytest.mark.parametrize("seed", range(4))
def test_an_object_that_comes_back_in_another_colour_or_shape_fails(seed):
    scene = memory_scene(seed)
    obj = scene.objects[0]
    colour = next(c for c in colours_for(scene.background) if c in WORLD_V2.colours and c != obj.colour)
    recoloured = memory_score(_switched_after_first_absence(scene, colour=colour), scene.background, FPS)
    assert recoloured["returns"] >= 2 and recoloured["colour_kept"] == 0.0 and recoloured["identity_kept"] == 0.0
    shape = {"circle": "square", "square": "triangle", "triangle": "circle"}[obj.shape]
    reshaped = memory_score(_switched_after_first_absence(scene, shape=shape), scene.background, FPS)
    assert reshaped["colour_kept"] == 1.0 and reshaped["identity_kept"] == 0.0


def test_no_absence_or_no_object_is_reported_not_scored():
    scene = Scene.sample(5, num_objects=1, world="v2")  # an object that never leaves the frame
    stays = memory_score(render(scene, 20), scene.background, FPS)
    assert stays["returns"] == 0 and np.isnan(stays["colour_kept"]) and np.isnan(stays["identity_kept"])
    blank = np.zeros((80, H, W, 3), np.uint8)
    empty = memory_score(blank, "black", FPS)
    assert empty["returns"] == 0 and empty["first_colour"] is None and appearances(memory_frame_table(blank, "black")).empty


def test_bad_videos_and_backgrounds_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        memory_frame_table(np.zeros((4, H, W, 3), np.float32), "black")
    with pytest.raises(ValueError, match="background"):
        memory_frame_table(np.zeros((4, H, W, 3), np.uint8), "purple")


def test_the_memory_table_counts_scenes_without_returns_and_skips_their_nans():
    import pandas as pd

    from analysis.evaluate_memory import markdown, summarize

    runs = pd.DataFrame([
        dict(length_s=30.0, policy="window", returns=2, colour_kept=0.5, identity_kept=0.0, peak_kv_MB=3.0),
        dict(length_s=30.0, policy="window", returns=0, colour_kept=np.nan, identity_kept=np.nan, peak_kv_MB=3.0),
        dict(length_s=30.0, policy="full", returns=0, colour_kept=np.nan, identity_kept=np.nan, peak_kv_MB=9.0),
    ])
    table = summarize(runs).set_index("policy")
    assert table.loc["window", "scenes"] == 2 and table.loc["window", "scenes_with_returns"] == 1
    assert table.loc["window", "colour_kept"] == 0.5 and table.loc["window", "returns"] == 1.0
    assert np.isnan(table.loc["full", "colour_kept"])
    text = markdown(summarize(runs))
    assert "| 30 | full | 1 | 0 | 0.00 | – | – | 9.00 |" in text


def test_memory_budgets_store_the_same_tokens_and_packforcing_reaches_back_past_any_absence():
    import dataclasses as dc

    from analysis.estimate import block_accounting
    from analysis.evaluate_memory import memory_specs
    from analysis.model_spec import PRESETS

    spec = dc.replace(PRESETS["tiny"], height=64, width=64)  # the embedded v2 geometry: 16 tokens per latent frame
    stored = {}
    for s in memory_specs(trained_hr=True):
        if s.policy == "full":
            continue
        tokens = block_accounting(spec, s.policy, s.options, num_blocks=60)["kv_tokens"]
        stored[s.label] = tokens[-1]
        assert max(tokens) == tokens[-1]  # bounded: the steady state is the peak
    assert set(stored.values()) == {256}, stored  # 16 latent frames' worth (current block included), every policy
    pf = next(s for s in memory_specs() if s.label.startswith("packforcing"))
    assert pf.options["archive_blocks"] >= 2 * GAP_RANGE_S[1]  # blocks of 1 s: history beyond the longest absence


def test_colour_free_captions_parse_and_the_studio_does_not_warn_about_them():
    from packforcing import studio
    from packforcing.world.memory import parse_memory_caption

    for seed in range(6):
        scene = memory_scene(seed)
        shapes, background = parse_memory_caption(memory_caption(scene))
        assert shapes == [scene.objects[0].shape] and background == scene.background
        assert studio.prompt_warning(memory_caption(scene)) is None
    for bad in ("a red square bouncing over a black background", "a square square square", "a cube"):
        with pytest.raises(ValueError):
            parse_memory_caption(bad)
    assert "maroon" in studio.prompt_warning("a square bouncing over a maroon background")  # not in world v2
    assert studio.prompt_warning("a square bouncing over a glittery background") is not None


def test_every_example_prompt_is_in_the_embedded_models_world():
    from packforcing import studio
    from packforcing.studio.view import load_examples

    examples = load_examples()
    assert len(examples) >= 6 and any("bouncing over" in e and not set(e.split()[:2]) & set(COLOURS) for e in examples)
    assert [e for e in examples if studio.prompt_warning(e) is not None] == []


def test_compare_strip_stacks_the_saved_strips_of_a_scene_and_skips_missing_ones(tmp_path):
    import imageio.v2 as imageio

    from analysis.evaluate_memory import _slug, compare_strip

    (tmp_path / "strips").mkdir()
    rows = {"ground truth": 10, "full": 20}  # "window" was never saved
    for label, value in rows.items():
        imageio.imwrite(tmp_path / "strips" / f"120s_scene2_{_slug(label)}.png", np.full((6, 30, 3), value, np.uint8))
    path = compare_strip(tmp_path, 120, 2, ["ground truth", "window", "full"])
    stacked = imageio.imread(path)
    assert path.name == "120s_scene2_compare.png" and stacked.shape == (12, 30, 3)
    assert (stacked[:6] == 10).all() and (stacked[6:] == 20).all()
