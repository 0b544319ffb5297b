"""The command line writes a playable mp4 of the expected length and size, and its trace."""

import imageio.v3 as iio
import pytest

from packforcing.__main__ import main
from packforcing.trace import TraceRecorder


def test_cli_writes_mp4_and_trace(tmp_path, capsys):
    out, trace = tmp_path / "v.mp4", tmp_path / "t.parquet"
    code = main(["generate", "--prompt", "a red circle bouncing over a navy background", "--seconds", "2",
                 "--policy", "packforcing", "--sink-frames", "4", "--recent-frames", "4", "--top-k", "2",
                 "--compressor", "lr", "--out", str(out), "--trace", str(trace)])
    assert code == 0
    video = iio.imread(out)
    from packforcing.embedded import default_pipeline

    pipe = default_pipeline()
    latent_frames = 2 * 4  # 2 s at 16 fps = 2 blocks of 4 latent frames
    assert video.shape == (4 * latent_frames - 3, pipe.height, pipe.width, 3)
    tables = TraceRecorder.load(trace).tables()
    assert list(tables["blocks"]["block"]) == [0, 1]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seconds", "0"], "positive"),
        (["--seconds", "nan"], "positive"),
        (["--seconds", "1000"], "exceeds the maximum"),
        (["--prompt", "   "], "prompt is empty"),
        (["--sink-frames", "3"], "not a multiple"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    base = {"--prompt": "a red circle", "--seconds": "1", "--out": str(tmp_path / "v.mp4")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["generate"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("form", ["flags", "file"])
def test_cli_prompt_schedule_switches_and_records_it(tmp_path, form):
    out, trace = tmp_path / "v.mp4", tmp_path / "t.json"
    prompts = ["0: a red circle bouncing over a black background", "2: a blue square bouncing over a white background"]
    if form == "flags":
        args = [x for p in prompts for x in ("--prompt", p)]
    else:
        (tmp_path / "schedule.txt").write_text("# the demo\n" + "\n".join(prompts) + "\n")
        args = ["--prompt-schedule", str(tmp_path / "schedule.txt")]
    code = main(["generate", *args, "--seconds", "4", "--policy", "sink_window", "--on-switch", "recache",
                 "--out", str(out), "--trace", str(trace)])
    assert code == 0
    loaded = TraceRecorder.load(trace)
    switches = loaded.tables()["switches"]
    assert switches[["block", "prompt_index", "mode", "recached_blocks"]].values.tolist() == [[3, 1, "recache", 3]]  # 2 s: block 3 starts at 2.81 s
    assert [p["prompt"] for p in loaded.meta["prompts"]] == [p.split(": ", 1)[1] for p in prompts]
    assert [p["block"] for p in loaded.meta["prompts"]] == [0, 3]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "5: starts late"], "must start at 0"),
    (["--prompt", "0: a", "--prompt", "9: b"], "after the video ends"),
    (["--prompt-schedule", "missing.txt"], "no such file"),
    (["--prompt", "0: a", "--prompt-schedule", "missing.txt"], "not both"),
    ([], "a prompt is needed"),
])
def test_cli_bad_schedule_is_a_clear_error(tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *args, "--seconds", "2", "--out", str(tmp_path / "v.mp4")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
