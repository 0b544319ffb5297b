"""Faults (issue 7): Stop mid-run, a client that leaves mid-run, an exception inside a block and
out-of-memory each end that run with a clear message, keep the partial video, free the cache and
leave the app serving the next request; nothing a finished run wrote is lost; expired run
directories are cleaned up, and only those.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch

from packforcing import embedded, safety, studio
from packforcing.__main__ import main
from packforcing.pipeline import Pipeline
from packforcing.trace import load_tables
from tests.conftest import launch_local
from tests.test_bad_inputs import one_thread, small_pipeline  # noqa: F401 (one_thread: autouse fixture)

PROMPT = "a red circle bouncing over a navy background"


def frames(path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def released(store) -> bool:
    """A store whose buffers were freed (`CacheStore.release` drops every K/V buffer)."""
    return not store.buffers()


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline(64)  # 64x64: the compressing policy runs too


@pytest.fixture()
def env(pipe, tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("PACKFORCING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(safety.MIN_SECONDS_ENV, "1")
    monkeypatch.setenv(safety.RUNS_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    return tmp_path


@pytest.fixture()
def policies(monkeypatch):
    """The store of every cache policy built, in order (the last one is the run's)."""
    built = []
    original = Pipeline.build_policy

    def spy(self, *args, **kwargs):
        policy, compressor = original(self, *args, **kwargs)
        allocate = policy.allocate

        def allocate_and_keep(*a, **kw):
            store = allocate(*a, **kw)
            built.append(store)
            return store

        policy.allocate = allocate_and_keep
        return policy, compressor

    monkeypatch.setattr(Pipeline, "build_policy", spy)
    return built


def fail_at_block(monkeypatch, pipe, block: int, error: BaseException):
    """Make the transformer raise ``error`` when it reaches ``block`` (first denoising step)."""
    original = pipe.transformer.forward_block

    def forward_block(latents, timestep, text, cache, *args, **kwargs):
        if cache.block == block:
            raise error
        return original(latents, timestep, text, cache, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward_block", forward_block)


def serves_next_request(tmp: Path) -> None:
    assert studio._RUN_LOCK.active == 0  # the slot was given back
    request = studio.validate_request(PROMPT, 1, 1, "window", {})
    final = studio.GenerationWorker(request, tmp / "next", segments=False).run(timeout=120)
    assert final.kind == "done" and frames(final.video) == 13


def test_ffmpeg_is_started_without_a_fork_handler():
    """A video writer started from a worker thread must not run Python code between fork and exec
    (it can deadlock on a lock another thread held: the run would hang forever)."""
    from imageio_ffmpeg._utils import _popen_kwargs

    assert _popen_kwargs(prevent_sigint=True)["preexec_fn"] is None


# ---- the worker ----------------------------------------------------------------------------------
def test_stop_mid_run_keeps_partial_video_and_frees_the_cache(env, policies):
    request = studio.validate_request(PROMPT, 4, 0, "packforcing", {"sink_frames": 0, "top_k": 1})
    worker = studio.GenerationWorker(request).start()
    for update in worker.updates(timeout=120):
        if update.kind == "block" and not worker.stop_requested:
            worker.stop()
    final = update
    assert final.kind == "done" and final.stopped and final.message is None
    assert 1 <= final.blocks_done < 4 and frames(final.video) == 13 + 16 * (final.blocks_done - 1)
    assert final.video.parent == worker.run_dir and worker.run_dir.parent == env / "runs"
    assert load_tables(final.trace_files[0])[1]["stopped"] is True
    assert released(policies[-1]) and worker.join(10)
    serves_next_request(env)


@pytest.mark.parametrize("policy", ["window", "packforcing"])
def test_exception_inside_a_block_ends_the_run_cleanly(policy, env, pipe, policies, monkeypatch):
    request = studio.validate_request(PROMPT, 4, 0, policy, {"sink_frames": 0} if policy == "packforcing" else {})
    with monkeypatch.context() as m:
        fail_at_block(m, pipe, 2, RuntimeError("injected fault in block 2"))
        final = studio.GenerationWorker(request, env / "failed").run(timeout=120)
    assert final.kind == "error"
    assert final.message == ("Generation failed at block 3 of 4: RuntimeError: injected fault in block 2; the 2 "
                             "finished blocks (partial video and trace) are kept. The cache was freed.")
    assert final.blocks_done == 2 and frames(final.video) == 13 + 16
    tables, meta = load_tables(final.trace_files[0])
    assert len(tables["blocks"]) == 2 and "injected fault" in meta["error"]
    assert released(policies[-1])
    serves_next_request(env)


def test_out_of_memory_ends_the_run_with_a_clear_message(env, pipe, policies, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)")
    request = studio.validate_request(PROMPT, 3, 0, "packforcing", {"sink_frames": 0})
    with monkeypatch.context() as m:
        fail_at_block(m, pipe, 1, oom)
        final = studio.GenerationWorker(request, env / "oom").run(timeout=120)
    assert final.kind == "error" and final.message.startswith(
        "Out of memory at block 2 of 3 (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "the 1 finished block (partial video and trace) are kept. The cache was freed." in final.message
    assert "shorter video" in final.message
    assert final.blocks_done == 1 and frames(final.video) == 13
    assert released(policies[-1]) and studio._RUN_LOCK.active == 0
    serves_next_request(env)  # the same pipeline generates as soon as memory is there again


def test_cli_out_of_memory_writes_the_finished_blocks(env, pipe, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "default_pipeline", lambda: pipe)
    fail_at_block(monkeypatch, pipe, 1, torch.OutOfMemoryError("CUDA out of memory."))
    out = env / "cli.mp4"
    assert main(["generate", "--prompt", PROMPT, "--seconds", "3", "--policy", "window", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: generation stopped at block 2 of 3 (OutOfMemoryError: CUDA out of memory.); the 1 finished " \
           f"blocks were written to {out}" in err
    assert frames(out) == 13


# ---- a client that leaves mid-run (through the real app) -----------------------------------------



@pytest.fixture(scope="module")
def served(pipe, tmp_path_factory):
    """The app on localhost, generating with the small pipeline; yields (url, workers registered)."""
    import app

    mp = pytest.MonkeyPatch()
    for name in list(os.environ):
        if name.startswith("PACKFORCING_"):
            mp.delenv(name)
    mp.setenv(safety.MIN_SECONDS_ENV, "1")
    mp.setenv(safety.RUNS_DIR_ENV, str(tmp_path_factory.mktemp("served-runs")))
    mp.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    workers = []
    register = studio.RUNS.register
    mp.setattr(studio.RUNS, "register", lambda key, run: (workers.append(run), register(key, run))[1])
    demo = app.build_demo()
    url = launch_local(demo)
    try:
        yield url, workers
    finally:
        demo.close()
        mp.undo()


def test_app_refuses_a_model_outside_the_allow_list(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served[0], verbose=False)
    try:
        for model in ("/etc/passwd", "../../etc", "Wan-AI/Wan2.1-T2V-14B"):
            with pytest.raises(AppError):
                client.predict(prompt=PROMPT, seconds=1, model=model, api_name="/generate")
        out = client.predict(prompt=PROMPT, seconds=1, policy="window", api_name="/generate")
    finally:
        client.close()
    assert "Done" in out[0] and frames(out[2]) == 13


LEAVER = """
import sys, time
from gradio_client import Client
job = Client(sys.argv[1], verbose=False).submit(prompt=sys.argv[2], seconds=30, policy="window", api_name="/generate")
deadline = time.monotonic() + 120
while len(job.outputs()) < 2 and time.monotonic() < deadline:  # "Starting...", then the first block
    time.sleep(0.05)
print("first block", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["cancelled", "killed"])
def test_client_leaving_mid_run_stops_it_and_frees_the_cache(how, served, policies):
    from gradio_client import Client

    url, workers = served
    before = len(workers)
    if how == "cancelled":  # gradio_client's own cancel
        client = Client(url, verbose=False)
        job = client.submit(prompt=PROMPT, seconds=30, policy="window", api_name="/generate")
        deadline = time.monotonic() + 120
        while len(job.outputs()) < 2:
            assert time.monotonic() < deadline and not job.done(), "no block reported"
            time.sleep(0.05)
        job.cancel()
        client.close()
    else:  # the client's process dies: its connections drop without a word
        proc = subprocess.Popen([sys.executable, "-c", LEAVER, url, PROMPT], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "first block"
        finally:
            proc.kill()
            proc.wait(10)
    worker = workers[before]
    assert worker.join(60), "the run went on after its client left"
    final = worker.final
    assert final.kind == "done" and final.stopped and final.blocks_done < final.total_blocks == 30
    assert frames(final.video) == 13 + 16 * (final.blocks_done - 1)  # the partial video is kept
    assert released(policies[-1]) and studio._RUN_LOCK.active == 0
    # the app serves the next request
    client = Client(url, verbose=False)
    out = client.predict(prompt=PROMPT, seconds=1, seed=5, policy="full", api_name="/generate")
    client.close()
    assert "Done" in out[0] and frames(out[2]) == 13


# ---- files: nothing a finished run wrote is lost; expired runs are cleaned up --------------------
def test_finished_runs_files_survive_later_runs_faults_and_cleanup(env, pipe, monkeypatch):
    finished = studio.GenerationWorker(studio.validate_request(PROMPT, 2, 0, "window", {})).run(timeout=120)
    assert finished.kind == "done"
    run_dir = finished.video.parent
    kept = digest(run_dir)
    assert {"video.mp4", "trace.parquet", "trace.csv", "segment_0000.mp4", "segment_0001.mp4"} <= set(kept)
    # a failing run, a stopped run and a successful one afterwards, each in its own fresh directory
    with monkeypatch.context() as m:
        fail_at_block(m, pipe, 1, RuntimeError("boom"))
        failed = studio.GenerationWorker(studio.validate_request(PROMPT, 2, 0, "window", {})).run(timeout=120)
    assert failed.kind == "error" and failed.video.parent != run_dir
    stopped = studio.GenerationWorker(studio.validate_request(PROMPT, 2, 0, "full", {}))
    stopped.stop()
    assert stopped.run(timeout=120).stopped
    again = studio.GenerationWorker(studio.validate_request(PROMPT, 1, 0, "window", {})).run(timeout=120)
    assert len({run_dir, failed.video.parent, stopped.run_dir, again.video.parent}) == 4
    assert studio.cleanup_runs() == 0
    assert digest(run_dir) == kept


def test_cleanup_removes_only_expired_unused_run_directories(env, monkeypatch):
    monkeypatch.setenv(safety.RUN_TTL_ENV, "600")
    root = studio.runs_root()
    assert root == env / "runs"
    old = time.time() - 3600

    def run_dir(name, age=None):
        path = root / f"{studio.RUN_DIR_PREFIX}{name}"
        path.mkdir()
        (path / "video.mp4").write_bytes(b"x")
        if age is not None:
            os.utime(path, (age, age))
        return path

    expired, fresh, busy = run_dir("expired", old), run_dir("fresh"), run_dir("busy", old)
    recent = run_dir("recent", time.time() - 300)  # younger than the TTL
    elsewhere = env / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not a run")
    os.utime(elsewhere, (old, old))
    link = root / f"{studio.RUN_DIR_PREFIX}link"
    link.symlink_to(elsewhere, target_is_directory=True)
    unrelated = root / "other-app-dir"
    unrelated.mkdir()
    os.utime(unrelated, (old, old))
    studio._set_active(busy, True)  # a run is writing there
    try:
        new = studio.new_run_dir()  # starting a run cleans up first
    finally:
        studio._set_active(busy, False)
    assert not expired.exists()
    assert fresh.exists() and recent.exists() and busy.exists() and new.exists()
    assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "not a run" and unrelated.exists()
    monkeypatch.setenv(safety.RUN_TTL_ENV, "60")  # the operator shortens the retention
    assert studio.cleanup_runs() == 2 and not recent.exists() and not busy.exists() and fresh.exists()
