"""Issue 15 item 2: the disk stays bounded — run directories and Gradio's cache under a cap, oldest
finished runs removed first, never one in use — and a full disk ends a run with a clear message
while the server keeps serving."""

from __future__ import annotations

import errno
import os
import time

import numpy as np

from packforcing import safety, studio
from packforcing.studio import runs, worker
from tests.test_studio import PROMPT, _fake_stream

MiB = 2**20


def _run_dir(root, name: str, age_s: float, mib: float = 1.0):
    path = root / f"{runs.RUN_DIR_PREFIX}{name}"
    path.mkdir()
    (path / "video.mp4").write_bytes(b"\0" * int(mib * MiB))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _cache_entry(cache, index: int, age_s: float, mib: float = 1.0):
    path = cache / f"{index:064x}"
    path.mkdir(parents=True)
    (path / "video.mp4").write_bytes(b"\0" * int(mib * MiB))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_cap_removes_the_oldest_finished_runs_first_and_never_one_in_use(tmp_path):
    root, cache = tmp_path / "runs", tmp_path / "gradio"
    root.mkdir()
    oldest, in_use, middle, newest = (_run_dir(root, n, age) for n, age in
                                      (("a", 400), ("b", 300), ("c", 200), ("d", 100)))
    stale_copy, fresh_copy = _cache_entry(cache, 1, 500), _cache_entry(cache, 2, 5)
    other = cache / "not-a-cache-entry"
    other.mkdir()
    (other / "keep.bin").write_bytes(b"\0" * MiB)
    (root / f"{runs.RUN_DIR_PREFIX}link").symlink_to(newest)
    runs._set_active(in_use, True)
    try:
        removed = runs.enforce_disk_cap(root, cap_bytes=int(3.5 * MiB), cache_dir=cache)  # 6 MiB counted
    finally:
        runs._set_active(in_use, False)
    assert removed == 3
    assert not oldest.exists() and not middle.exists() and not stale_copy.exists()  # oldest runs, then old copies
    assert in_use.exists() and newest.exists() and fresh_copy.exists() and other.exists()
    assert (root / f"{runs.RUN_DIR_PREFIX}link").is_symlink()
    # under the cap nothing goes
    assert runs.enforce_disk_cap(root, cap_bytes=100 * MiB, cache_dir=cache) == 0 and newest.exists()


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(safety.DISK_CAP_MB_ENV, raising=False)
    assert safety.disk_cap_bytes() == 2048 * MiB
    monkeypatch.setenv(safety.DISK_CAP_MB_ENV, "50")
    assert safety.disk_cap_bytes() == 50 * MiB
    monkeypatch.setenv(safety.DISK_CAP_MB_ENV, "-1")  # invalid: the default, with a warning
    assert safety.disk_cap_bytes() == 2048 * MiB


def test_a_full_disk_ends_the_run_with_a_clear_message_and_the_next_run_is_served(tmp_path, monkeypatch):
    real_write = worker.write_video
    calls = {"n": 0}

    def write_until_full(frames, path, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(frames, path, **kwargs)

    monkeypatch.setattr(worker, "write_video", write_until_full)
    request = studio.validate_request(PROMPT, 5, 0, "full", {})
    final = studio.GenerationWorker(request, tmp_path / "full", stream_fn=_fake_stream(3)).run(timeout=30)
    assert final.kind == "error" and "disk is full" in final.message and str(tmp_path) not in final.message
    monkeypatch.setattr(worker, "write_video", real_write)
    again = studio.GenerationWorker(request, tmp_path / "ok", stream_fn=_fake_stream(2)).run(timeout=30)
    assert again.kind == "done" and again.video is not None and np.isfinite(again.elapsed)
