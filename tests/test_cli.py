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
