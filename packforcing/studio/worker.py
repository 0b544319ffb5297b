"""The generation worker: the GPU entry point (`device_stream`), per-block `Update`s through a
queue, Stop, the partial video and trace kept on failure."""

from __future__ import annotations

# `spaces` must be imported before anything initialises CUDA (torch is imported below).
import spaces  # noqa: I001

import contextlib
import errno
import contextvars
import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..devices import release_host_memory
from ..safety import public_text
from ..video import to_uint8, write_video
from ..trace import TABLES, TraceRecorder, empty_tables, save_tables, summarize
from .models import get_pipeline
from .requests import RunRequest, _request_duration
from .runs import _RUN_LOCK, RunSlots, _set_active, cleanup_runs, new_run_dir

log = logging.getLogger("packforcing.studio")

# imageio-ffmpeg starts its ffmpeg writer with preexec_fn=os.setpgrp, so subprocess forks *and runs
# Python's at-fork handlers in the child*. In a process with other threads (the Gradio server, HTTP
# clients) the child can deadlock before exec (seen here: a lock inside OpenSSL held by another thread
# at fork time), and the run waits for it forever. Without preexec_fn, subprocess execs at once.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


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
    blocks = pipe.stream(request.prompts, request.seconds, request.policy, request.seed, recorder,
                         request.compressor_mode, prompt_switch=request.prompt_switch, **request.options)
    try:
        for block in blocks:
            delta = recorder.new_rows()  # this block's rows only (not every table rebuilt)
            yield DeviceBlock(block.index, to_uint8(block.pixels), block.seconds, delta, dict(recorder.meta))
    finally:
        blocks.close()


def _package_device_stream():
    """`device_stream` as the `packforcing.studio` package exposes it (so it can be replaced there)."""
    import packforcing.studio as package

    return package.device_stream


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


THUMBNAIL_WIDTH = 128  # pixels, at most


def block_thumbnail(frames: np.ndarray) -> np.ndarray:
    """The middle frame of a block's frames [n, H, W, 3], subsampled to at most `THUMBNAIL_WIDTH` wide."""
    frame = frames[len(frames) // 2]
    step = max(1, -(-frame.shape[1] // THUMBNAIL_WIDTH))
    return np.ascontiguousarray(frame[::step, ::step])


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
    thumbnails: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # block -> uint8 [h, w, 3]

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


def failure_message(err: BaseException, blocks_done: int, total: int) -> str:
    """What the user reads when a run fails at block ``blocks_done + 1`` (server paths masked)."""
    kept = (f"the {blocks_done} finished block{'s' if blocks_done != 1 else ''} "
            "(partial video and trace) are kept" if blocks_done else "no block had finished")
    where = f"at block {blocks_done + 1} of {total}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        freed = cleanup_runs()  # make room for the next run (oldest finished runs first)
        return (f"The server's disk is full {where}; {kept} if there was room to write them. This run was "
                f"stopped; {freed} old run director{'ies' if freed != 1 else 'y'} were removed to make room: "
                "try again in a moment.")
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        first = (public_text(str(err)).strip().splitlines() or [""])[0][:200]
        return (f"Out of memory {where} ({first}); {kept}. The cache was freed. Try a shorter video, fewer "
                "sink/recent/window frames or a smaller top-k.")
    text = public_text(str(err)).strip() or repr(err)
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
        self._stream_fn = stream_fn or _package_device_stream()
        self._queue: queue.Queue[Update] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.final: Update | None = None
        self.thumbnails: dict[int, np.ndarray] = {}  # block -> thumbnail of its frames (the inspector's)

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
                           message=public_text(f"internal error: {type(err).__name__}: {err}"))
            if not isinstance(err, Exception):
                raise
        finally:
            if final is None:
                final = Update("error", request=self.request, total_blocks=self.request.num_blocks,
                               message="internal error: the worker ended without a result")
            self.final = final
            self._queue.put(final)
            _set_active(self.run_dir, False)
            release_host_memory()  # the run's freed memory back to the OS (see devices.release_host_memory)

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
                        self.thumbnails[item.index] = block_thumbnail(item.frames)
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
                            segment=segment, last_frame=item.frames[-1], tables=snapshot, meta=meta,
                            thumbnails=dict(self.thumbnails), **base))
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
            return Update("error", message=public_text(f"{message} Saving the partial video failed: {err2}"), **base)

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
                      trace_files=trace_files, stopped=stopped, message=message,
                      thumbnails=dict(self.thumbnails), **base)


def run_generation(request: RunRequest, run_dir: str | Path | None = None, **kwargs) -> Update:
    """Blocking convenience: run ``request`` to the end and return the final update."""
    return GenerationWorker(request, run_dir, **kwargs).run()
