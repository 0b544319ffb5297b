"""The Studio's run logic (packforcing/studio.py) without any UI: worker, Stop, validation, compare."""

from __future__ import annotations

import threading

import imageio_ffmpeg
import numpy as np
import pandas as pd
import pytest

from packforcing import studio
from packforcing.cache import POLICIES
from packforcing.trace import empty_tables, load_tables

PROMPT = "a red circle and a blue square bouncing over a dark grey background"


def frame_count(path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def test_five_second_run_writes_video_segments_and_trace(tmp_path):
    request = studio.validate_request(PROMPT, 5, 7, "packforcing", {"top_k": 2})
    assert request.num_blocks == 5 and request.options == {"top_k": 2}
    worker = studio.GenerationWorker(request, tmp_path)
    updates = list(worker.updates(timeout=120))
    blocks, final = updates[:-1], updates[-1]
    assert [u.kind for u in blocks] == ["block"] * 5 and final.kind == "done" and not final.stopped
    assert [u.blocks_done for u in blocks] == [1, 2, 3, 4, 5]
    # per-block preview segments: 13 frames for the first block, 16 after
    assert [frame_count(u.segment) for u in blocks] == [13, 16, 16, 16, 16]
    assert all(u.fps > 0 and u.kv_bytes > 0 for u in blocks)
    assert blocks[-1].progress_text().startswith("block 5/5")
    # the final mp4: 5 blocks = 20 latent frames = 77 pixel frames, in the run directory
    assert final.video == tmp_path / "video.mp4" and frame_count(final.video) == 77
    assert final.frames_done == 77 and final.video_seconds == pytest.approx(77 / 16)
    parquet, csv = final.trace_files
    assert parquet.suffix == ".parquet" and csv.suffix == ".csv"
    for path in (parquet, csv):
        tables, meta = load_tables(path)
        assert meta["policy"] == "packforcing" and meta["seed"] == 7 and meta["stopped"] is False
        assert len(tables["blocks"]) == 5
        for name in ("occupancy", "positions", "timing", "scores"):
            assert len(tables[name]) > 0, name
    assert final.summary()["blocks"] == 5
    assert worker.join(5) and not worker.running


def test_stop_after_first_block_keeps_partial_video_and_frees_the_worker(tmp_path):
    request = studio.validate_request(PROMPT, 5, 0, "sink_window", {})
    worker = studio.GenerationWorker(request, tmp_path).start()
    seen = []
    for update in worker.updates(timeout=120):
        seen.append(update)
        if update.kind == "block" and not worker.stop_requested:
            worker.stop()  # Stop as soon as the first block is out
    final = seen[-1]
    assert final.kind == "done" and final.stopped
    # ended within one block: at most the block in progress when Stop came is finished
    assert [u.kind for u in seen] in (["block", "done"], ["block", "block", "done"])
    assert final.blocks_done == len(seen) - 1 < final.total_blocks
    assert frame_count(final.video) == 13 + 16 * (final.blocks_done - 1)
    tables, meta = load_tables(final.trace_files[0])
    assert meta["stopped"] is True and len(tables["blocks"]) == final.blocks_done
    assert worker.join(10) and not worker.running
    assert studio._RUN_LOCK.acquire(blocking=False)  # the next generation can start at once
    studio._RUN_LOCK.release()


def _fake_stream(n_ok: int, fail: bool = False, frames: int = 4):
    """A stand-in for the GPU generator: ``n_ok`` tiny blocks, then optionally an error."""
    closed = threading.Event()

    def stream(request):
        try:
            for i in range(n_ok):
                tables = empty_tables()
                tables["blocks"] = pd.DataFrame({"block": [i], "seconds": [0.01], "latent_frames": [4 * (i + 1)],
                                                 "video_seconds": [0.25], "kv_tokens": [10 * (i + 1)],
                                                 "kv_bytes": [1024 * (i + 1)], "peak_memory_bytes": [None]}
                                                ).astype(tables["blocks"].dtypes.to_dict())
                yield studio.DeviceBlock(i, np.full((frames, 16, 16, 3), 40 * i, np.uint8), 0.01, tables,
                                         {"policy": request.policy})
            if fail:
                raise RuntimeError("device fell over")
        finally:
            closed.set()

    stream.closed = closed
    return stream


def test_error_mid_run_is_reported_and_partial_video_kept(tmp_path):
    request = studio.validate_request(PROMPT, 5, 0, "full", {})
    stream = _fake_stream(2, fail=True)
    final = studio.GenerationWorker(request, tmp_path, stream_fn=stream).run(timeout=30)
    assert final.kind == "error" and "device fell over" in final.message
    assert final.blocks_done == 2 and frame_count(final.video) == 8
    assert len(load_tables(final.trace_files[0])[0]["blocks"]) == 2
    assert stream.closed.is_set()


@pytest.mark.parametrize("args, message", [
    (dict(prompt="   "), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(prompt="x" * (studio.MAX_PROMPT_CHARS + 1)), "too long"),
    (dict(seconds=2), "between 5 and 120"),
    (dict(seconds=121), "PACKFORCING_MAX_SECONDS"),
    (dict(seconds="soon"), "number of seconds"),
    (dict(seconds=float("nan")), "between"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(policy="nope"), "Unknown cache policy"),
    (dict(policy="window", options={"window_frames": 6}), "multiple"),
    (dict(options={"top_k": 2.5}), "whole number"),
    (dict(options={"top_k": 1000}), "at most"),
    (dict(options={"mid_span": "wide"}), "one of"),
    (dict(options={"rope_adjust": "yes"}), "true or false"),
    (dict(compressor_mode="mp3"), "compressor"),
    (dict(model="wan-14b"), "unknown model"),
])
def test_bad_inputs_raise_clear_errors(args, message):
    kwargs = dict(prompt=PROMPT, seconds=5, seed=0, policy="packforcing", options={})
    kwargs.update(args)
    with pytest.raises(studio.StudioError, match=message):
        studio.validate_request(**kwargs)


def test_validation_normalises_inputs(monkeypatch):
    req = studio.validate_request(f"  {PROMPT}\n", 5.0, 3.0, "window", {"window_frames": 8.0, "top_k": 3})
    assert req.prompt == PROMPT and req.seed == 3 and req.options == {"window_frames": 8}  # foreign knobs dropped
    assert req.compressor_mode is None  # only compressing policies take a compressor branch
    assert studio.validate_request(PROMPT, 5, 0, "full", randomize_seed=True).seed <= studio.MAX_SEED
    monkeypatch.setenv(studio.MAX_SECONDS_ENV, "300")
    assert studio.validate_request(PROMPT, 240, 0, "window").num_blocks == 240
    assert studio.prompt_warning(PROMPT) is None
    assert "purple" in studio.prompt_warning("a purple dog")


def test_policy_list_and_knobs_follow_the_registry():
    assert set(studio.policy_names()) == set(POLICIES) and studio.policy_names()[0] == "packforcing"
    specs = studio.knob_specs()
    for policy in POLICIES:
        knobs = studio.policy_knobs(policy)
        assert set(knobs) <= set(specs)
        studio.validate_request(PROMPT, 5, 0, policy, knobs)  # the defaults are valid
    assert {"sink_frames", "recent_frames", "top_k", "rope_adjust", "mid_span"} <= set(studio.policy_knobs("packforcing"))
    assert set(studio.policy_knobs("window")) == {"window_frames"}
    assert studio.policy_compresses("packforcing") and not studio.policy_compresses("window")


def test_gpu_duration_grows_with_length():
    durations = [studio.gpu_duration(s) for s in (5, 30, 60, 120, 10_000)]
    assert durations == sorted(durations) and durations[0] >= 20 and durations[-1] == studio.GPU_MAX_DURATION_S
    assert studio.gpu_duration(120) < studio.GPU_MAX_DURATION_S


def test_compare_runs_policies_in_turn_and_stops(tmp_path):
    base = studio.validate_request(PROMPT, 5, 1, "packforcing", {"top_k": 4})
    with pytest.raises(studio.StudioError, match="at least two"):
        studio.CompareRun(base, ["window"])
    stop_requested, fake = threading.Event(), _fake_stream(3)

    def stream(request):  # "window" waits after its first block until the test has pressed Stop,
        for i, block in enumerate(fake(request)):  # so a fast generator cannot finish first
            yield block
            if request.policy == "window" and i == 0:
                stop_requested.wait(10)

    run = studio.CompareRun(base, ["packforcing", "window", "full"], options={"packforcing": {"top_k": 4}},
                            run_dir=tmp_path, stream_fn=stream)
    assert run.requests["packforcing"].options == {"top_k": 4} and run.requests["window"].seed == 1
    seen = []
    for policy, update in run.updates(timeout=30):
        seen.append((policy, update.kind))
        if policy == "window" and update.kind == "block":
            run.stop()  # stops "window" after this block and skips "full"
            stop_requested.set()
    assert set(run.results) == {"packforcing", "window"}
    assert not run.results["packforcing"].stopped and run.results["window"].stopped
    assert ("full", "block") not in seen
    assert set(run.blocks_by_policy()) == {"packforcing", "window"}


def test_registry_routes_stop_to_the_session():
    class Run:
        stopped = False

        def stop(self):
            self.stopped = True

    reg, a, b = studio.RunRegistry(), Run(), Run()
    assert not reg.stop("s1")
    reg.register("s1", a)
    reg.register("s2", b)
    assert reg.stop("s1") and a.stopped and not b.stopped
    reg.unregister("s1", a)
    assert "s1" not in reg and not reg.stop("s1")
