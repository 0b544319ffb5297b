"""The memory test scenes: something must be remembered for longer than the recent window.

One object of the world's palette bounces left and right in a room wider than the frame
(`Scene.room_margin`): it is out of view for ``gap_s`` seconds at each side, then comes back. The
scene starts with the object out of view, so it first appears ``gap_s / 2`` seconds in — after the
sink (the first 2 blocks = 2 s of the embedded model) — and the caption names its shape and the
background but **not its colour**: "a square bouncing over a black background". Whatever colour a
model gives the object when it first draws it, it can only keep after an absence by attending to
history older than the absence, i.e. to mid blocks (PackForcing's top-k compressed context); a
`window` cache no longer holds the object and `sink_window`'s sink never showed it.

Timeline of a scene (gap g, crossing time c = (1 + object width) / speed): out 0..g/2, in view
for c, out for g, in view for c, ... (`visible_intervals`). `analysis.memory` scores videos of it.
"""

from __future__ import annotations

import numpy as np

from .palette import colours_for
from .scenes import Scene, SceneObject, _rng, _sample_sizes
from .spec import WORLD_V2, WorldSpec, world_spec

GAP_RANGE_S = (5.0, 8.0)  # seconds out of view per absence
SPEED_RANGE = (0.2, 0.35)  # horizontal speed, frame widths per second
VERTICAL_SPEED = 0.08  # at most, frame heights per second


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def memory_caption(scene: Scene) -> str:
    """The caption without colours: "a square bouncing over a black background" (caption
    vocabulary only, so any tiny-world text encoder can read it)."""
    shapes = [o.shape for o in scene.objects]
    listed = " and ".join(f"{_article(s)} {s}" for s in shapes)
    return f"{listed} bouncing over {_article(scene.background)} {scene.background} background"


def memory_scene(seed, world: WorldSpec | str = WORLD_V2, gap_s: float | None = None) -> Scene:
    """A memory test scene of `world` for `seed` (an int or a Generator): background, colour,
    shape and size uniform as in `Scene.sample` (one object); ``gap_s`` (seconds out of view per
    absence) uniform in `GAP_RANGE_S` unless given."""
    rng, world = _rng(seed), world_spec(world)
    background = str(rng.choice(list(world.backgrounds)))
    colour = str(rng.choice([c for c in colours_for(background) if c in world.colours]))
    shape = str(rng.choice(list(world.shapes)))
    size = _sample_sizes(rng, [shape], world)[0]
    gap = float(rng.uniform(*GAP_RANGE_S)) if gap_s is None else float(gap_s)
    speed = float(rng.uniform(*SPEED_RANGE))
    rightwards = bool(rng.random() < 0.5)
    probe = SceneObject(colour, shape, size, 0.0, 0.0, 0.0, 0.0)
    left, right, _, _ = probe.extents(world.height, world.width)
    # out of view at one side for 2 * (margin - object width) / speed = gap seconds
    margin = gap * speed / 2 + (left + right) / world.width
    obj = SceneObject(colour, shape, size, x=0.0 if rightwards else 1.0, y=float(rng.uniform(0, 1)),
                      vx=speed if rightwards else -speed, vy=float(rng.uniform(-VERTICAL_SPEED, VERTICAL_SPEED)))
    return Scene(background, (obj,), room_margin=float(margin))


def visible(scene: Scene, num_frames: int, height: int, width: int, fps: float = 16, start: int = 0) -> np.ndarray:
    """bool [T, N]: any part of object n is inside the frame at frame start + t."""
    tracks = scene.object_tracks(num_frames, height, width, fps, start)
    out = np.empty(tracks.shape[:2], dtype=bool)
    for i, o in enumerate(scene.objects):
        left, right, _, _ = o.extents(height, width)
        out[:, i] = (tracks[:, i, 0] + right > 0) & (tracks[:, i, 0] - left < width)
    return out


def visible_intervals(scene: Scene, seconds: float, height: int, width: int, fps: float = 16) -> list[tuple[float, float]]:
    """[(first, last) seconds] of the frames in which the (first) object is in view."""
    shown = visible(scene, int(round(seconds * fps)), height, width, fps)[:, 0]
    edges = np.flatnonzero(np.diff(np.r_[False, shown, False].astype(int)))
    return [(float(a / fps), float((b - 1) / fps)) for a, b in zip(edges[0::2], edges[1::2])]


TRAINING_GAP_S = (1.0, 2.5)  # absences of training clips: short enough for a 5 s clip to hold a return
ENTRANCE_GAP_S = (3.0, 6.0)  # entrance clips: the object first appears gap / 2 = 1.5-3 s in


def training_clip(rng, world: WorldSpec | str = WORLD_V2, gap_range_s: tuple[float, float] = TRAINING_GAP_S,
                  fps: float = 16, entrance_fraction: float = 0.0) -> tuple[Scene, int]:
    """(scene, first frame) of a memory training clip: a memory scene with a short absence, starting
    0.5-1.5 s before the object first leaves, so a 5 s clip shows it, its absence and its return.
    Tests use longer absences (`GAP_RANGE_S`): remembering across them is what the cache must do.

    With probability ``entrance_fraction`` the clip is instead an *entrance clip*: a scene whose
    absences last `ENTRANCE_GAP_S`, from its first frame, so the frame is empty for the first
    1.5-3 s and then the object comes in, as in a test scene (whose object first appears after the
    sink). Without entrance clips no training clip ever starts empty, and a long fine-tune learns
    that an empty start stays empty (measured: docs/tiny_world.md, round 3). At 0 the draws are
    exactly those of the function before the option existed."""
    rng, world = _rng(rng), world_spec(world)
    if entrance_fraction > 0 and rng.random() < entrance_fraction:
        return memory_scene(rng, world, gap_s=float(rng.uniform(*ENTRANCE_GAP_S))), 0
    scene = memory_scene(rng, world, gap_s=float(rng.uniform(*gap_range_s)))
    first_exit = visible_intervals(scene, 30.0, world.height, world.width, fps)[0][1]
    start = max(0.0, first_exit - float(rng.uniform(0.5, 1.5)))
    return scene, int(round(start * fps))


def parse_memory_caption(text: str) -> tuple[list[str], str | None]:
    """([shape, ...], background or None) of a colour-free caption ("a square bouncing over a black
    background"); ValueError if it names a colour or is not of that form (`memory_caption`'s)."""
    from .captions import tokenize
    from .palette import BACKGROUNDS, SHAPES

    tokens = tokenize(text)
    cut = next((i for i, t in enumerate(tokens) if t in ("bouncing", "over")), len(tokens))
    words = [t for t in tokens[:cut] if t not in ("a", "an", "and", ",")]
    if not words or len(words) > 2 or any(w not in SHAPES for w in words):
        raise ValueError(f"not a colour-free caption ('a <shape> bouncing over a <background> background'): {text!r}")
    rest = [t for t in tokens[cut:] if t not in ("bouncing", "over", "a", "an", ",", "background")]
    background = " ".join(rest) or None
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} in {text!r}")
    return words, background
