"""Named colours, backgrounds and shapes of the tiny world.

All colours are RGB triples in 0..255. An object colour may only be used on a background
at least `MIN_CONTRAST` RGB units away (Euclidean distance), so colour masks can always
tell objects from the background (in practice this only forbids white on white).
"""

from __future__ import annotations

import numpy as np

# Object colours. Neighbouring hues (red/orange/yellow) are >= ~105 RGB units apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 25, 25),
    "orange": (255, 125, 0),
    "yellow": (245, 235, 35),
    "green": (40, 210, 60),
    "cyan": (30, 215, 225),
    "blue": (40, 90, 245),
    "magenta": (220, 40, 220),
    "white": (245, 245, 245),
}

# Background colours (names may be two words).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (60, 60, 60),
    "navy": (15, 20, 85),
    "dark green": (15, 65, 30),
    "maroon": (95, 15, 25),
    "white": (240, 240, 240),
}

# Shape name -> characteristic length in units of the object's `size` (radius for a
# circle, half side for a square, circumradius for an upward equilateral triangle),
# chosen so the three shapes have comparable areas (3.14, 2.56, 1.87 size^2).
SHAPES: dict[str, float] = {
    "circle": 1.0,
    "square": 0.8,
    "triangle": 1.2,
}

MIN_CONTRAST = 120.0

# Accepted spellings in user prompts -> canonical vocabulary word.
SYNONYMS: dict[str, str] = {"gray": "grey"}


def colour_distance(a, b) -> float:
    """Euclidean distance between two RGB triples, in RGB units (0..441)."""
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def contrasts(colour: str, background: str) -> bool:
    """True if object `colour` is distinguishable from `background` (>= MIN_CONTRAST)."""
    return colour_distance(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def colours_for(background: str) -> list[str]:
    """Object colours allowed on `background`, in palette order."""
    return [c for c in COLOURS if contrasts(c, background)]
