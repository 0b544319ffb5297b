"""The Studio's run logic, free of any UI: validation, a generation worker, policy comparison.

`app.py` only wires Gradio components to what is here, so everything below is testable without
a browser or a server:

- :func:`validate_request` turns raw UI values into a :class:`RunRequest` or raises
  :class:`StudioError` (a ``ValueError``) with a message meant for the user.
- :func:`device_stream` is the GPU entry point (``@spaces.GPU`` with a duration estimated from
  the requested length by :func:`gpu_duration`; a no-op off Hugging Face ZeroGPU). It yields
  CPU-only, picklable :class:`DeviceBlock` values (uint8 frames + the trace rows added by the
  block), because on ZeroGPU it runs in a forked process.
- :class:`GenerationWorker` runs one generation in a thread and reports through a queue one
  :class:`Update` per block (preview mp4 segment, progress, trace tables so far) and a final
  one (full mp4 + trace as Parquet and CSV in a per-run temporary directory). :meth:`stop`
  ends the run after the block in progress: the video produced so far is kept and the cache is
  freed (closing the pipeline's generator releases it).
- :class:`CompareRun` runs several policies with the same prompt, seed and duration, one after
  the other.
- :data:`RUNS` maps a UI session to its running worker, so a Stop click (another request)
  reaches the generation of the same session.
"""

from __future__ import annotations

# `spaces` must be imported before anything initialises CUDA (torch is imported below).
import spaces  # noqa: I001

import collections
import contextlib
import contextvars
import dataclasses
import functools
import gc
import logging
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import safety
from .cache import POLICIES
from .knobs import (  # noqa: F401  (re-exported: the Studio's public surface)
    KNOB_SPECS, POLICY_ORDER, KnobSpec, StudioError, coerce_knob, introspect, knob_specs, policy_compresses,
    policy_knobs, policy_names, shown,
)
from .pipeline import COMPRESSOR_MODES, Pipeline, check_seed, to_uint8, write_video
from .trace import TABLES, TraceRecorder, empty_tables, save_tables, summarize

log = logging.getLogger(__name__)

# imageio-ffmpeg starts its ffmpeg writer with preexec_fn=os.setpgrp, so subprocess forks *and runs
# Python's at-fork handlers in the child*. In a process with other threads (the Gradio server, HTTP
# clients) the child can deadlock before exec (seen here: a lock inside OpenSSL held by another thread
# at fork time), and the run waits for it forever. Without preexec_fn, subprocess execs at once.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

MIN_SECONDS = safety.DEFAULT_MIN_SECONDS  # the default; PACKFORCING_MIN_SECONDS may lower it (see min_seconds)
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1  # what a random seed is drawn from (any seed in [0, 2**63) is accepted)
RUNS_DIR_ENV = safety.RUNS_DIR_ENV
MAX_SECONDS_ENV = safety.MAX_SECONDS_ENV
RUN_DIR_PREFIX = "packforcing-run-"
RUN_MAX_AGE_S = safety.DEFAULT_RUN_TTL_S  # default age after which finished runs' directories are removed
MAX_LOADED_MODELS = 2  # pipelines kept in memory (the embedded one always stays)

# ZeroGPU duration estimate (seconds of GPU time requested per call).
GPU_OVERHEAD_S = 20.0  # moving weights, warm-up, writing the video
GPU_SECONDS_PER_BLOCK = 1.2  # Wan2.1-1.3B, 4-frame blocks, 4 steps + commit, on an H100/H200
GPU_MARGIN = 1.5
GPU_MAX_DURATION_S = 900


# ---- models ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelChoice:
    key: str
    label: str
    loader: Callable[[], Pipeline]
    available: bool = True
    note: str = ""


MODELS: dict[str, ModelChoice] = {
    "embedded": ModelChoice("embedded", "Embedded tiny model (runs on CPU)", Pipeline.default),
}
DEFAULT_MODEL = "embedded"
CHECKPOINT_NOTE = (
    "Wan2.1 models: an allow-listed Hugging Face hub id (PACKFORCING_ALLOWED_MODELS, loaded from the "
    "Space's cache only) or a directory inside PACKFORCING_MODELS_DIR; they need a GPU Space."
)

_PIPELINES: collections.OrderedDict[str, Pipeline] = collections.OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def model_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for a dropdown: the embedded model(s) and the allow-listed hub ids."""
    choices = [(m.label, m.key) for m in MODELS.values() if m.available]
    return choices + [(f"{hub_id} (Hugging Face hub, GPU)", hub_id) for hub_id in safety.allowed_models()
                      if hub_id not in MODELS]


def max_seconds() -> float:
    """The duration limit: 120 s unless ``PACKFORCING_MAX_SECONDS`` says otherwise."""
    return safety.max_seconds()


def min_seconds() -> float:
    """The shortest duration: 5 s unless ``PACKFORCING_MIN_SECONDS`` says otherwise (at least 1 s)."""
    return safety.min_seconds()


def _load_pretrained(source: str) -> Pipeline:
    cuda = torch.cuda.is_available()
    return Pipeline.from_pretrained(source, device="cuda" if cuda else "cpu",
                                    dtype=torch.bfloat16 if cuda else torch.float32, local_files_only=True)


def _public(text: str) -> str:
    """A message without the server's models directory path (shown as ``<models>``)."""
    root = safety.models_dir()
    return text.replace(str(root), "<models>") if root is not None else text


def model_key(model) -> str:
    """The canonical key of a model the user named (a :data:`MODELS` key, hub id or resolved path);
    raises :class:`StudioError` for a model that is not allowed."""
    if isinstance(model, str) and model in MODELS:
        return model
    try:
        return safety.resolve_model(model).key
    except safety.UnsafeInput as err:
        raise StudioError(str(err)) from None


def get_pipeline(model: str = DEFAULT_MODEL) -> Pipeline:
    """The (cached) pipeline of a model; its duration limit follows :func:`max_seconds`.

    ``model``: a key of :data:`MODELS` (the embedded model), an allow-listed hub id, or a directory
    inside ``PACKFORCING_MODELS_DIR`` (see :func:`packforcing.safety.resolve_model`; anything else is
    refused before the file system is touched). At most :data:`MAX_LOADED_MODELS` pipelines stay
    loaded (least recently used ones are dropped; the embedded model is kept).
    """
    key = model_key(model)
    if key in MODELS:
        choice = MODELS[key]
        if not choice.available:
            raise StudioError(f"model {choice.label!r} is not available here")
        label, loader = choice.label, choice.loader
    else:
        label, loader = key, functools.partial(_load_pretrained, key)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            try:
                pipe = loader()
            except (OSError, ValueError) as err:  # FileNotFoundError, WeightLoadError, bad config
                raise StudioError(f"model {_public(label)!r} cannot be loaded: {_public(str(err))}") from None
            _PIPELINES[key] = pipe
            evictable = [k for k in _PIPELINES if k not in MODELS]
            while len(_PIPELINES) > MAX_LOADED_MODELS and evictable:
                _PIPELINES.pop(evictable.pop(0))  # a run still using it keeps its own reference
        _PIPELINES.move_to_end(key)
    pipe.max_seconds = max_seconds()
    return pipe


# ---- requests ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A validated generation request (picklable: it crosses into the GPU process on ZeroGPU)."""

    prompt: str
    seconds: float
    seed: int
    policy: str
    options: Mapping[str, Any]
    compressor_mode: str | None
    model: str
    num_blocks: int
    fps: int

    def with_policy(self, policy: str, options: Mapping[str, Any] | None = None) -> RunRequest:
        return validate_request(self.prompt, self.seconds, self.seed, policy, options or {},
                                self.compressor_mode, self.model)

    @property
    def label(self) -> str:
        return f"{self.policy}, seed {self.seed}, {self.seconds:g} s"


def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def prompt_warning(prompt: str, model: str = DEFAULT_MODEL) -> str | None:
    """A non-fatal note about a prompt (e.g. words the embedded tiny world does not know)."""
    if model != "embedded" or not isinstance(prompt, str) or not prompt.strip():
        return None
    from .world.captions import parse_caption

    try:
        parse_caption(prompt)
    except ValueError as err:
        return f"The embedded tiny-world model only knows simple scenes; {err}"
    return None


def validate_request(
    prompt,
    seconds,
    seed,
    policy: str,
    options: Mapping[str, Any] | None = None,
    compressor_mode: str | None = None,
    model: str = DEFAULT_MODEL,
    randomize_seed: bool = False,
) -> RunRequest:
    """Check raw UI values; raise :class:`StudioError` with a clear message on the first bad one.

    ``options`` may hold knobs of other policies (a UI sends all of them): only the knobs the
    chosen policy accepts are kept. The policy is built once (no allocation) so that option
    errors (e.g. frames that are not whole blocks) surface before the run starts.
    """
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise StudioError("Please enter a prompt: it is empty.")
    if not isinstance(prompt, str):
        raise StudioError(f"The prompt must be text, got {type(prompt).__name__}.")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise StudioError(f"The prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS}).")
    limit, shortest = max_seconds(), min_seconds()
    try:
        if isinstance(seconds, bool):
            raise TypeError
        seconds = float(seconds)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    except (TypeError, ValueError):
        raise StudioError(f"The duration must be a number of seconds, got {shown(seconds)}.") from None
    if not math.isfinite(seconds) or not shortest <= seconds <= limit:
        raise StudioError(
            f"The duration must be between {shortest:g} and {limit:g} seconds, got {seconds:g}."
            + ("" if seconds <= limit or not math.isfinite(seconds)
               else f" Longer videos can be enabled with the {MAX_SECONDS_ENV} setting."))
    if randomize_seed:
        seed = random_seed()
    raw_seed = seed
    try:
        if isinstance(seed, str):
            seed = float(seed.strip())
        if isinstance(seed, (float, np.floating)) and float(seed).is_integer():
            seed = int(seed)
        seed = check_seed(seed)
    except (TypeError, ValueError, OverflowError):
        raise StudioError(f"The seed must be a whole number between 0 and 2^63 - 1, got {shown(raw_seed)}.") from None
    if not isinstance(policy, str) or policy not in POLICIES:
        raise StudioError(f"Unknown cache policy {shown(policy)}; choose from {policy_names()}.")
    model = model_key(model)
    pipe = get_pipeline(model)
    accepted = introspect(policy)
    chosen = {k: coerce_knob(policy, k, v, *accepted[k], block_frames=pipe.block_frames)
              for k, v in (options or {}).items() if k in accepted}
    chosen = {k: v for k, v in chosen.items() if v is not None}  # None = the policy's derived/automatic default
    if compressor_mode is not None and compressor_mode not in COMPRESSOR_MODES:
        raise StudioError(f"Unknown compressor branch {shown(compressor_mode)}; choose from {list(COMPRESSOR_MODES)}.")
    if not policy_compresses(policy):
        compressor_mode = None
    try:
        num_blocks = pipe.num_blocks(seconds)
        pipe.build_policy(policy, compressor_mode=compressor_mode, **chosen)
        pipe.check_cache_memory(policy, num_blocks, **chosen)
    except (TypeError, ValueError) as err:
        raise StudioError(f"Cache policy {policy!r}: {err}") from None
    return RunRequest(prompt, seconds, seed, policy, dict(chosen), compressor_mode, model, num_blocks, pipe.fps)


def gpu_duration(seconds: float, per_block: float = GPU_SECONDS_PER_BLOCK, overhead: float = GPU_OVERHEAD_S,
                 block_seconds: float = 1.0) -> int:
    """ZeroGPU seconds to request for a video of ``seconds``: overhead + blocks × per-block time × margin.

    ``block_seconds`` is the video one block adds (`Pipeline.block_seconds`: VAE temporal ratio ×
    latent frames per block / fps; 4·4/16 = 1 s for 4-frame blocks at 16 fps).
    5 s -> 29 s, 60 s -> 128 s, 120 s -> 236 s (capped at 900 s).
    """
    return blocks_gpu_duration(max(1, math.ceil(float(seconds) / block_seconds)), per_block, overhead)


def blocks_gpu_duration(blocks: int, per_block: float = GPU_SECONDS_PER_BLOCK, overhead: float = GPU_OVERHEAD_S) -> int:
    """ZeroGPU seconds to request for ``blocks`` blocks (see `gpu_duration`)."""
    return int(min(GPU_MAX_DURATION_S, math.ceil(overhead + blocks * per_block * GPU_MARGIN)))


def _request_duration(request: RunRequest, *args, **kwargs) -> int:
    return blocks_gpu_duration(request.num_blocks)  # the model's own blocks (its fps, VAE ratio, block size)


# ---- the GPU entry point -----------------------------------------------------------------------
@dataclasses.dataclass
class DeviceBlock:
    """One finished block as CPU values: uint8 frames [n, H, W, 3] and the trace rows it added."""

    index: int
    frames: np.ndarray
    seconds: float
    tables: dict[str, pd.DataFrame]
    meta: dict


@spaces.GPU(duration=_request_duration)
def device_stream(request: RunRequest) -> Iterator[DeviceBlock]:
    """Generate ``request`` block by block (the function that holds the GPU on ZeroGPU).

    Closing this generator stops the run and frees the KV cache.
    """
    pipe = get_pipeline(request.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on ZeroGPU, CUDA exists only in here
    if pipe.transformer.device.type != device:
        pipe.to(device)
    recorder = TraceRecorder()
    blocks = pipe.stream(request.prompt, request.seconds, request.policy, request.seed, recorder,
                         request.compressor_mode, **request.options)
    try:
        for block in blocks:
            delta = recorder.new_rows()  # this block's rows only (not every table rebuilt)
            yield DeviceBlock(block.index, to_uint8(block.pixels), block.seconds, delta, dict(recorder.meta))
    finally:
        blocks.close()


# ---- trace accumulation ------------------------------------------------------------------------
class TableAccumulator:
    """Trace tables grown from per-block row deltas; :meth:`tables` concatenates lazily."""

    def __init__(self):
        self._parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
        self._cache: dict[str, pd.DataFrame] | None = None

    def add(self, delta: Mapping[str, pd.DataFrame]) -> None:
        for name, df in delta.items():
            if name in self._parts and len(df):
                self._parts[name].append(df)
        self._cache = None

    def tables(self) -> dict[str, pd.DataFrame]:
        if self._cache is None:
            empty = empty_tables()
            self._cache = {name: (pd.concat(parts, ignore_index=True) if parts else empty[name])
                           for name, parts in self._parts.items()}
        return dict(self._cache)


# ---- the worker --------------------------------------------------------------------------------
@dataclasses.dataclass
class Update:
    """A message from a worker. ``kind``: "block" (one per block), then "done" or "error" (final)."""

    kind: str
    request: RunRequest
    blocks_done: int = 0
    total_blocks: int = 0
    frames_done: int = 0
    video_seconds: float = 0.0
    elapsed: float = 0.0
    kv_bytes: int | None = None
    segment: Path | None = None  # mp4 of the latest block (preview)
    last_frame: np.ndarray | None = None
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=empty_tables)
    meta: dict = dataclasses.field(default_factory=dict)
    video: Path | None = None  # final (possibly partial) mp4
    trace_files: list[Path] = dataclasses.field(default_factory=list)
    stopped: bool = False
    message: str | None = None

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")

    @property
    def fps(self) -> float:
        """Generated video frames per wall-clock second."""
        return self.frames_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def kv_mb(self) -> float | None:
        return None if self.kv_bytes is None else self.kv_bytes / 2**20

    @property
    def fraction(self) -> float:
        return self.blocks_done / self.total_blocks if self.total_blocks else 0.0

    def progress_text(self) -> str:
        parts = [f"block {self.blocks_done}/{self.total_blocks}",
                 f"{self.video_seconds:.1f} s of video",
                 f"{self.fps:.1f} frames/s"]
        if self.kv_mb is not None:
            parts.append(f"KV cache {self.kv_mb:,.2f} MB")
        return " · ".join(parts)

    def summary(self) -> dict:
        return summarize(self.tables, self.meta)


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
    return removed


def failure_message(err: BaseException, blocks_done: int, total: int) -> str:
    """What the user reads when a run fails at block ``blocks_done + 1``."""
    kept = (f"the {blocks_done} finished block{'s' if blocks_done != 1 else ''} "
            "(partial video and trace) are kept" if blocks_done else "no block had finished")
    where = f"at block {blocks_done + 1} of {total}"
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return (f"Out of memory {where} ({first}); {kept}. The cache was freed. Try a shorter video, fewer "
                "sink/recent/window frames or a smaller top-k.")
    text = str(err).strip() or repr(err)
    return f"Generation failed {where}: {type(err).__name__}: {text}; {kept}. The cache was freed."


@contextlib.contextmanager
def _holding(slots: RunSlots):
    """Release an already acquired slot on exit."""
    try:
        yield
    finally:
        slots.release()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GenerationWorker:
    """Runs one generation in a thread; :meth:`updates` yields its :class:`Update` messages.

    Usage::

        worker = GenerationWorker(validate_request(...)).start()
        for update in worker.updates():
            ...            # "block" updates, then one final "done"/"error"
        worker.stop()      # from anywhere: ends the run after the block in progress
    """

    def __init__(self, request: RunRequest, run_dir: str | Path | None = None, *, segments: bool = True,
                 stream_fn: Callable[[RunRequest], Iterator[DeviceBlock]] | None = None):
        self.request = request
        self.run_dir = Path(run_dir) if run_dir is not None else new_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.segments = segments
        self._stream_fn = stream_fn or device_stream
        self._queue: queue.Queue[Update] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.final: Update | None = None

    # -- control -------------------------------------------------------------------------------
    def start(self) -> GenerationWorker:
        if self._thread is not None:
            raise RuntimeError("a worker runs once")
        _set_active(self.run_dir, True)
        ctx = contextvars.copy_context()  # ZeroGPU reads the Gradio request from context variables
        self._thread = threading.Thread(target=ctx.run, args=(self._run,), daemon=True,
                                        name=f"packforcing-{self.request.policy}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the run to end after the block in progress (keeps the video so far)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def backlog(self) -> int:
        """Updates waiting to be read (a UI may skip redrawing plots while it catches up)."""
        return self._queue.qsize()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Yield updates until the final one (``timeout``: max seconds to wait for each)."""
        if self._thread is None:
            self.start()
        while True:
            try:
                update = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no update from the generation worker within {timeout} s") from None
            yield update
            if update.final:
                return

    def run(self, timeout: float | None = None) -> Update:
        """Start (if needed), wait for the end, return the final update."""
        for update in self.updates(timeout):
            pass
        return update

    # -- the thread ------------------------------------------------------------------------------
    def _acquire_slot(self) -> bool:
        """Wait for a free run slot; give up (False) if Stop comes first (e.g. the client left)."""
        while not _RUN_LOCK.acquire(timeout=0.2):
            if self._stop.is_set():
                return False
        return True

    def _run(self) -> None:
        final = None
        try:
            final = self._generate()
        except BaseException as err:  # never leave a reader waiting for a final update
            log.exception("generation worker crashed")
            final = Update("error", request=self.request, total_blocks=self.request.num_blocks,
                           message=f"internal error: {type(err).__name__}: {err}")
            if not isinstance(err, Exception):
                raise
        finally:
            if final is None:
                final = Update("error", request=self.request, total_blocks=self.request.num_blocks,
                               message="internal error: the worker ended without a result")
            self.final = final
            self._queue.put(final)
            _set_active(self.run_dir, False)

    def _generate(self) -> Update:
        req = self.request
        tables, frames, meta = TableAccumulator(), [], {}
        base = dict(request=req, total_blocks=req.num_blocks)
        t0 = time.perf_counter()
        stopped = False
        if not self._acquire_slot():  # stopped while queued: nothing ran, nothing to keep
            return Update("done", stopped=True, message="stopped before it started", **base)
        try:
            with _holding(_RUN_LOCK):  # releases the slot, after a failure too
                t0 = time.perf_counter()
                gen = self._stream_fn(req)
                try:
                    for item in gen:
                        frames.append(item.frames)
                        tables.add(item.tables)
                        meta = item.meta or meta
                        segment = None
                        if self.segments:
                            segment = write_video(item.frames, self.run_dir / f"segment_{item.index:04d}.mp4",
                                                  fps=req.fps)
                        snapshot = tables.tables()
                        blocks = snapshot["blocks"]
                        self._queue.put(Update(
                            "block", blocks_done=item.index + 1, frames_done=sum(len(f) for f in frames),
                            video_seconds=sum(len(f) for f in frames) / req.fps, elapsed=time.perf_counter() - t0,
                            kv_bytes=int(blocks["kv_bytes"].iloc[-1]) if len(blocks) else None,
                            segment=segment, last_frame=item.frames[-1], tables=snapshot, meta=meta, **base))
                        if self._stop.is_set():
                            stopped = item.index + 1 < req.num_blocks
                            break
                finally:
                    gen.close()  # a Stop (or an error) frees the cache here
                elapsed = time.perf_counter() - t0
                return self._finish("done", frames, tables, meta, elapsed, base, stopped=stopped)
        except Exception as err:  # reported to the UI, never raised in the thread
            log.exception("generation failed")
            message = failure_message(err, len(frames), req.num_blocks)
        # failed: the exception (and its traceback, which holds the failed block's tensors) is gone
        _free_device_memory()
        elapsed = time.perf_counter() - t0
        try:
            return self._finish("error", frames, tables, meta, elapsed, base, message=message)
        except Exception as err2:  # writing the partial results failed too
            return Update("error", message=f"{message} Saving the partial video failed: {err2}", **base)

    def _finish(self, kind, frames, tables, meta, elapsed, base, stopped=False, message=None) -> Update:
        snapshot = tables.tables()
        video, trace_files = None, []
        if frames:
            video = write_video(np.concatenate(frames), self.run_dir / "video.mp4", fps=self.request.fps)
        if frames or kind == "done":
            meta = dict(meta, stopped=stopped, **({"error": message} if message else {}))
            trace_files = [save_tables(snapshot, self.run_dir / f"trace.{ext}", meta) for ext in ("parquet", "csv")]
        blocks = snapshot["blocks"]
        n = sum(len(f) for f in frames)
        return Update(kind, blocks_done=len(frames), frames_done=n, video_seconds=n / self.request.fps,
                      elapsed=elapsed, kv_bytes=int(blocks["kv_bytes"].iloc[-1]) if len(blocks) else None,
                      last_frame=frames[-1][-1] if frames else None, tables=snapshot, meta=meta, video=video,
                      trace_files=trace_files, stopped=stopped, message=message, **base)


def run_generation(request: RunRequest, run_dir: str | Path | None = None, **kwargs) -> Update:
    """Blocking convenience: run ``request`` to the end and return the final update."""
    return GenerationWorker(request, run_dir, **kwargs).run()


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
        chosen = list(dict.fromkeys(policies or []))
        if len(chosen) < 2:
            raise StudioError("Select at least two cache policies to compare.")
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

    def blocks_by_policy(self, latest: Mapping[str, Update] | None = None) -> dict[str, pd.DataFrame]:
        runs = dict(self.results)
        runs.update({k: v for k, v in (latest or {}).items() if k not in runs})
        return {p: u.tables["blocks"] for p, u in runs.items()}


# ---- session registry (Stop) -------------------------------------------------------------------
class RunRegistry:
    """Session key -> its running worker (or comparison), so a Stop request can reach it."""

    def __init__(self):
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, key: str, run) -> None:
        with self._lock:
            previous = self._runs.get(key)
            self._runs[key] = run
        if previous is not None and previous is not run:
            previous.stop()

    def unregister(self, key: str, run) -> None:
        with self._lock:
            if self._runs.get(key) is run:
                del self._runs[key]

    def stop(self, key: str) -> bool:
        """Stop the session's run; False when nothing was running."""
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            return False
        run.stop()
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._runs


RUNS = RunRegistry()
