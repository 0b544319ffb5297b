"""The embedded default model: the trained tiny world in ``assets/tiny-world`` when it is there
(see `packforcing.tiny_world`), else `Pipeline.tiny_random` (random weights, noise videos).

Lives apart from `packforcing.pipeline` so that the pipeline does not import the tiny world (which
imports the pipeline): the dependency runs one way.
"""

from __future__ import annotations

from .pipeline import Pipeline
from .tiny_world import has_tiny_world, load_tiny_world


def default_pipeline() -> Pipeline:
    return load_tiny_world() if has_tiny_world() else Pipeline.tiny_random()
