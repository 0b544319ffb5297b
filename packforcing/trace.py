"""Instrumentation: a cheap recorder the sampler and cache policies report to.

Recording appends plain tuples to Python lists; tidy pandas DataFrames are built lazily by
:meth:`TraceRecorder.tables` and cached until the next append. The tables and their columns
are `packforcing.trace_schema` (docs/trace.md).

Files: `packforcing.trace_io` (one .parquet, .csv or .json file with all tables plus ``meta``).
``meta`` is stored as JSON: tuples come back as lists, dataclasses as dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .trace_io import FORMAT, VERSION, TraceFormatError, load_tables, save_tables  # noqa: F401  (re-exported)
from .trace_schema import PARTITIONS, PHASES, SCHEMA, TABLES  # noqa: F401  (re-exported)

#: tables recorded as one call per (block, layer) with per-row lists, expanded when built
_COLUMNAR = frozenset({"scores", "mid_attention"})


def empty_tables() -> dict[str, pd.DataFrame]:
    """Empty frames with the stable columns and dtypes of every table."""
    return {name: _frame([], name) for name in TABLES}


def _frame(rows: list[tuple], name: str) -> pd.DataFrame:
    cols = SCHEMA[name]
    df = pd.DataFrame.from_records(rows, columns=list(cols)) if rows else pd.DataFrame(
        {c: pd.Series([], dtype=object) for c in cols})
    return df.astype(cols)


def _aslist(x) -> list:
    """A list copy of a list, tuple, numpy array or torch tensor (Python scalars)."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return x.tolist() if hasattr(x, "tolist") else list(x)


class TraceRecorder:
    """Records cache occupancy, mid scores, RoPE positions and timings of one run."""

    enabled = True

    def __init__(self, meta: Mapping | None = None):
        self.meta: dict = dict(meta or {})
        self._rows: dict[str, list] = {name: [] for name in TABLES}
        self._cache: dict[str, tuple[int, pd.DataFrame]] = {}
        self._handed: dict[str, int] = dict.fromkeys(TABLES, 0)  # rows already given out by `new_rows`
        # bound appends: the hot path is one attribute lookup and one call
        self._occ, self._mid, self._pos, self._time, self._blk, self._att, self._sw = (
            self._rows[name].append for name in TABLES)

    # ---- recording (hot path: one tuple append each) ------------------------------------
    def occupancy(self, block: int, step: int, layer: int, partition: str, tokens: int,
                  bytes: int) -> None:
        """Tokens and bytes held by ``partition`` at (block, denoising step, layer)."""
        self._occ((block, step, layer, partition, tokens, bytes))

    def mid_scores(self, block: int, layer: int, candidates, frame_starts, frame_ends, scores,
                   selected) -> None:
        """Scores of the mid candidates (source block indices) considered at ``block``."""
        cols = (_aslist(candidates), _aslist(frame_starts), _aslist(frame_ends),
                _aslist(scores), _aslist(selected))
        if len({len(c) for c in cols}) > 1:
            raise ValueError(f"mid_scores: lists of unequal length {[len(c) for c in cols]}")
        self._mid((block, layer) + cols)

    def positions(self, block: int, layer: int, region: str, source_block: int,
                  frame_start: int, frame_end: int, pos_before: float, pos_after: float) -> None:
        """Temporal RoPE start position of a cached block before / after adjustment."""
        self._pos(
            (block, layer, region, source_block, frame_start, frame_end, pos_before, pos_after))

    def phase(self, block: int, phase: str, seconds: float) -> None:
        """Wall ``seconds`` spent in ``phase`` during ``block`` (one row per call)."""
        self._time((block, phase, seconds))

    def block_done(self, block: int, seconds: float, latent_frames: int, video_seconds: float,
                   kv_tokens: int, kv_bytes: int, peak_memory_bytes: int | None = None) -> None:
        """A finished block: wall seconds, frames/seconds of video added, KV size after it."""
        self._blk((block, seconds, latent_frames, video_seconds, kv_tokens,
                                     kv_bytes, peak_memory_bytes))

    def mid_attention(self, block: int, layer: int, source_blocks, tokens, token_t, token_y, token_x,
                      masses) -> None:
        """Attention mass on each token of the selected mid blocks (one call per layer)."""
        cols = tuple(_aslist(c) for c in (source_blocks, tokens, token_t, token_y, token_x, masses))
        if len({len(c) for c in cols}) > 1:
            raise ValueError(f"mid_attention: lists of unequal length {[len(c) for c in cols]}")
        self._att((block, layer) + cols)

    def prompt_switch(self, block: int, video_seconds: float, prompt_index: int, mode: str,
                      recached_blocks: int, seconds: float) -> None:
        """The prompt changed at the start of ``block`` (see the ``switches`` table)."""
        self._sw((block, video_seconds, prompt_index, mode, recached_blocks, seconds))

    # ---- tables -------------------------------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        """Tidy DataFrames keyed by table name (built lazily, cached until the next append).

        Safe to call from another thread while recording: each table is a snapshot.
        """
        out = {}
        for name in TABLES:
            rows = self._rows[name][:]  # snapshot; list appends are atomic
            cached = self._cache.get(name)
            if cached is None or cached[0] != len(rows):
                cached = (len(rows), _build(rows, name))
                self._cache[name] = cached
            out[name] = cached[1].copy(deep=False)  # copy-on-write: callers can't touch the cache
        return out

    def new_rows(self) -> dict[str, pd.DataFrame]:
        """Tables of only the rows recorded since the previous call (the first call: all rows).

        A live view appends these per block instead of rebuilding every table from all rows
        (quadratic over a run). Rows of one block arrive together (the sampler records after the
        block), so the per-(block, layer) ``rank`` of ``scores`` is complete in each delta."""
        out = {}
        for name in TABLES:
            rows = self._rows[name]
            end = len(rows)
            out[name] = _build(rows[self._handed[name] : end], name)
            self._handed[name] = end
        return out

    def summary(self) -> dict:
        """Headline numbers of the run (see :func:`summarize`)."""
        return summarize(self.tables(), self.meta)

    def clear(self, meta: bool = False) -> None:
        """Drop all recorded rows (and ``meta`` too when ``meta=True``)."""
        for rows in self._rows.values():
            rows.clear()
        self._cache.clear()
        self._handed = dict.fromkeys(TABLES, 0)
        if meta:
            self.meta = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self._rows.items())
        return f"{type(self).__name__}({counts})"

    # ---- persistence --------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write all tables and ``meta`` to one .parquet, .csv or .json file."""
        return save_tables(self.tables(), path, self.meta)

    @classmethod
    def load(cls, path) -> TraceRecorder:
        """Read a file written by :meth:`save`; further recording appends to it."""
        tables, meta = load_tables(path)
        rec = cls(meta)
        for name, df in tables.items():
            if name in _COLUMNAR:
                df = df.drop(columns="rank") if name == "scores" else df
                rec._rows[name][:] = [r[:2] + tuple([v] for v in r[2:])
                                      for r in df.itertuples(index=False, name=None)]
            elif name == "blocks":
                rec._rows[name][:] = [r[:-1] + (None if pd.isna(r[-1]) else int(r[-1]),)
                                   for r in df.itertuples(index=False, name=None)]
            else:
                rec._rows[name][:] = list(df.itertuples(index=False, name=None))
        return rec


def _build(rows: list[tuple], name: str) -> pd.DataFrame:
    return _columnar_frame(rows, name) if name in _COLUMNAR else _frame(rows, name)


def _columnar_frame(calls: list[tuple], name: str) -> pd.DataFrame:
    """Expand per-call lists into one row each (``scores``: and add ``rank``)."""
    schema = SCHEMA[name]
    cols = list(schema)[:-1] if name == "scores" else list(schema)
    if not calls:
        return _frame([], name)
    n = [len(c[2]) for c in calls]
    data = {"block": np.repeat(np.array([c[0] for c in calls], dtype=np.int64), n),
            "layer": np.repeat(np.array([c[1] for c in calls], dtype=np.int64), n)}
    for i, col in enumerate(cols[2:], start=2):
        dtype = {"float64": np.float64, "bool": np.bool_}.get(schema[col], np.int64)
        data[col] = np.fromiter(chain.from_iterable(c[i] for c in calls), dtype=dtype, count=sum(n))
    df = pd.DataFrame(data, columns=cols)
    if name != "scores":
        return df.astype(schema)
    rank = df.groupby(["block", "layer"])["score"].rank(method="first", ascending=False,
                                                         na_option="bottom")
    df["rank"] = rank.fillna(0)
    return df.astype(SCHEMA["scores"])


# ---- summary ----------------------------------------------------------------------------
def summarize(tables: Mapping[str, pd.DataFrame], meta: Mapping | None = None) -> dict:
    """Headline numbers of one run as plain Python values (None where undefined).

    Seconds are wall time, ``*_mb`` are bytes / 2**20, ``latency_slope_s_per_block`` is the
    least-squares slope of block seconds over block index (≈ 0 when generation is flat),
    ``peak_context_tokens`` / ``peak_stored_tokens`` come from the occupancy table (max over
    block, step and layer of the attended / stored partitions).
    """
    meta = dict(meta or {})
    b = tables.get("blocks")
    b = b if b is not None and len(b) else None
    out: dict[str, Any] = {"policy": meta.get("policy"), "blocks": 0 if b is None else len(b)}

    def num(x, cast=float):
        return None if x is None or pd.isna(x) else cast(x)

    if b is not None:
        total = float(b["seconds"].sum())
        video = float(b["video_seconds"].sum())
        slope = np.polyfit(b["block"].astype(float), b["seconds"].astype(float), 1)[0] \
            if b["block"].nunique() > 1 else None
        peak_mem = b["peak_memory_bytes"].max() if b["peak_memory_bytes"].notna().any() else None
        out.update(
            latent_frames=int(b["latent_frames"].sum()), video_seconds=video,
            total_seconds=total, mean_block_seconds=float(b["seconds"].mean()),
            max_block_seconds=float(b["seconds"].max()),
            latency_slope_s_per_block=num(slope), realtime_factor=video / total if total else None,
            peak_kv_tokens=int(b["kv_tokens"].max()), peak_kv_bytes=int(b["kv_bytes"].max()),
            peak_kv_mb=float(b["kv_bytes"].max()) / 2**20,
            final_kv_tokens=int(b["kv_tokens"].iloc[-1]),
            final_kv_bytes=int(b["kv_bytes"].iloc[-1]),
            peak_memory_bytes=num(peak_mem, int))
    else:
        out.update(dict.fromkeys(
            ["latent_frames", "video_seconds", "total_seconds", "mean_block_seconds",
             "max_block_seconds", "latency_slope_s_per_block", "realtime_factor", "peak_kv_tokens",
             "peak_kv_bytes", "peak_kv_mb", "final_kv_tokens", "final_kv_bytes",
             "peak_memory_bytes"]))
    occ = tables.get("occupancy")
    for key, parts in (("peak_context_tokens", ("sink", "mid_selected", "recent", "current")),
                       ("peak_stored_tokens", ("sink", "mid_archive", "recent", "current"))):
        sel = occ[occ["partition"].isin(parts)] if occ is not None and len(occ) else None
        out[key] = (int(sel.groupby(["block", "step", "layer"])["tokens"].sum().max())
                    if sel is not None and len(sel) else None)
    t = tables.get("timing")
    if t is not None and len(t):
        for phase, secs in t.groupby("phase")["seconds"].sum().items():
            out[f"{phase}_seconds"] = float(secs)
    return out


class NullRecorder:
    """Recorder that records nothing (``enabled = False``); same methods as TraceRecorder."""

    enabled = False

    def __init__(self, meta: Mapping | None = None):
        self.meta: dict = dict(meta or {})

    def occupancy(self, block, step, layer, partition, tokens, bytes) -> None:
        pass

    def mid_scores(self, block, layer, candidates, frame_starts, frame_ends, scores,
                   selected) -> None:
        pass

    def positions(self, block, layer, region, source_block, frame_start, frame_end, pos_before,
                  pos_after) -> None:
        pass

    def phase(self, block, phase, seconds) -> None:
        pass

    def block_done(self, block, seconds, latent_frames, video_seconds, kv_tokens, kv_bytes,
                   peak_memory_bytes=None) -> None:
        pass

    def mid_attention(self, block, layer, source_blocks, tokens, token_t, token_y, token_x, masses) -> None:
        pass

    def prompt_switch(self, block, video_seconds, prompt_index, mode, recached_blocks, seconds) -> None:
        pass

    def tables(self) -> dict[str, pd.DataFrame]:
        """Empty frames with the same columns and dtypes as a TraceRecorder's."""
        return empty_tables()

    def summary(self) -> dict:
        return summarize(empty_tables(), self.meta)

    def clear(self, meta: bool = False) -> None:
        if meta:
            self.meta = {}

    def save(self, path) -> Path:
        """Writes an empty trace (so a download link still works)."""
        return save_tables(empty_tables(), path, self.meta)

    @classmethod
    def load(cls, path) -> TraceRecorder:
        """Loading yields a real :class:`TraceRecorder` (a NullRecorder holds no data)."""
        return TraceRecorder.load(path)

    def __repr__(self) -> str:
        return "NullRecorder()"
