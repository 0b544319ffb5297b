"""Which tiny world a model was trained on: its palette subset, object sizes and frame size.

A `WorldSpec` is pure data. `WORLD_V1` is the world of the first embedded model (8 colours,
6 backgrounds, 1-3 small objects, 128x128); `WORLD_V2` is the world redesigned so a CPU can
learn it (docs/tiny_world.md): fewer, well separated colours, 1-2 *large* objects (8-22 % of the
frame each, so an object is a real share of every loss), 64x64 pixels, and a balanced caption
sampler (background, object count, colours and shapes each uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

from .palette import BACKGROUNDS, COLOURS, SHAPES


@dataclass(frozen=True)
class WorldSpec:
    """colours / backgrounds / shapes: vocabulary subsets (names in `palette`).
    max_objects: objects per scene (1..max). size_range: object `size` (fraction of min(H, W)), or
    area_range: object area as a fraction of the frame (then `size` follows from the shape).
    height, width: pixels of the world's clips."""

    name: str
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    shapes: tuple[str, ...]
    max_objects: int
    size_range: tuple[float, float] | None = None
    area_range: tuple[float, float] | None = None
    height: int = 128
    width: int = 128

    def __post_init__(self):
        for kind, names, known in (("colour", self.colours, COLOURS), ("background", self.backgrounds, BACKGROUNDS),
                                   ("shape", self.shapes, SHAPES)):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(f"world {self.name!r}: unknown or no {kind}s {unknown}")
        if (self.size_range is None) == (self.area_range is None):
            raise ValueError(f"world {self.name!r}: give exactly one of size_range and area_range")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"world {self.name!r}: max_objects must be 1..3")


WORLD_V1 = WorldSpec(
    name="v1", colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS), shapes=tuple(SHAPES),
    max_objects=3, size_range=(0.08, 0.16), height=128, width=128,
)

WORLD_V2 = WorldSpec(
    name="v2", colours=("red", "yellow", "green", "blue", "white"),
    backgrounds=("black", "dark grey", "navy", "white"), shapes=tuple(SHAPES),
    max_objects=2, area_range=(0.08, 0.22), height=64, width=64,
)

WORLDS = {w.name: w for w in (WORLD_V1, WORLD_V2)}


def world_spec(name_or_spec) -> WorldSpec:
    """A `WorldSpec` from its name ("v1", "v2") or itself."""
    if isinstance(name_or_spec, WorldSpec):
        return name_or_spec
    if name_or_spec not in WORLDS:
        raise ValueError(f"unknown tiny world {name_or_spec!r}; known: {sorted(WORLDS)}")
    return WORLDS[name_or_spec]


def check_prompt_in_world(objects: list[tuple[str, str]], background: str | None, world) -> None:
    """ValueError naming what a parsed caption asks for that `world` never showed its model."""
    world = world_spec(world)
    problems = []
    colours = sorted({c for c, _ in objects} - set(world.colours))
    if colours:
        problems.append(f"colour(s) {colours} (it knows {', '.join(world.colours)})")
    if background is not None and background not in world.backgrounds:
        problems.append(f"background {background!r} (it knows {', '.join(world.backgrounds)})")
    if len(objects) > world.max_objects:
        problems.append(f"{len(objects)} objects (at most {world.max_objects})")
    if problems:
        raise ValueError(f"this model was trained on tiny world {world.name}, which has no " + "; no ".join(problems))
