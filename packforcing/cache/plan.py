"""Plans: what a pure policy decides for one block, as plain data (no tensors).

Positions are temporal RoPE starts in latent frames; slots index a region in blocks; token counts
are per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Held:
    """A cached block: source ``block``, ``slot`` in its region, ``pos`` its keys are rotated to now,
    ``commit_pos`` the position it was committed at (compressed backups keep that one)."""

    block: int
    slot: int
    pos: float
    commit_pos: float


@dataclass(frozen=True)
class Move:
    """Re-rotate the full-resolution keys of a held block in ``region``/``slot`` by ``delta`` frames."""

    region: str
    slot: int
    delta: float


@dataclass(frozen=True)
class CommitPlan:
    """Where the finished block goes. ``region``: "slot" | "sink" | "recent" | "archive";
    ``evicted``: the block it displaces (ring overwrite, or recent -> archive / middle);
    ``archive_slot``: the archive slot a compressed block is written to; ``dropped``: the archive
    block that FIFO drops to make room."""

    region: str
    slot: int
    evicted: Held | None = None
    archive_slot: int | None = None
    dropped: Held | None = None


@dataclass(frozen=True)
class MidSelection:
    """Block-level mid selection (PackForcing). ``candidates``: archive blocks, oldest first (``pos`` =
    commit position); ``count`` of them are attended, the i-th chosen at ``starts[i]``; for top-k
    scoring candidate j is placed at ``scoring_starts[j]`` (Fig. 2c-i). ``rule``: "topk" | "recency";
    ``scope``: "layer" (each layer scores at step 0) | "shared" (one selection before the block)."""

    candidates: tuple[Held, ...]
    count: int
    rule: str
    scope: str
    starts: tuple[float, ...]
    scoring_starts: tuple[float, ...]

    @property
    def scored(self) -> bool:
        return self.rule == "topk" and bool(self.candidates)


@dataclass(frozen=True)
class TokenSelection:
    """Token-level middle selection (deep_sink). ``incoming``: the block that just left recent (its
    tokens join the candidates), or None; ``kept_before`` / ``kept_after``: kept tokens per layer
    before / after this block's selection; the kept tokens' frames are packed into ``middle_span``
    positions starting at ``base`` (when ``rope_adjust``)."""

    incoming: Held | None
    kept_before: int
    kept_after: int
    base: float
    middle_span: int
    rope_adjust: bool


@dataclass(frozen=True)
class BlockPlan:
    """Everything decided about one block before it runs.

    ``attend_tokens``: keys each layer's block tokens attend (history + the block itself);
    ``occupancy``: tokens per layer in each partition while the block runs; ``held``: the
    full-resolution blocks attended, as (region, `Held`); ``compress``: the block's compressed
    tokens ride its commit pass."""

    block: int
    current_pos: float
    attend_tokens: int
    occupancy: dict[str, int]
    held: tuple[tuple[str, Held], ...]
    commit: CommitPlan
    moves: tuple[Move, ...] = ()
    compress: bool = False
    selection: MidSelection | TokenSelection | None = None
    extra: dict = field(default_factory=dict)
