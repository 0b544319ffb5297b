"""Instrumentation: a cheap recorder the sampler and cache policies report to.

Recording appends plain tuples to Python lists; tidy pandas DataFrames are built lazily by
:meth:`TraceRecorder.tables` and cached until the next append. Tables and columns (units):

- ``occupancy``  block, step, layer, partition, tokens, bytes — KV tokens/bytes held per
  partition at one denoising step (``step`` = 0..S-1, ``S`` = the clean commit pass).
  Convention: ``mid_archive`` counts every compressed mid block held (stored), and
  ``mid_selected`` the top-k subset of it attended this block, so
  stored = sink + mid_archive + recent + current, attended = sink + mid_selected + recent + current.
- ``scores``     block, layer, candidate, frame_start, frame_end, score, selected, rank —
  one row per mid candidate; frames are latent frames [start, end); rank is 1-based by
  descending score within (block, layer), ties broken by report order.
- ``positions``  block, layer, region, source_block, frame_start, frame_end, pos_before,
  pos_after — temporal RoPE start position of each cached block before/after adjustment.
- ``timing``     block, phase, seconds — wall seconds, one row per report (not summed).
- ``blocks``     block, seconds, latent_frames (added by the block), video_seconds, kv_tokens, kv_bytes,
  peak_memory_bytes — ``seconds`` = wall time of the block, ``video_seconds`` = seconds of
  video the block adds, ``peak_memory_bytes`` may be missing (nullable ``Int64``).

A single file holds all tables plus ``meta`` (.parquet, .csv: long format with a ``table``
column and a ``meta`` row; .json: ``{"meta": ..., "tables": {name: {column: [values]}}}``).
``meta`` is stored as JSON: tuples come back as lists, dataclasses as dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PARTITIONS = ("sink", "mid_archive", "mid_selected", "recent", "current")
PHASES = ("denoise", "commit", "compress", "select", "rope", "decode")
FORMAT = "packforcing-trace"
VERSION = 1

#: column -> dtype for every table (the contract of :meth:`TraceRecorder.tables`).
SCHEMA: dict[str, dict[str, str]] = {
    "occupancy": {"block": "int64", "step": "int64", "layer": "int64", "partition": "str",
                  "tokens": "int64", "bytes": "int64"},
    "scores": {"block": "int64", "layer": "int64", "candidate": "int64", "frame_start": "int64",
               "frame_end": "int64", "score": "float64", "selected": "bool", "rank": "int64"},
    "positions": {"block": "int64", "layer": "int64", "region": "str", "source_block": "int64",
                  "frame_start": "int64", "frame_end": "int64", "pos_before": "float64",
                  "pos_after": "float64"},
    "timing": {"block": "int64", "phase": "str", "seconds": "float64"},
    "blocks": {"block": "int64", "seconds": "float64", "latent_frames": "int64",
               "video_seconds": "float64", "kv_tokens": "int64", "kv_bytes": "int64",
               "peak_memory_bytes": "Int64"},
}
TABLES = tuple(SCHEMA)
_NULLABLE = {"int64": "Int64", "Int64": "Int64", "bool": "boolean", "float64": "float64",
             "str": "str"}


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


def _json_default(o: Any):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, (Path, set, frozenset)):
        return str(o) if isinstance(o, Path) else sorted(o)
    return repr(o)


class TraceRecorder:
    """Records cache occupancy, mid scores, RoPE positions and timings of one run."""

    enabled = True

    def __init__(self, meta: Mapping | None = None):
        self.meta: dict = dict(meta or {})
        self._rows: dict[str, list] = {name: [] for name in TABLES}
        self._cache: dict[str, tuple[int, pd.DataFrame]] = {}
        self._handed: dict[str, int] = dict.fromkeys(TABLES, 0)  # rows already given out by `new_rows`
        # bound appends: the hot path is one attribute lookup and one call
        self._occ, self._mid, self._pos, self._time, self._blk = (
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
                build = _scores_frame if name == "scores" else _frame
                cached = (len(rows), build(rows, name))
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
            build = _scores_frame if name == "scores" else _frame
            out[name] = build(rows[self._handed[name] : end], name)
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
            if name == "scores":
                df = df.drop(columns="rank")
                rec._rows[name][:] = [(blk, lay, [c], [s], [e], [sc], [sel]) for blk, lay, c, s, e,
                                      sc, sel in df.itertuples(index=False, name=None)]
            elif name == "blocks":
                rec._rows[name][:] = [r[:-1] + (None if pd.isna(r[-1]) else int(r[-1]),)
                                   for r in df.itertuples(index=False, name=None)]
            else:
                rec._rows[name][:] = list(df.itertuples(index=False, name=None))
        return rec


def _scores_frame(calls: list[tuple], name: str = "scores") -> pd.DataFrame:
    """Expand per-call candidate lists into one row per candidate and add ``rank``."""
    cols = list(SCHEMA["scores"])[:-1]
    if not calls:
        return _frame([], "scores")
    n = [len(c[2]) for c in calls]
    data = {"block": np.repeat(np.array([c[0] for c in calls], dtype=np.int64), n),
            "layer": np.repeat(np.array([c[1] for c in calls], dtype=np.int64), n)}
    for i, col in enumerate(cols[2:], start=2):
        dtype = {"score": np.float64, "selected": np.bool_}.get(col, np.int64)
        data[col] = np.fromiter(chain.from_iterable(c[i] for c in calls), dtype=dtype, count=sum(n))
    df = pd.DataFrame(data, columns=cols)
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


# ---- persistence ------------------------------------------------------------------------
def _long_frame(tables: Mapping[str, pd.DataFrame], meta: Mapping) -> pd.DataFrame:
    """All tables stacked in one frame: ``table`` column + union of columns + ``meta`` row."""
    dtypes = {"table": "str"}
    for name in TABLES:
        dtypes.update({c: _NULLABLE[d] for c, d in SCHEMA[name].items()})
    dtypes["meta"] = "str"
    meta_row = pd.DataFrame({"table": ["meta"], "meta": [json.dumps(meta, default=_json_default)]})
    parts = [meta_row] + [tables[name].assign(table=name) for name in TABLES]
    return pd.concat([p.reindex(columns=list(dtypes)).astype(dtypes) for p in parts],
                     ignore_index=True)


def _from_long(long: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict]:
    meta_rows = long.loc[long["table"] == "meta", "meta"]
    meta = json.loads(meta_rows.iloc[0]) if len(meta_rows) else {}
    tables = {}
    for name, cols in SCHEMA.items():
        sub = long.loc[long["table"] == name, list(cols)].reset_index(drop=True)
        tables[name] = sub.astype(cols)
    return tables, meta


def _json_value(v):
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def save_tables(tables: Mapping[str, pd.DataFrame], path, meta: Mapping | None = None) -> Path:
    """Write ``tables`` (and ``meta``) to one file; the format follows the extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    meta = dict(meta or {})
    tables = {name: tables.get(name, _frame([], name)).astype(SCHEMA[name]) for name in TABLES}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        _long_frame(tables, meta).to_parquet(path, index=False)
    elif suffix == ".csv":
        _long_frame(tables, meta).to_csv(path, index=False)
    elif suffix == ".json":
        doc = {"format": FORMAT, "version": VERSION,
               "meta": json.loads(json.dumps(meta, default=_json_default)),
               "tables": {name: {c: [_json_value(v) for v in df[c].tolist()] for c in df.columns}
                          for name, df in tables.items()}}
        path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    else:
        raise ValueError(f"unsupported trace extension {suffix!r}: use .parquet, .csv or .json")
    return path


def load_tables(path) -> tuple[dict[str, pd.DataFrame], dict]:
    """Read a trace file written by :func:`save_tables`: (tables, meta)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _from_long(pd.read_parquet(path))
    if suffix == ".csv":
        dtypes = _long_frame(empty_tables(), {}).dtypes.to_dict()
        return _from_long(pd.read_csv(path, dtype=dtypes, keep_default_na=True))
    if suffix == ".json":
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        tables = {}
        for name, cols in SCHEMA.items():
            data = doc["tables"].get(name, {})
            df = pd.DataFrame({c: pd.Series(data.get(c, []), dtype=object) for c in cols})
            tables[name] = df.astype({c: _NULLABLE[d] for c, d in cols.items()}).astype(cols)
        return tables, doc.get("meta", {})
    raise ValueError(f"unsupported trace extension {suffix!r}: use .parquet, .csv or .json")


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
