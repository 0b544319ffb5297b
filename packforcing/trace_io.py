"""Trace files: every table of :mod:`packforcing.trace` plus ``meta`` in one .parquet, .csv or .json file.

Parquet and CSV hold a *long* frame: a ``table`` column naming the table of each row, the union of
all tables' columns, and one ``meta`` row whose ``meta`` cell is JSON
``{"format": "packforcing-trace", "version": 2, "meta": {...}}``. JSON files are
``{"format": ..., "version": ..., "meta": ..., "tables": {name: {column: [values]}}}``.

Reading checks the file before trusting it: a file that is not a trace of this project, or one
from a newer version, raises `TraceFormatError` (a ValueError) naming what is wrong. Version-1
files (before ``mid_attention`` and ``switches``) load with those tables empty.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .trace_schema import SCHEMA

FORMAT = "packforcing-trace"
VERSION = 2
EXTENSIONS = (".parquet", ".csv", ".json")


class TraceFormatError(ValueError):
    """The file is not a readable trace of this project (the message says why)."""


_NULLABLE = {"int64": "Int64", "Int64": "Int64", "bool": "boolean", "float64": "float64", "str": "str"}


def _json_default(o: Any):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, (Path, set, frozenset)):
        return str(o) if isinstance(o, Path) else sorted(o)
    return repr(o)


def _frame(name: str) -> pd.DataFrame:
    cols = SCHEMA[name]
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols}).astype(cols)


def _long_dtypes() -> dict[str, str]:
    dtypes = {"table": "str"}
    for cols in SCHEMA.values():
        dtypes.update({c: _NULLABLE[d] for c, d in cols.items()})
    dtypes["meta"] = "str"
    return dtypes


def _long_frame(tables: Mapping[str, pd.DataFrame], meta: Mapping) -> pd.DataFrame:
    """All tables stacked in one frame: ``table`` column + union of columns + ``meta`` row."""
    dtypes = _long_dtypes()
    header = json.dumps({"format": FORMAT, "version": VERSION, "meta": dict(meta)}, default=_json_default)
    parts = [pd.DataFrame({"table": ["meta"], "meta": [header]})] + [tables[n].assign(table=n) for n in SCHEMA]
    return pd.concat([p.reindex(columns=list(dtypes)).astype(dtypes) for p in parts], ignore_index=True)


def _check_version(version, path) -> None:
    if not isinstance(version, int) or version > VERSION:
        raise TraceFormatError(f"{path.name} is a {FORMAT} file of version {version!r}; this PackForcing "
                               f"reads versions 1 to {VERSION}: update PackForcing to read it")


def _from_long(long: pd.DataFrame, path: Path) -> tuple[dict[str, pd.DataFrame], dict]:
    if "table" not in long.columns or "meta" not in long.columns:
        raise TraceFormatError(f"{path.name} is not a PackForcing trace: it has no 'table' and 'meta' columns "
                               "(traces are the trace.parquet / trace.csv files a run writes)")
    meta_rows = long.loc[long["table"] == "meta", "meta"]
    if len(meta_rows) != 1:
        raise TraceFormatError(f"{path.name} is not a PackForcing trace: expected one meta row, found {len(meta_rows)}")
    try:
        header = json.loads(meta_rows.iloc[0])
    except (TypeError, ValueError):
        raise TraceFormatError(f"{path.name}: its meta row is not JSON") from None
    if not isinstance(header, dict):
        raise TraceFormatError(f"{path.name}: its meta row is not a JSON object")
    if "format" in header:  # version 2 on: {"format", "version", "meta"}
        if header["format"] != FORMAT:
            raise TraceFormatError(f"{path.name} is a {header['format']!r} file, not a {FORMAT} file")
        _check_version(header.get("version"), path)
        meta = header.get("meta") or {}
    else:  # version 1: the meta row is the meta itself
        meta = header
    known = set(long["table"].dropna().unique()) - {"meta"}
    unknown = known - set(SCHEMA)
    if unknown:
        raise TraceFormatError(f"{path.name} is not a PackForcing trace: unknown tables {sorted(unknown)}")
    tables = {}
    for name, cols in SCHEMA.items():
        sub = long.loc[long["table"] == name]
        missing = [c for c in cols if c not in long.columns]
        if missing and len(sub):
            raise TraceFormatError(f"{path.name}: table {name!r} lacks the columns {missing}")
        if not len(sub):
            tables[name] = _frame(name)
            continue
        try:
            tables[name] = sub[list(cols)].reset_index(drop=True).astype(cols)
        except (TypeError, ValueError) as err:
            raise TraceFormatError(f"{path.name}: table {name!r} has values of the wrong type ({err})") from None
    return tables, meta


def _json_value(v):
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(f"unsupported trace extension {suffix!r}: use .parquet, .csv or .json")
    return suffix


def save_tables(tables: Mapping[str, pd.DataFrame], path, meta: Mapping | None = None) -> Path:
    """Write ``tables`` (and ``meta``) to one file; the format follows the extension."""
    path = Path(path)
    suffix = _suffix(path)
    meta = json.loads(json.dumps(dict(meta or {}), default=_json_default))
    tables = {name: (tables[name] if name in tables else _frame(name)).astype(cols)
              for name, cols in SCHEMA.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        _long_frame(tables, meta).to_parquet(path, index=False)
    elif suffix == ".csv":
        _long_frame(tables, meta).to_csv(path, index=False)
    else:
        doc = {"format": FORMAT, "version": VERSION, "meta": meta,
               "tables": {name: {c: [_json_value(v) for v in df[c].tolist()] for c in df.columns}
                          for name, df in tables.items()}}
        path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def load_tables(path) -> tuple[dict[str, pd.DataFrame], dict]:
    """Read a trace file written by :func:`save_tables`: (tables, meta). Raises `TraceFormatError`
    for a file that is not one (FileNotFoundError if it does not exist)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file {path.name}")
    try:
        if suffix == ".parquet":
            long = pd.read_parquet(path)
        elif suffix == ".csv":
            long = pd.read_csv(path, dtype=_long_dtypes(), keep_default_na=True)
        else:
            return _from_json(json.loads(path.read_text()), path)
    except TraceFormatError:
        raise
    except Exception as err:  # pyarrow / parser errors: a damaged or foreign file
        raise TraceFormatError(f"{path.name} could not be read as a {suffix[1:]} trace: "
                               f"{type(err).__name__}: {str(err)[:200]}") from None
    return _from_long(long, path)


def _from_json(doc, path: Path) -> tuple[dict[str, pd.DataFrame], dict]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TraceFormatError(f"{path.name} is not a {FORMAT} file")
    _check_version(doc.get("version"), path)
    tables = {}
    for name, cols in SCHEMA.items():
        data = (doc.get("tables") or {}).get(name, {})
        try:
            df = pd.DataFrame({c: pd.Series(data.get(c, []), dtype=object) for c in cols})
            tables[name] = df.astype({c: _NULLABLE[d] for c, d in cols.items()}).astype(cols)
        except (TypeError, ValueError) as err:
            raise TraceFormatError(f"{path.name}: table {name!r} has values of the wrong type ({err})") from None
    return tables, doc.get("meta", {})
