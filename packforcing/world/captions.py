"""The caption grammar of the tiny world: formatting, tokenising and parsing.

Grammar (lower case, single spaces)::

    caption    := objects " bouncing over " article " " background " background"
    objects    := object | object " and " object | object ", " object " and " object
    object     := article " " colour " " shape
    article    := "a" | "an"            ("an" before a vowel, e.g. "an orange circle")

Example: "a red circle, a blue square and a green triangle bouncing over a navy background".
The parser is lenient: case, extra punctuation, "gray" and a missing background part
("a red circle bouncing") are accepted; any other unknown word raises ValueError.
"""

from __future__ import annotations

import re

from .palette import BACKGROUNDS, COLOURS, SHAPES, SYNONYMS

FUNCTION_WORDS = ("a", "an", "and", "bouncing", "over", "background")
PUNCTUATION = (",",)
MAX_OBJECTS = 3


def vocabulary(include_punctuation: bool = False) -> list[str]:
    """All words that captions use (sorted); with `include_punctuation`, also ","."""
    words = set(FUNCTION_WORDS) | set(COLOURS) | set(SHAPES)
    for name in BACKGROUNDS:
        words.update(name.split())
    out = sorted(words)
    return out + list(PUNCTUATION) if include_punctuation else out


def tokenize(text: str) -> list[str]:
    """Lower-case word and comma tokens of `text`; other punctuation is dropped."""
    return [SYNONYMS.get(t, t) for t in re.findall(r"[a-z]+|,", text.lower())]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_caption(objects: list[tuple[str, str]], background: str) -> str:
    """Caption for `objects` ([(colour, shape), ...], 1-3 of them) over `background`."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a caption needs 1..{MAX_OBJECTS} objects, got {len(objects)}")
    phrases = [f"{_article(c)} {c} {s}" for c, s in objects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} bouncing over {_article(background)} {background} background"


def _vocab_help() -> str:
    return (
        f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; "
        f"backgrounds: {', '.join(BACKGROUNDS)}. "
        "Example: 'a red circle and a blue square bouncing over a dark grey background'."
    )


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Parse a caption into ([(colour, shape), ...], background or None).

    Raises ValueError, listing the vocabulary, on unknown words or a malformed phrase.
    """
    tokens = tokenize(text)
    known = set(vocabulary(include_punctuation=True))
    unknown = sorted({t for t in tokens if t not in known})
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in caption {text!r}. Known {_vocab_help()}")
    cut = next((i for i, t in enumerate(tokens) if t in ("bouncing", "over")), len(tokens))
    left, right = tokens[:cut], tokens[cut:]
    words = [t for t in left if t not in ("a", "an", "and", ",")]
    if not words or len(words) % 2:
        raise ValueError(f"expected '<colour> <shape>' phrases in {text!r}. Known {_vocab_help()}")
    objects = list(zip(words[0::2], words[1::2]))
    for colour, shape in objects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"'{colour} {shape}' is not '<colour> <shape>' in {text!r}. Known {_vocab_help()}"
            )
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects, got {len(objects)} in {text!r}")
    background = None
    if "over" in right:
        rest = [t for t in right[right.index("over") + 1 :] if t not in ("a", "an", ",")]
        if rest and rest[-1] == "background":
            rest = rest[:-1]
        background = " ".join(rest)
        if background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {background!r} in {text!r}. Known {_vocab_help()}"
            )
    return objects, background
