"""Procedural scenes of the tiny world: bouncing coloured shapes over a plain background.

A `Scene` is a small frozen dataclass (pure data, JSON-friendly via `to_dict`). Everything is
resolution independent: sizes are fractions of min(H, W), positions are fractions of the
free range of the object's centre, velocities are frame widths/heights per second.
Sampled objects differ in area by >= AREA_RATIO and are drawn largest first, so none is ever
fully hidden (ground-truth prompt fidelity stays 1).
Motion is closed-form (triangle wave = elastic reflection off the walls), so frame t of a
2-minute video costs the same as frame 0 and `render(start=...)` can stream segments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .captions import format_caption, parse_caption
from .palette import BACKGROUNDS, COLOURS, SHAPES, colours_for, contrasts
from .spec import WORLD_V1, WorldSpec, world_spec

_S3 = math.sqrt(3.0) / 2.0
# Shape area in units of (size * min(H, W))^2; larger objects are drawn first.
SHAPE_AREA = {"circle": math.pi, "square": 4 * 0.8**2, "triangle": 3 * math.sqrt(3) / 4 * 1.2**2}
SIZE_RANGE = WORLD_V1.size_range  # object size of the v1 world, fraction of min(H, W)
AREA_RATIO = 1.5  # minimum area ratio between the objects of a sampled scene
SPEED_RANGE = (0.15, 0.45)  # frame fractions per second
DRIFT_RANGE = (2.0, 6.0)  # background brightness drift amplitude, RGB units
PERIOD_RANGE = (10.0, 30.0)  # its period, seconds (slope < 0.25 levels per frame at 16 fps)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class SceneObject:
    """One moving shape.

    size: fraction of min(H, W) (times SHAPES[shape] gives radius / half side / circumradius).
    x, y: initial centre as a fraction of the free range (0 = touching left/top wall,
    1 = touching right/bottom wall). vx, vy: velocity in frame widths/heights per second.
    """

    colour: str
    shape: str
    size: float
    x: float
    y: float
    vx: float
    vy: float

    def length_px(self, height: int, width: int) -> float:
        """Characteristic length (radius, half side or circumradius) in pixels."""
        return self.size * min(height, width) * SHAPES[self.shape]

    def extents(self, height: int, width: int) -> tuple[float, float, float, float]:
        """Distances (left, right, up, down) in pixels from the centre to the shape's edge."""
        r = self.length_px(height, width)
        if self.shape == "triangle":  # upward triangle around its centroid
            return (_S3 * r, _S3 * r, r, r / 2)
        return (r, r, r, r)

    @property
    def area(self) -> float:
        return SHAPE_AREA[self.shape] * self.size**2


def _bounce(p0: float, v: float, lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    """Position at times t of a point bouncing elastically in [lo, hi]; p0 in [0, 1] of it."""
    span = hi - lo
    if span <= 0:
        return np.full(t.shape, (lo + hi) / 2)
    q = np.mod(p0 * span + v * t, 2 * span)
    return lo + np.where(q <= span, q, 2 * span - q)


def _sample_sizes(rng: np.random.Generator, shapes: list[str], world: WorldSpec = WORLD_V1) -> list[float]:
    """Sizes whose shape areas differ pairwise by >= AREA_RATIO (rejection sampling), so the
    smaller object, drawn on top, can never hide a larger one. Sizes are uniform in
    ``world.size_range``, or areas uniform in ``world.area_range`` (fractions of a square frame)."""
    for _ in range(1000):
        if world.area_range is not None:
            fractions = rng.uniform(*world.area_range, size=len(shapes))
            sizes = np.sqrt(fractions / np.array([SHAPE_AREA[s] for s in shapes]))
        else:
            sizes = rng.uniform(*world.size_range, size=len(shapes))
        areas = np.sort([SHAPE_AREA[s] * z**2 for s, z in zip(shapes, sizes)])
        if np.all(areas[1:] >= AREA_RATIO * areas[:-1]):
            break
    return [float(z) for z in sizes]


def _sample_objects(rng: np.random.Generator, pairs: list[tuple[str, str]],
                    world: WorldSpec = WORLD_V1) -> tuple[SceneObject, ...]:
    """Objects with the given (colour, shape) pairs; size, position and velocity from rng."""
    sizes = _sample_sizes(rng, [s for _, s in pairs], world)
    objects = []
    for (colour, shape), size in zip(pairs, sizes):
        x, y = rng.uniform(0, 1, size=2)
        speed, angle = rng.uniform(*SPEED_RANGE), rng.uniform(0, 2 * math.pi)
        objects.append(SceneObject(colour, shape, size, float(x), float(y),
                                   float(speed * math.cos(angle)), float(speed * math.sin(angle))))
    return tuple(objects)


@dataclass(frozen=True)
class Scene:
    """A background (optionally with a slow sinusoidal brightness drift) and 1-3 objects.

    bg_drift: amplitude of the brightness drift in RGB units (0 = steady);
    bg_period: its period in seconds; bg_phase: its phase in radians.
    room_margin: room beyond the left and right edges, in frame widths, that objects bounce in
    (0 = the walls are the frame's edges; > 0 = objects leave the frame and come back, see
    `world.memory`); x positions are then fractions of the wider room's free range.
    """

    background: str
    objects: tuple[SceneObject, ...]
    bg_drift: float = 0.0
    bg_period: float = 8.0
    bg_phase: float = 0.0
    room_margin: float = 0.0

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {list(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1..3 objects, got {len(self.objects)}")
        if not 0.0 <= self.room_margin <= 10.0:
            raise ValueError(f"room_margin must be in [0, 10] frame widths, got {self.room_margin}")
        for o in self.objects:
            if o.colour not in COLOURS or o.shape not in SHAPES:
                raise ValueError(f"unknown object {o.colour!r} {o.shape!r}")
            if not contrasts(o.colour, self.background):
                raise ValueError(
                    f"{o.colour} is not distinguishable from the {self.background} background; "
                    f"use one of {colours_for(self.background)}"
                )

    # ----------------------------------------------------------------- construction
    @classmethod
    def sample(cls, rng=None, num_objects: int | None = None, background: str | None = None,
               drift: bool | None = None, world: WorldSpec | str = WORLD_V1) -> "Scene":
        """Random scene of `world` from `rng` (a Generator or an int seed). Background, object
        count (1..world.max_objects), colours (distinct) and shapes are each uniform;
        drift=None draws a drifting background with probability 1/2."""
        rng, world = _rng(rng), world_spec(world)
        if background is None:
            background = str(rng.choice(list(world.backgrounds)))
        n = int(num_objects) if num_objects is not None else int(rng.integers(1, world.max_objects + 1))
        allowed = [c for c in colours_for(background) if c in world.colours]
        colours = [str(c) for c in rng.choice(allowed, size=n, replace=False)]
        shapes = [str(s) for s in rng.choice(list(world.shapes), size=n)]
        objects = _sample_objects(rng, list(zip(colours, shapes)), world)
        amp, period = float(rng.uniform(*DRIFT_RANGE)), float(rng.uniform(*PERIOD_RANGE))
        phase = float(rng.uniform(0, 2 * math.pi))
        if drift is None:
            drift = bool(rng.random() < 0.5)
        return cls(background, objects, amp if drift else 0.0, period, phase)

    @classmethod
    def from_caption(cls, caption: str, seed=0, world: WorldSpec | str = WORLD_V1) -> "Scene":
        """Scene with the colours, shapes and background named in `caption`; sizes (those of
        `world`), positions and velocities (and the background, if not named) come from `seed`.
        No drift."""
        pairs, background = parse_caption(caption)
        rng, world = _rng(seed), world_spec(world)
        if background is None:
            ok = [b for b in world.backgrounds if all(contrasts(c, b) for c, _ in pairs)]
            background = str(rng.choice(ok))
        return cls(background, _sample_objects(rng, pairs, world))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(**{**d, "objects": tuple(SceneObject(**o) for o in d["objects"])})

    # ----------------------------------------------------------------- queries
    def caption(self) -> str:
        """Caption from the grammar in `captions.py`, objects in scene order."""
        return format_caption([(o.colour, o.shape) for o in self.objects], self.background)

    @property
    def draw_order(self) -> list[int]:
        """Object indices in drawing order: largest area first (stable), so a smaller object
        is never hidden behind a larger one."""
        return sorted(range(len(self.objects)), key=lambda i: -self.objects[i].area)

    def object_tracks(self, num_frames: int, height: int = 128, width: int = 128,
                      fps: float = 16, start: int = 0) -> np.ndarray:
        """Centre (centroid) of every object per frame: float64 [T, N, 2] as (x, y) pixels,
        pixel (i, j) covering [j, j+1) x [i, i+1). Frames start..start+T-1 at t = frame/fps."""
        t = (start + np.arange(num_frames)) / fps
        out = np.empty((num_frames, len(self.objects), 2))
        room = self.room_margin * width
        for i, o in enumerate(self.objects):
            left, right, up, down = o.extents(height, width)
            out[:, i, 0] = _bounce(o.x, o.vx * width, left - room, width - right + room, t)
            out[:, i, 1] = _bounce(o.y, o.vy * height, up, height - down, t)
        return out

    def background_rgb(self, num_frames: int, fps: float = 16, start: int = 0) -> np.ndarray:
        """Background colour per frame: float64 [T, 3] in 0..255."""
        base = np.asarray(BACKGROUNDS[self.background], dtype=np.float64)
        t = (start + np.arange(num_frames)) / fps
        offset = self.bg_drift * np.sin(2 * math.pi * t / self.bg_period + self.bg_phase)
        return np.clip(base[None, :] + offset[:, None], 0, 255)

    def render(self, num_frames: int, height: int = 128, width: int = 128, fps: float = 16,
               start: int = 0, chunk: int = 64) -> np.ndarray:
        """Frames start..start+T-1 as uint8 [T, H, W, 3]; anti-aliased edges (1-pixel ramp of
        the signed distance). Vectorised over `chunk` frames at a time to bound memory."""
        tracks = self.object_tracks(num_frames, height, width, fps, start)
        bg = self.background_rgb(num_frames, fps, start).astype(np.float32)
        ys = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
        xs = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        for c0 in range(0, num_frames, chunk):
            c1 = min(c0 + chunk, num_frames)
            img = np.repeat(bg[c0:c1, None, None, :], height * width, axis=1)
            img = img.reshape(c1 - c0, height, width, 3)
            for i in self.draw_order:
                o = self.objects[i]
                dx = xs - tracks[c0:c1, i, 0, None, None].astype(np.float32)
                dy = ys - tracks[c0:c1, i, 1, None, None].astype(np.float32)
                cov = np.clip(0.5 - _signed_distance(o.shape, dx, dy, o.length_px(height, width)), 0, 1)
                img += cov[..., None] * (np.asarray(COLOURS[o.colour], np.float32) - img)
            out[c0:c1] = np.clip(np.rint(img), 0, 255)
        return out


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) from the shape centred at the origin."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    # Upward equilateral triangle, centroid at the origin, circumradius r (y grows downwards).
    side = _S3 * np.abs(dx) - 0.5 * dy - r / 2
    return np.maximum(dy - r / 2, side)


def make_clip(seed: int, num_frames: int = 77, height: int | None = None, width: int | None = None,
              fps: float = 16, world: WorldSpec | str = WORLD_V1) -> tuple[np.ndarray, str, Scene]:
    """Training clip of `world` for `seed`: (frames uint8 [T, H, W, 3], caption, scene). 77 = 4*20-3
    pixel frames, i.e. 20 latent frames, about 5 s at 16 fps; H, W default to the world's size.
    Same seed -> same clip."""
    world = world_spec(world)
    scene = Scene.sample(seed, world=world)
    return scene.render(num_frames, height or world.height, width or world.width, fps), scene.caption(), scene
