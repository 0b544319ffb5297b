"""Tiny-world generator: palette, caption grammar, determinism, motion and rendering."""

import numpy as np
import pytest

from packforcing.world import (
    BACKGROUNDS, COLOURS, SHAPES, Scene, SceneObject, colours_for, contrasts, make_clip,
    parse_caption, tokenize, vocabulary,
)
from packforcing.world.palette import colour_distance


def test_palette_is_distinguishable():
    for name, rgb in {**COLOURS, **BACKGROUNDS}.items():
        assert len(rgb) == 3 and all(0 <= v <= 255 for v in rgb), name
    for bg in BACKGROUNDS:
        assert len(colours_for(bg)) >= 6
    assert not contrasts("white", "white")
    names = list(COLOURS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert colour_distance(COLOURS[a], COLOURS[b]) > 100, (a, b)


def test_caption_grammar():
    obj = lambda c, s: SceneObject(c, s, 0.1, 0.5, 0.5, 0.1, 0.1)
    one = Scene("navy", (obj("orange", "circle"),))
    assert one.caption() == "an orange circle bouncing over a navy background"
    two = Scene("dark grey", (obj("red", "circle"), obj("blue", "square")))
    assert two.caption() == "a red circle and a blue square bouncing over a dark grey background"
    three = Scene("black", (obj("red", "circle"), obj("blue", "square"), obj("green", "triangle")))
    assert three.caption() == ("a red circle, a blue square and a green triangle "
                               "bouncing over a black background")


def test_vocabulary_covers_all_captions():
    vocab = set(vocabulary(include_punctuation=True))
    assert {"red", "circle", "dark", "grey", "navy", "bouncing"} <= vocab
    assert "," not in vocabulary()
    for seed in range(200):
        assert set(tokenize(Scene.sample(seed).caption())) <= vocab


def test_caption_round_trip():
    for seed in range(50):
        scene = Scene.sample(seed)
        again = Scene.from_caption(scene.caption(), seed=seed + 1)
        assert again.caption() == scene.caption()
        pairs = lambda s: [(o.colour, o.shape) for o in s.objects]
        assert pairs(again) == pairs(scene)


def test_from_user_prompt():
    scene = Scene.from_caption("a red circle and a blue square bouncing over a dark grey background", seed=3)
    assert scene.background == "dark grey"
    assert [(o.colour, o.shape) for o in scene.objects] == [("red", "circle"), ("blue", "square")]
    lenient = Scene.from_caption(
        "A Red Circle and a blue square bouncing over a dark GRAY background.", seed=3)
    assert lenient == scene
    no_bg = Scene.from_caption("a white triangle bouncing", seed=0)
    assert contrasts("white", no_bg.background)
    assert parse_caption("a yellow square") == ([("yellow", "square")], None)


@pytest.mark.parametrize("caption, fragment", [
    ("a purple circle bouncing over a black background", "unknown word"),
    ("a red bouncing over a black background", "<colour> <shape>"),
    ("a circle red bouncing over a black background", "<colour> <shape>"),
    ("a red circle bouncing over a grey background", "unknown background"),
    ("a red circle, a blue circle, a green circle and a cyan circle bouncing", "at most 3"),
    ("a white square bouncing over a white background", "not distinguishable"),
])
def test_from_caption_errors(caption, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        Scene.from_caption(caption)
    if "unknown" in fragment or "<colour>" in fragment:
        assert "colours: red" in str(err.value) and "dark grey" in str(err.value)


def test_determinism():
    a, cap_a, scene_a = make_clip(7, num_frames=20, height=32, width=32)
    b, cap_b, scene_b = make_clip(7, num_frames=20, height=32, width=32)
    assert np.array_equal(a, b) and cap_a == cap_b and scene_a == scene_b
    c, _, _ = make_clip(8, num_frames=20, height=32, width=32)
    assert not np.array_equal(a, c)
    assert Scene.sample(np.random.default_rng(5)) == Scene.sample(5)
    assert Scene.from_dict(scene_a.to_dict()) == scene_a


def test_make_clip_defaults():
    frames, caption, scene = make_clip(0)
    assert frames.shape == (77, 128, 128, 3) and frames.dtype == np.uint8
    assert caption == scene.caption()


def test_sampled_scenes_vary():
    scenes = [Scene.sample(s) for s in range(300)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert any(s.bg_drift > 0 for s in scenes) and any(s.bg_drift == 0 for s in scenes)
    for s in scenes:  # distinct colours; areas separated so nothing is ever fully hidden
        assert len({o.colour for o in s.objects}) == len(s.objects)
        areas = sorted(o.area for o in s.objects)
        assert all(b >= 1.5 * a - 1e-12 for a, b in zip(areas, areas[1:]))


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80)])
def test_bouncing_stays_inside(height, width):
    fps, frames = 16, 16 * 120
    for seed in range(20):
        scene = Scene.sample(seed)
        tracks = scene.object_tracks(frames, height, width, fps)
        for i, o in enumerate(scene.objects):
            left, right, up, down = o.extents(height, width)
            x, y = tracks[:, i, 0], tracks[:, i, 1]
            assert x.min() >= left - 1e-9 and x.max() <= width - right + 1e-9
            assert y.min() >= up - 1e-9 and y.max() <= height - down + 1e-9
            # Elastic: per-frame speed along each axis is constant (smaller only on bounce frames).
            step = np.abs(np.diff(x))
            assert np.isclose(np.median(step), abs(o.vx) * width / fps)
            assert step.max() <= abs(o.vx) * width / fps + 1e-9
            # ... and, if fast enough to cross twice, it reaches both walls.
            if abs(o.vx) * width * 120 > 2 * width:
                assert x.min() < left + 2 and x.max() > width - right - 2


@pytest.mark.parametrize("shape", list(SHAPES))
def test_render_matches_tracks(shape):
    scene = Scene("black", (SceneObject("yellow", shape, 0.15, 0.3, 0.6, 0.3, -0.2),))
    video = scene.render(40, 64, 64)
    tracks = scene.object_tracks(40, 64, 64)
    assert video.shape == (40, 64, 64, 3) and video.dtype == np.uint8
    weight = video.astype(float).sum(-1)  # black background: brightness = coverage
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    cx = (weight * xs).sum((1, 2)) / weight.sum((1, 2))
    cy = (weight * ys).sum((1, 2)) / weight.sum((1, 2))
    assert np.abs(cx - tracks[:, 0, 0]).max() < 0.3
    assert np.abs(cy - tracks[:, 0, 1]).max() < 0.3
    area = (weight / weight.max()).sum((1, 2))
    expected = 64**2 * scene.objects[0].area
    assert np.allclose(area, expected, rtol=0.05)


def test_render_streams_segments():
    scene = Scene.sample(11, drift=True)
    full = scene.render(50, 32, 40, chunk=16)
    assert np.array_equal(scene.render(12, 32, 40, start=30), full[30:42])


def test_background_drift_is_slow_and_bounded():
    scene = Scene.sample(2, background="dark grey", drift=True)
    bg = scene.background_rgb(16 * 120)
    base = np.array(BACKGROUNDS["dark grey"])
    assert 0 < np.abs(bg - base).max() <= 6 + 1e-9
    assert np.abs(np.diff(bg, axis=0)).max() < 0.25


# -- world specs ---------------------------------------------------------------------------------
def test_v1_is_the_default_world():
    from packforcing.world import WORLD_V1

    for seed in range(20):
        assert Scene.sample(seed) == Scene.sample(seed, world=WORLD_V1) == Scene.sample(seed, world="v1")


def test_v2_scenes_stay_in_their_spec_and_are_balanced():
    from collections import Counter

    from packforcing.world import WORLD_V2

    scenes = [Scene.sample(seed, world="v2") for seed in range(1200)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2} and abs(counts[1] - counts[2]) < 120
    backgrounds = Counter(s.background for s in scenes)
    assert set(backgrounds) == set(WORLD_V2.backgrounds) and min(backgrounds.values()) > 240
    shapes = Counter(o.shape for s in scenes for o in s.objects)
    assert set(shapes) == set(WORLD_V2.shapes) and min(shapes.values()) > 520
    colours = Counter(o.colour for s in scenes for o in s.objects)
    assert set(colours) == set(WORLD_V2.colours)
    lo, hi = WORLD_V2.area_range
    for s in scenes:
        assert all(lo - 1e-9 <= o.area <= hi + 1e-9 for o in s.objects)


def test_v2_object_area_is_a_fraction_of_the_rendered_frame():
    from packforcing.world import WORLD_V2

    for seed in range(10):
        scene = Scene.sample(seed, num_objects=1, background="black", world="v2")
        frame = scene.render(1, WORLD_V2.height, WORLD_V2.width)[0]
        painted = (frame.astype(int).sum(-1) > 60).mean()
        assert painted == pytest.approx(scene.objects[0].area, abs=0.02)


def test_make_clip_uses_the_world_size():
    frames, caption, scene = make_clip(3, num_frames=5, world="v2")
    assert frames.shape == (5, 64, 64, 3) and caption == scene.caption()


def test_unknown_world_and_bad_spec_are_refused():
    from packforcing.world import WorldSpec

    with pytest.raises(ValueError, match="unknown tiny world"):
        Scene.sample(0, world="v9")
    with pytest.raises(ValueError, match="unknown or no colours"):
        WorldSpec("x", ("pink",), ("black",), ("circle",), 1, size_range=(0.1, 0.2))
    with pytest.raises(ValueError, match="exactly one"):
        WorldSpec("x", ("red",), ("black",), ("circle",), 1)


def test_prompts_outside_a_world_are_named():
    from packforcing.world import parse_caption
    from packforcing.world.spec import check_prompt_in_world

    check_prompt_in_world(*parse_caption("a red circle and a blue square bouncing over a navy background"), "v2")
    with pytest.raises(ValueError, match=r"colour\(s\) \['orange'\].*background 'maroon'"):
        check_prompt_in_world(*parse_caption("an orange circle bouncing over a maroon background"), "v2")
    with pytest.raises(ValueError, match="3 objects"):
        check_prompt_in_world(*parse_caption("a red circle, a blue square and a green triangle"), "v2")
    check_prompt_in_world(*parse_caption("an orange circle bouncing over a maroon background"), "v1")
