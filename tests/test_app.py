"""The Gradio app launched in-process on localhost and driven with gradio_client (embedded model)."""

from __future__ import annotations

import time
from pathlib import Path

import imageio_ffmpeg
import pytest


from packforcing.trace import load_tables

PROMPT = "a yellow triangle bouncing over a navy background"
# outputs of /generate, in order
PROGRESS, PREVIEW, VIDEO, TRACE, SUMMARY = range(5)


@pytest.fixture()
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_api_is_named_and_complete(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/compare", "/stop"} <= set(info)
    names = [p["parameter_name"] for p in info["/generate"]["parameters"]]
    assert names[:7] == ["prompt", "seconds", "seed", "randomize_seed", "policy", "compressor", "model"]
    assert {"sink_frames", "top_k", "rope_adjust", "mid_span"} <= set(names)
    policies = info["/generate"]["parameters"][4]["python_type"]["type"]
    assert "packforcing" in policies and "window" in policies


def test_bad_input_is_an_error_then_a_generation_succeeds(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="prompt"):
        client.predict(prompt="   ", api_name="/generate")
    with pytest.raises(AppError, match="multiple"):
        client.predict(prompt=PROMPT, policy="window", window_frames=6, api_name="/generate")
    with pytest.raises(AppError):
        client.predict(prompt=PROMPT, seconds=500, api_name="/generate")
    # the app keeps serving: a 5 s generation returns the final mp4 and the trace files
    t0 = time.perf_counter()
    out = client.predict(prompt=PROMPT, seconds=5, seed=11, policy="packforcing", api_name="/generate")
    print(f"5 s generation through the API: {time.perf_counter() - t0:.1f} s")
    video = Path(out[VIDEO])
    assert video.suffix == ".mp4" and imageio_ffmpeg.count_frames_and_secs(str(video))[0] == 77
    traces = sorted((Path(p) for p in out[TRACE]), key=lambda p: p.suffix)
    assert [p.suffix for p in traces] == [".csv", ".parquet"]
    tables, meta = load_tables(traces[1])
    assert len(tables["blocks"]) == 5 and len(tables["occupancy"]) > 0 and meta["seed"] == 11
    assert "Done" in out[PROGRESS] and "block 5/5" in out[PROGRESS]
    assert out[-1] == 11  # the seed used


def test_stop_through_the_api_keeps_the_partial_video(client):
    job = client.submit(prompt=PROMPT, seconds=10, seed=2, policy="sink_window", api_name="/generate")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2:  # "Starting…", then the first block
        assert time.monotonic() < deadline and not job.done(), "no block reported"
        time.sleep(0.1)
    client.predict(api_name="/stop")
    out = job.result(timeout=60)
    assert "Stopped" in out[PROGRESS]
    frames = imageio_ffmpeg.count_frames_and_secs(str(out[VIDEO]))[0]
    assert 13 <= frames < 157  # a partial 10 s video, at least the first block


def test_compare_two_policies(client):
    out = client.predict(prompt=PROMPT, seconds=5, seed=4, policy="window", policies=["window", "full"],
                         api_name="/compare")
    progress, videos, table = out[0], out[1:-3], out[-2]
    assert "Done" in progress and "window 5/5" in progress and "full 5/5" in progress
    # one video slot per registered policy, in policy_names() order; the two compared ones are filled
    from packforcing import studio

    filled = {p: v for p, v in zip(studio.policy_names(), videos) if isinstance(v, str)}
    assert set(filled) == {"window", "full"}
    assert all(imageio_ffmpeg.count_frames_and_secs(v)[0] == 77 for v in filled.values())
    assert [row[0] for row in table["data"]] == ["window", "full"]


def test_prompt_schedule_through_the_api(client):
    """Two prompts, re-cached at the switch: the trace records the switch and the run completes."""
    table = {"headers": ["seconds", "prompt"], "data": [[3, "a blue square bouncing over a white background"]]}
    out = client.predict(prompt=PROMPT, seconds=5, seed=3, policy="packforcing", schedule=table,
                         prompt_switch="recache", api_name="/generate")
    assert "Done" in out[PROGRESS]
    tables, meta = load_tables(next(p for p in out[TRACE] if p.endswith(".parquet")))
    assert tables["switches"][["block", "mode"]].values.tolist() == [[4, "recache"]]  # 3 s: block 4 starts at 3.81 s
    assert [p["prompt"] for p in meta["prompts"]] == [PROMPT, "a blue square bouncing over a white background"]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="after the video ends"):
        client.predict(prompt=PROMPT, seconds=5, schedule={"headers": ["seconds", "prompt"], "data": [[9, "a red circle"]]},
                       api_name="/generate")


def test_replay_of_a_shipped_example_and_a_foreign_file(client, tmp_path):
    """A shipped 2-minute example replays through the API (every panel gets a value); a foreign Parquet
    file is a clear error and the app keeps serving."""
    import pandas as pd
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from packforcing.studio import replay

    example = replay.examples()[0]
    out = client.predict(trace=handle_file(example["trace_path"]), video=handle_file(example["video_path"]),
                         api_name="/replay")
    assert "Replaying" in out[0] and "120 blocks" in out[0]
    assert all(value is not None for value in out[3:10])  # occupancy … walk-through
    foreign = tmp_path / "sales.parquet"
    pd.DataFrame({"region": ["north"], "revenue": [3.5]}).to_parquet(foreign)
    with pytest.raises(AppError, match="not a PackForcing trace"):
        client.predict(trace=handle_file(str(foreign)), video=None, api_name="/replay")
    out = client.predict(trace=handle_file(example["trace_path"]), video=None, api_name="/replay")
    assert "no video" in out[0]
