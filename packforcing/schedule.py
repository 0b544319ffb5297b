"""Prompt schedules: the prompt may change at chosen times of the video ("0 s: …; 20 s: …").

Text form (a file for the CLI's ``--prompt-schedule``, the Studio's table, or repeated
``--prompt "T:text"``), one entry per line, ``#`` starts a comment::

    0: a red circle bouncing over a black background
    20 s: a blue square bouncing over a white background

A switch takes effect at the first block that starts at or after its time (blocks are whole:
``Pipeline.block_seconds`` of video each), so times are rounded *up* to a block boundary; the
block it lands on is reported (`PromptSchedule.switch_blocks`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .inputs import check_prompt

MAX_PROMPTS = 16  # entries in one schedule (each prompt is encoded once per run)
_TIMED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*:\s*(.*)$", re.DOTALL)  # "20: …", "20 s: …", "2.5s: …"


@dataclass(frozen=True)
class PromptSchedule:
    """``entries``: (start second, prompt), strictly increasing times, the first at 0."""

    entries: tuple[tuple[float, str], ...]

    def __post_init__(self):
        if not self.entries:
            raise ValueError("the prompt schedule is empty")
        if len(self.entries) > MAX_PROMPTS:
            raise ValueError(f"the prompt schedule has {len(self.entries)} prompts (at most {MAX_PROMPTS})")
        previous = None
        for seconds, prompt in self.entries:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                    or seconds < 0:
                raise ValueError(f"prompt schedule times must be seconds >= 0, got {seconds!r}")
            if previous is not None and seconds <= previous:
                raise ValueError(f"prompt schedule times must increase: {seconds:g} s comes after {previous:g} s")
            check_prompt(prompt)
            previous = seconds
        if self.entries[0][0] != 0:
            raise ValueError(f"the prompt schedule must start at 0 s (its first prompt is at {self.entries[0][0]:g} s)")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def single(cls, prompt: str) -> PromptSchedule:
        return cls(((0.0, prompt),))

    @classmethod
    def from_items(cls, items: Iterable[str | tuple[float, str]]) -> PromptSchedule:
        """Entries as ``(seconds, prompt)`` pairs or ``"T: prompt"`` strings; an untimed string is
        the prompt at 0 s (so ``--prompt "a cat"`` alone stays a plain prompt)."""
        entries = []
        for item in items:
            if isinstance(item, str):
                match = _TIMED.match(item)
                item = (float(match.group(1)), match.group(2).strip()) if match else (0.0, item)
            seconds, prompt = item
            entries.append((float(seconds) if not isinstance(seconds, bool) else seconds, prompt))
        return cls(tuple(sorted(entries, key=lambda e: e[0] if isinstance(e[0], (int, float)) else -1)))

    @classmethod
    def parse(cls, text: str) -> PromptSchedule:
        """The text form (see the module docstring); every line must be ``T: prompt``."""
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not _TIMED.match(line):
                raise ValueError(f"prompt schedule line {number}: expected 'SECONDS: prompt', got {line[:60]!r}")
            items.append(line)
        return cls.from_items(items)

    # -- use ---------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return [prompt for _, prompt in self.entries]

    @property
    def first(self) -> str:
        return self.entries[0][1]

    def switch_blocks(self, block_starts: Sequence[float], video_seconds: float) -> list[int]:
        """Block index where each entry takes effect (the first 0): the first block starting at or after
        its time. ``block_starts`` [num_blocks] seconds of video before each block. Raises ValueError
        when a switch falls at or after the end, or two land on the same block."""
        blocks = [0]
        for seconds, _ in self.entries[1:]:
            block = next((b for b, start in enumerate(block_starts) if start >= seconds - 1e-9), None)
            if block is None:
                raise ValueError(f"the prompt at {seconds:g} s starts after the video ends ({video_seconds:g} s)")
            if block == blocks[-1]:
                raise ValueError(f"the prompts at {self.entries[len(blocks) - 1][0]:g} s and {seconds:g} s fall in "
                                 "the same block: space switches at least one block apart")
            blocks.append(block)
        return blocks

    def as_meta(self, blocks: Sequence[int]) -> list[dict]:
        """The trace's ``meta["prompts"]``: seconds, prompt and the block each entry starts at."""
        return [{"seconds": seconds, "prompt": prompt, "block": int(block)}
                for (seconds, prompt), block in zip(self.entries, blocks)]

    def to_text(self) -> str:
        return "\n".join(f"{seconds:g}: {prompt}" for seconds, prompt in self.entries)
