"""Run bookkeeping: generation slots (`RunSlots`), per-run directories and their cleanup, and the
session registry that lets a Stop click reach its session's run (`RUNS`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .. import safety

log = logging.getLogger("packforcing.studio")

RUNS_DIR_ENV = safety.RUNS_DIR_ENV
MAX_SECONDS_ENV = safety.MAX_SECONDS_ENV
RUN_DIR_PREFIX = "packforcing-run-"
RUN_MAX_AGE_S = safety.DEFAULT_RUN_TTL_S  # default age after which finished runs' directories are removed


class RunSlots:
    """At most ``limit`` generations at once in this process (default: ``PACKFORCING_CONCURRENCY``,
    read at each acquire). A lock-like object (``acquire``/``release``/``with``) that also counts:
    :attr:`active` runs now, :attr:`peak` since :meth:`reset_peak`."""

    def __init__(self, limit: int | None = None):
        self._limit = limit
        self._cond = threading.Condition()
        self.active = 0
        self.peak = 0

    @property
    def limit(self) -> int:
        return self._limit or safety.concurrency_limit()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        wait = None if blocking and (timeout is None or timeout < 0) else (timeout if blocking else 0)
        with self._cond:
            if not self._cond.wait_for(lambda: self.active < self.limit, timeout=wait):
                return False
            self.active += 1
            self.peak = max(self.peak, self.active)
            return True

    def release(self) -> None:
        with self._cond:
            if self.active <= 0:
                raise RuntimeError("RunSlots.release() without acquire()")
            self.active -= 1
            self._cond.notify_all()

    def reset_peak(self) -> None:
        with self._cond:
            self.peak = self.active

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


_RUN_LOCK = RunSlots()  # generations running at once in this process (PACKFORCING_CONCURRENCY, default 1)
_ACTIVE_DIRS: set[Path] = set()  # run directories in use: never cleaned up
_ACTIVE_LOCK = threading.Lock()


def runs_root() -> Path:
    root = safety.runs_dir() or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def new_run_dir() -> Path:
    """A fresh per-run temporary directory (expired ones are cleaned up first)."""
    root = runs_root()
    cleanup_runs(root)
    return Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=root))


def _set_active(path: Path, active: bool) -> None:
    path = Path(path).resolve()
    with _ACTIVE_LOCK:
        (_ACTIVE_DIRS.add if active else _ACTIVE_DIRS.discard)(path)


def active_run_dirs() -> set[Path]:
    with _ACTIVE_LOCK:
        return set(_ACTIVE_DIRS)


def cleanup_runs(root: Path | None = None, max_age_s: float | None = None) -> int:
    """Remove per-run directories (``packforcing-run-*`` directly under ``root``) not modified for
    ``max_age_s`` (default: ``PACKFORCING_RUN_TTL_S``, 6 h); returns how many were removed.

    Never removed: a directory a run is using (or that holds one), a symlink (nor what it points
    to), anything not named like a run directory. A run's files are written into its own fresh
    directory, so no run ever overwrites or deletes another run's files before they expire."""
    root = Path(root or runs_root())
    max_age_s = safety.run_ttl_s() if max_age_s is None else max_age_s
    active = active_run_dirs()
    now, removed = time.time(), 0
    for path in root.glob(RUN_DIR_PREFIX + "*"):
        try:
            if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime <= max_age_s:
                continue
            resolved = path.resolve()
            if any(a == resolved or a.is_relative_to(resolved) for a in active):
                continue
            shutil.rmtree(path)
            removed += 1
        except OSError:
            log.warning("could not remove expired run directory %s", path, exc_info=True)
    return removed + enforce_disk_cap(root)


# ---- disk cap ----------------------------------------------------------------------------------
GRADIO_ENTRY = re.compile(r"[0-9a-f]{64}")  # Gradio's cache sub-directories (a keyed sha256)
MIN_CACHE_ENTRY_AGE_S = 60.0  # a Gradio copy younger than this may still be on its way to a browser


def gradio_cache_dir() -> Path:
    """Where Gradio copies the files it serves (its own rule: ``GRADIO_TEMP_DIR``, else <tmp>/gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _bytes_under(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):  # does not follow symlinked directories
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def enforce_disk_cap(root: Path | None = None, cap_bytes: int | None = None, cache_dir: Path | None = None) -> int:
    """Keep the run directories under ``root`` plus Gradio's cache within ``cap_bytes`` (default
    ``PACKFORCING_DISK_CAP_MB``): remove finished run directories and Gradio cache entries (those
    older than `MIN_CACHE_ENTRY_AGE_S`), oldest first, until under the cap. Never a run in use,
    a symlink, or anything not named like a run directory or a Gradio cache entry. Returns how many
    directories were removed."""
    root = Path(root or runs_root())
    cap = safety.disk_cap_bytes() if cap_bytes is None else int(cap_bytes)
    cache = Path(cache_dir) if cache_dir is not None else gradio_cache_dir()
    active = active_run_dirs()
    now = time.time()
    runs, entries = [], []
    for path in root.glob(RUN_DIR_PREFIX + "*"):
        if path.is_dir() and not path.is_symlink():
            resolved = path.resolve()
            if not any(a == resolved or a.is_relative_to(resolved) for a in active):
                runs.append(path)
    if cache.is_dir():
        entries = [p for p in cache.iterdir() if GRADIO_ENTRY.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    candidates = []  # (is a Gradio copy, mtime, path, bytes), removed oldest first
    for is_copy, paths in ((False, runs), (True, entries)):
        for path in paths:
            try:
                candidates.append((is_copy, path.stat().st_mtime, path, _bytes_under(path)))
            except OSError:
                continue
    total = sum(c[3] for c in candidates) + sum(_bytes_under(a) for a in active if a.is_dir())
    removed = 0
    for is_copy, mtime, path, size in sorted(candidates, key=lambda c: c[1]):
        if total <= cap:
            break
        if is_copy and now - mtime < MIN_CACHE_ENTRY_AGE_S:
            continue
        try:
            shutil.rmtree(path)
        except OSError:
            log.warning("could not remove %s to respect the disk cap", path, exc_info=True)
            continue
        total -= size
        removed += 1
    if total > cap:
        log.warning("run files use %.0f MiB, over the %.0f MiB cap (only runs in use or fresh copies left)",
                    total / 2**20, cap / 2**20)
    return removed


# ---- session registry (Stop) -------------------------------------------------------------------
class RunRegistry:
    """Session key -> its running workers (or comparisons), so a Stop request can reach them.

    A session may have several runs at once (an API client submitting jobs while the concurrency
    limit is above 1): registering one never stops another; Stop stops them all."""

    def __init__(self):
        self._runs: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def register(self, key: str, run) -> None:
        with self._lock:
            runs = self._runs.setdefault(key, [])
            if not any(r is run for r in runs):
                runs.append(run)

    def unregister(self, key: str, run) -> None:
        with self._lock:
            runs = [r for r in self._runs.get(key, []) if r is not run]
            if runs:
                self._runs[key] = runs
            else:
                self._runs.pop(key, None)

    def stop(self, key: str) -> bool:
        """Stop the session's runs; False when nothing was running."""
        with self._lock:
            runs = list(self._runs.get(key, []))
        for run in runs:
            run.stop()
        return bool(runs)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._runs


RUNS = RunRegistry()
