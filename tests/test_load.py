"""Load (issue 7): the app on localhost takes 8 concurrent short generations from 8 gradio_client
users; all complete, none errors, at most ``PACKFORCING_CONCURRENCY`` (here 2) run at once, and
runs that overlap produce exactly the video they produce alone (the shared pipeline is safe to
share)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from tests.conftest import launch_local

from packforcing import safety, studio
from packforcing.pipeline import to_uint8
from tests.test_bad_inputs import one_thread, small_pipeline  # noqa: F401 (one_thread: autouse fixture)

PROMPT = "a yellow triangle bouncing over a navy background"
LIMIT = 2
# (seconds, policy, seed): 1-2 s each, every policy; the two identical packforcing runs compress
# blocks (no sink), so the VAE is used by overlapping runs
REQUESTS = [(2, "packforcing", 5), (1, "window", 1), (1, "full", 2), (2, "packforcing", 5),
            (1, "sink_window", 3), (1, "deep_sink", 4), (1, "packforcing", 6), (1, "full", 7)]
OPTIONS = {"packforcing": {"sink_frames": 0, "top_k": 1}}


class Meter:
    """Wraps the GPU entry point: counts the generations running at once and hashes their frames."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()
        self.active = self.peak = self.started = 0
        self.videos: dict[tuple, list[str]] = {}

    def __call__(self, request):
        with self.lock:
            self.active += 1
            self.started += 1
            self.peak = max(self.peak, self.active)
        digest = hashlib.sha256()
        try:
            for block in self.stream(request):
                digest.update(block.frames.tobytes())
                yield block
        finally:
            with self.lock:
                self.active -= 1
                key = (request.seconds, request.policy, request.seed)
                self.videos.setdefault(key, []).append(digest.hexdigest())


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline(64)


@pytest.fixture()
def served(pipe, tmp_path, monkeypatch):
    import app

    for name in list(os.environ):
        if name.startswith("PACKFORCING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(safety.CONCURRENCY_ENV, str(LIMIT))
    monkeypatch.setenv(safety.TRUSTED_PROXIES_ENV, "1")  # each user's address from X-Forwarded-For (issue 16)
    monkeypatch.setenv(safety.MIN_SECONDS_ENV, "1")
    monkeypatch.setenv(safety.RUNS_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    meter = Meter(studio.device_stream)
    monkeypatch.setattr(studio, "device_stream", meter)
    studio._RUN_LOCK.reset_peak()
    demo = app.build_demo()
    url = launch_local(demo)
    try:
        yield url, meter
    finally:
        demo.close()


def alone(pipe, seconds, policy, seed) -> str:
    """The frames' hash of a run made alone, directly with the pipeline."""
    digest = hashlib.sha256()
    for block in pipe.stream(PROMPT, seconds, policy, seed, **OPTIONS.get(policy, {})):
        digest.update(to_uint8(block.pixels).tobytes())
    return digest.hexdigest()


def test_eight_concurrent_generations_all_complete_within_the_limit(served, pipe):
    from gradio_client import Client

    url, meter = served
    expected = alone(pipe, 2, "packforcing", 5)
    clients = [Client(url, verbose=False, headers={"X-Forwarded-For": f"198.51.100.{i}"})  # 8 users, 8 addresses
               for i, _ in enumerate(REQUESTS)]
    t0 = time.perf_counter()
    try:
        jobs = [client.submit(prompt=PROMPT, seconds=seconds, policy=policy, seed=seed, api_name="/generate",
                              **OPTIONS.get(policy, {}))
                for client, (seconds, policy, seed) in zip(clients, REQUESTS)]
        results = [job.result(timeout=300) for job in jobs]  # an AppError here is a failed generation
    finally:
        for client in clients:
            client.close()
    wall = time.perf_counter() - t0
    print(f"8 concurrent generations (limit {LIMIT}): {wall:.1f} s, peak {meter.peak} at once")
    for (seconds, policy, seed), out in zip(REQUESTS, results):
        progress, video = out[0], Path(out[2])
        assert "Done" in progress and f"block {seconds}/{seconds}" in progress, (policy, progress)
        assert imageio_ffmpeg.count_frames_and_secs(str(video))[0] == 16 * seconds - 3
        assert out[-1] == seed
    assert meter.started == len(REQUESTS) and meter.active == 0
    assert meter.peak == LIMIT  # never more than the limit, and the limit was used
    assert studio._RUN_LOCK.peak <= LIMIT and studio._RUN_LOCK.active == 0
    # the two identical requests overlapped other runs and still made the video they make alone
    assert meter.videos[(2, "packforcing", 5)] == [expected, expected]
