"""Policy comparison: several policies, the same prompt, seed and duration, one after the other."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..knobs import StudioError, policy_names, shown
from .requests import RunRequest
from .runs import _set_active, new_run_dir
from .worker import DeviceBlock, GenerationWorker, Update


# ---- comparison --------------------------------------------------------------------------------
class CompareRun:
    """Several policies, same prompt / seed / duration, run one after the other.

    ``options`` gives knobs per policy (missing policies use their defaults). :meth:`updates`
    yields ``(policy, Update)`` pairs; :attr:`results` maps each finished policy to its final
    update. :meth:`stop` stops the run in progress and skips the remaining policies.
    """

    def __init__(self, base: RunRequest, policies, options: Mapping[str, Mapping[str, Any]] | None = None,
                 run_dir: str | Path | None = None, segments: bool = False,
                 stream_fn: Callable[[RunRequest], Iterator[DeviceBlock]] | None = None):
        if not isinstance(policies, (list, tuple)) or not all(isinstance(p, str) for p in policies):
            raise StudioError(f"policies must be a list of two or more cache policy names (from {policy_names()}), "
                              f"got {shown(policies)}.")
        chosen = list(dict.fromkeys(policies))
        if len(chosen) < 2:
            raise StudioError("Select at least two cache policies to compare (policies).")
        options = options or {}
        self.requests = {p: base.with_policy(p, options.get(p)) for p in chosen}
        self.run_dir = Path(run_dir) if run_dir is not None else new_run_dir()
        self.segments = segments
        self.stream_fn = stream_fn
        self.results: dict[str, Update] = {}
        self._stop = threading.Event()
        self._current: GenerationWorker | None = None

    @property
    def policies(self) -> list[str]:
        return list(self.requests)

    def stop(self) -> None:
        self._stop.set()
        if self._current is not None:
            self._current.stop()

    def updates(self, timeout: float | None = None) -> Iterator[tuple[str, Update]]:
        _set_active(self.run_dir, True)
        try:
            yield from self._updates(timeout)
        finally:
            _set_active(self.run_dir, False)

    def _updates(self, timeout: float | None) -> Iterator[tuple[str, Update]]:
        for policy, request in self.requests.items():
            if self._stop.is_set():
                break
            worker = GenerationWorker(request, self.run_dir / policy, segments=self.segments,
                                      stream_fn=self.stream_fn)
            self._current = worker
            if self._stop.is_set():
                worker.stop()
            try:
                for update in worker.updates(timeout):
                    if update.final:
                        self.results[policy] = update
                    yield policy, update
            finally:
                worker.stop()
                self._current = None

    def indexed_updates(self, timeout: float | None = None) -> Iterator[tuple[int, tuple[str, Update]]]:
        """:meth:`updates` with each policy's position in :attr:`policies`."""
        order = {p: i for i, p in enumerate(self.policies)}
        for policy, update in self.updates(timeout):
            yield order[policy], (policy, update)

    def blocks_by_policy(self, latest: Mapping[str, Update] | None = None) -> dict[str, pd.DataFrame]:
        runs = dict(self.results)
        runs.update({k: v for k, v in (latest or {}).items() if k not in runs})
        return {p: u.tables["blocks"] for p, u in runs.items()}
