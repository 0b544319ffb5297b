"""Checks of user inputs shared by the library, the CLI and the Studio (prompt, seed)."""

from __future__ import annotations

import numpy as np

MAX_PROMPT_CHARS = 2000


def check_prompt(prompt) -> str:
    """Any script works; empty prompts and prompts over `MAX_PROMPT_CHARS` characters are refused."""
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is too long: {len(prompt)} characters (at most {MAX_PROMPT_CHARS})")
    return prompt


def check_seed(seed) -> int:
    """Seeds are integers in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        else:
            raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)
