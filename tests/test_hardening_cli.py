"""Command-line outputs (issue 16, item 5): unwritable ``--out`` / ``--trace`` and bad sizes refused
before any generation; the mp4 and the trace written to a temporary file and renamed; Ctrl-C,
pressed once or hammered, keeps the partial video *and* the partial trace, whole (ffmpeg runs in a
process group of its own, so the terminal's SIGINT never reaches it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from packforcing.__main__ import main
from packforcing.trace import load_tables

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle bouncing over a navy background"


def cli(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m packforcing generate ...`` in a session of its own (the test plays the terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "packforcing", "generate", "--prompt", PROMPT, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **kwargs)


def frames(path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


@pytest.mark.parametrize("flag, target", [
    ("--out", lambda tmp: "/proc/packforcing-test.mp4"),  # not creatable, even for root
    ("--out", lambda tmp: str(tmp / "a-file" / "v.mp4")),  # a directory that is a file
    ("--trace", lambda tmp: str(tmp / "a-file" / "t.parquet")),
])
def test_unwritable_outputs_are_refused_before_generating(flag, target, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    out = ["--out", str(tmp_path / "v.mp4")] if flag == "--trace" else []
    t0 = time.monotonic()
    proc = cli("--seconds", "60", flag, target(tmp_path), *out)
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=120))
    assert proc.returncode == 2, stderr
    assert f"error: {flag} " in stderr and "cannot be written" in stderr and "Traceback" not in stderr, stderr
    assert "block" not in stderr and not (tmp_path / "v.mp4").exists()  # no generation started
    assert time.monotonic() - t0 < 60  # a 60 s video was not generated first


@pytest.mark.parametrize("value", ["-64", "0", "abc"])
def test_bad_sizes_are_refused_up_front(value, tmp_path):
    proc = cli("--model", str(tmp_path / "no-model"), "--height", value, "--out", str(tmp_path / "v.mp4"))
    _, stderr = (s.decode() for s in proc.communicate(timeout=120))
    assert proc.returncode == 2 and "argument --height: must be a" in stderr and "pixels" in stderr, stderr
    assert "no-model" not in stderr  # refused before the model is looked at
    assert main(["generate", "--prompt", PROMPT, "--width", value, "--out", str(tmp_path / "w.mp4")]) == 2


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch, capsys):
    out, trace = tmp_path / "v.mp4", tmp_path / "t.csv"
    assert main(["generate", "--prompt", PROMPT, "--seconds", "1", "--policy", "window", "--out", str(out),
                 "--trace", str(trace)]) == 0
    before = out.read_bytes(), trace.read_bytes()
    import imageio.v2 as imageio

    real = imageio.get_writer

    class Dying:  # the writer dies after a few frames, as ffmpeg killed mid-file would
        def __init__(self, *a, **kw):
            self.inner, self.n = real(*a, **kw), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def append_data(self, frame):
            self.n += 1
            if self.n == 5:
                raise BrokenPipeError("ffmpeg went away")
            self.inner.append_data(frame)

    monkeypatch.setattr(imageio, "get_writer", Dying)
    capsys.readouterr()
    assert main(["generate", "--prompt", PROMPT, "--seconds", "2", "--policy", "window", "--out", str(out),
                 "--trace", str(trace)]) == 1
    err = capsys.readouterr().err
    assert "error: writing the outputs failed (BrokenPipeError: ffmpeg went away)" in err and "left as they were" in err
    assert (out.read_bytes(), trace.read_bytes()) == before  # the previous outputs, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "v.mp4"]  # no partial file left


@pytest.mark.parametrize("presses", ["once", "hammered"])
def test_ctrl_c_keeps_the_partial_video_and_trace_whole(presses, tmp_path):
    out, trace = tmp_path / "v.mp4", tmp_path / "t.parquet"
    out.write_bytes(b"the previous video")
    proc = cli("--seconds", "40", "--policy", "sink_window", "--out", str(out), "--trace", str(trace))
    err = bytearray()

    def read():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"2/40" not in err:  # tqdm: two blocks done
        assert proc.poll() is None and time.monotonic() < deadline, err.decode(errors="replace")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at the terminal: the whole foreground group
    if presses == "hammered":  # and again, while the finished blocks are being written
        while proc.poll() is None and time.monotonic() < deadline:
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.02)
    assert proc.wait(120) == 130
    reader.join(10)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "interrupted" in text, text
    tables, meta = load_tables(trace)
    blocks = len(tables["blocks"])
    assert 2 <= blocks < 40 and frames(out) == 13 + 16 * (blocks - 1), text  # video and trace agree
    assert f"the {blocks} finished blocks were written to {out} and the trace to {trace}" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet", "v.mp4"]


def test_ffmpeg_runs_in_a_process_group_of_its_own():
    from imageio_ffmpeg import _io

    import packforcing.video as video

    video._patch_imageio_ffmpeg()
    kwargs = _io._popen_kwargs(prevent_sigint=True)
    assert kwargs["process_group"] == 0 and kwargs["preexec_fn"] is None  # no fork handler either
