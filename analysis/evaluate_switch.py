"""Prompt switches, ``keep`` against ``recache``: how fast the video follows the new prompt, and what
re-caching costs. Held-out prompt pairs and seeds of the embedded model, one switch mid-video.

    PYTHONPATH=. .venv/bin/python -m analysis.evaluate_switch --out docs/eval/switch

Per run, over the frames after the switch (pixel frames from the first frame of the switch block):

- ``bg_follow_s``: seconds until the frame background (`analysis.metrics.frame_table`) is within
  60 RGB of the new prompt's background for 16 frames in a row (NaN: never within the video);
- ``bg_match_5s``: share of the first 5 s of frames whose background is within 60 RGB of it;
- ``fidelity_5s``: colour fidelity of the new prompt's objects over those 5 s (`prompt_fidelity`);
- ``old_colour_area_5s``: mean share of pixels in colours only the old prompt named;
- ``switch_s`` (wall seconds of the switch: the re-cache, from the trace) and ``block_s`` (the mean
  block), both measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.metrics import frame_table, prompt_colours, prompt_fidelity
from packforcing.world import BACKGROUNDS, parse_caption

FPS, TOL, HOLD = 16, 60.0, 16
def pairs():
    """(before, after) prompt pairs from the held-out captions of world v2 (backgrounds differ)."""
    from packforcing.training.v2 import HELDOUT_V2

    return [(HELDOUT_V2[i], HELDOUT_V2[i + 1]) for i in range(0, len(HELDOUT_V2) - 1, 2)]


def seeds():
    """Held-out seeds (the evaluation range of world v2, past the ones `analysis.evaluate` uses)."""
    from packforcing.training.v2 import EVAL_SEED_BASE_V2

    return (EVAL_SEED_BASE_V2 + 50, EVAL_SEED_BASE_V2 + 51)


def switch_metrics(video: np.ndarray, before: str, after: str, start: int, fps: float = FPS) -> dict:
    """The module docstring's metrics for ``video`` uint8 [T, H, W, 3] switched at pixel frame ``start``."""
    tail = video[start:]
    background = np.array(BACKGROUNDS[parse_caption(after)[1]], dtype=float)
    frames = frame_table(tail, after, TOL, fps)
    close = np.linalg.norm(frames[["bg_r", "bg_g", "bg_b"]].to_numpy() - background, axis=1) <= TOL
    run = np.convolve(close.astype(int), np.ones(HOLD, dtype=int), "valid")  # frames within, per window of HOLD
    follow = np.flatnonzero(run == HOLD)
    window = tail[: int(5 * fps)]
    old_only = {k: v for k, v in prompt_colours(before).items() if k not in prompt_colours(after)}
    old_area = float(frame_table(window, old_only, TOL, fps).filter(like="area_").sum(axis=1).mean()) \
        if old_only else 0.0
    return {"bg_follow_s": follow[0] / fps if len(follow) else np.nan,
            "bg_match_5s": float(close[: int(5 * fps)].mean()),
            "fidelity_5s": float(prompt_fidelity(window, after, fps, window_s=5.0)["fidelity"].iloc[0]),
            "old_colour_area_5s": old_area}


def run(pipe, before: str, after: str, seed: int, mode: str, seconds: float, switch_at: float,
        policy: str = "packforcing") -> dict:
    from packforcing.schedule import PromptSchedule
    from packforcing.trace import TraceRecorder
    from packforcing.video import to_uint8

    schedule = PromptSchedule(((0.0, before), (switch_at, after)))
    recorder = TraceRecorder()
    video = np.concatenate([to_uint8(b.pixels) for b in pipe.stream(schedule, seconds, policy, seed, recorder,
                                                                     prompt_switch=mode)])
    tables = recorder.tables()
    switch = tables["switches"].iloc[0]
    start = int(round(switch["video_seconds"] * pipe.fps))
    return {"policy": policy, "mode": mode, "seed": seed, "before": before, "after": after,
            "switch_block": int(switch["block"]), "switch_s": float(switch["seconds"]),
            "block_s": float(tables["blocks"]["seconds"].mean()), **switch_metrics(video, before, after, start),
            "video": video, "start": start}


def markdown(table: pd.DataFrame) -> str:
    """A plain Markdown table (numbers as they are)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join("–" if pd.isna(v) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from analysis.evaluate import save_strip
    from packforcing.embedded import default_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/eval/switch"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--switch-at", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = default_pipeline()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, (before, after) in enumerate(pairs()[: args.pairs]):
        for seed in seeds():
            for mode in ("keep", "recache"):
                row = run(pipe, before, after, seed, mode, args.seconds, args.switch_at)
                video, start = row.pop("video"), row.pop("start")
                if seed == seeds()[0]:
                    save_strip(video[max(0, start - FPS):start + 5 * FPS], args.out / f"pair{p}_{mode}.png")
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                       if k not in ("before", "after")}, flush=True)
    runs = pd.DataFrame(rows)
    runs.to_csv(args.out / "runs.csv", index=False)
    table = runs.groupby("mode")[["bg_follow_s", "bg_match_5s", "fidelity_5s", "old_colour_area_5s", "switch_s",
                                  "block_s"]].mean().round(3)
    table["runs"] = runs.groupby("mode").size()
    (args.out / "summary.md").write_text(
        f"Command: `PYTHONPATH=. .venv/bin/python -m analysis.evaluate_switch --out {args.out}` "
        f"({args.seconds:g} s videos, switch at {args.switch_at:g} s, {len(runs) // 2} runs per mode, policy "
        f"packforcing; means)\n\n" + markdown(table.reset_index()) + "\n")
    print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
