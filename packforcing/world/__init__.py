"""The tiny world: seeded procedural clips of bouncing shapes, with captions (DESIGN.md §7)."""

from .captions import format_caption, parse_caption, tokenize, vocabulary
from .palette import BACKGROUNDS, COLOURS, MIN_CONTRAST, SHAPES, colours_for, contrasts
from .scenes import Scene, SceneObject, make_clip
from .spec import WORLD_V1, WORLD_V2, WORLDS, WorldSpec, world_spec

__all__ = [
    "BACKGROUNDS", "COLOURS", "MIN_CONTRAST", "SHAPES", "Scene", "SceneObject",
    "colours_for", "contrasts", "format_caption", "make_clip", "parse_caption",
    "tokenize", "vocabulary", "WORLD_V1", "WORLD_V2", "WORLDS", "WorldSpec", "world_spec",
]
