"""The memory test of every cache policy on the embedded model (`packforcing.world.memory` scenes).

    python -m analysis.evaluate_memory --lengths 30 120 --scenes 3 --out docs/eval/memory

For each memory scene (seeds `SEED_BASE` + i, never drawn in training) the model is prompted with
the scene's colour-free caption ("a square bouncing over a black background"), so whatever colour
it first gives the object can only be kept after an absence through the cache. Every policy of
`memory_specs` generates the same prompt and seed; the ground truth is scored as the reference row.

Budgets (`memory_specs`, 64x64 model: 16 tokens per latent frame, 4 frames per block, 2 compressed
tokens per block): every bounded policy stores 256 tokens with the current block (64) — `window`
12 frames; `sink_window` 4 + 8; `deep_sink` 4 + 4 frames + 64 kept tokens; `packforcing` 4 + 4
frames + an archive of 27 compressed blocks (27 s of history) + the copies of its top 4 + the recent
block's compressed tokens (`PackForcingPolicy.budget_tokens`). The test's absences last 5-8 s:
longer than any recent window here. Writes ``OUT/runs.csv`` (one row per video, appended
as runs finish; ``--resume`` skips done ones), ``OUT/table.md`` (mean per length and policy) and a
frame strip per video in ``OUT/strips``. A video whose object never leaves has no return: its
scores are NaN and ``returns`` says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.evaluate import FPS, PolicySpec, _append, run_one, save_strip, stack_strips
from analysis.memory import memory_score

SEED_BASE = 2_000_000
COLUMNS = ["returns", "colour_kept", "identity_kept"]


def memory_specs(trained_hr: bool = False) -> list[PolicySpec]:
    """The compared settings at equal stored KV (module docstring), plus the top-k ablations (on the
    trained HR+LR compressor when the model has one, else on the LR branch)."""
    pf = dict(sink_frames=4, recent_frames=4, top_k=4, archive_blocks=27)
    comp = "both" if trained_hr else "lr"
    specs = [
        PolicySpec("full", "full"),
        PolicySpec("window (12 frames)", "window", options=dict(window_frames=12)),
        PolicySpec("sink_window (4+8)", "sink_window", options=dict(sink_frames=4, window_frames=8)),
        PolicySpec("deep_sink (4+4, keep 64 tok.)", "deep_sink", options=dict(sink_frames=4, recent_frames=4,
                                                                              keep_tokens=64)),
        PolicySpec("packforcing (LR, top-4 of 27)", "packforcing", "lr", dict(pf)),
    ]
    if trained_hr:
        specs.append(PolicySpec("packforcing (HR+LR, top-4 of 27)", "packforcing", "both", dict(pf)))
    return specs + [
        PolicySpec("  ablation: FIFO mid (recency)", "packforcing", comp, dict(pf, selection="recency")),
        PolicySpec("  ablation: no RoPE adjustment", "packforcing", comp, dict(pf, rope_adjust=False)),
    ]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over scenes per (length, policy): returns, colour_kept, identity_kept (NaN-skipping),
    scenes with at least one return, peak KV MB."""
    rows = []
    for (length, policy), part in runs.groupby(["length_s", "policy"], sort=False):
        rows.append({"length_s": length, "policy": policy, "scenes": len(part),
                     "scenes_with_returns": int((part["returns"] > 0).sum()),
                     "returns": part["returns"].mean(), "colour_kept": part["colour_kept"].mean(),
                     "identity_kept": part["identity_kept"].mean(), "peak_kv_MB": part["peak_kv_MB"].mean()})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table (NaN shown as "–": no return happened)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    for _, r in table.iterrows():
        cells = [f"{r[c]:g}" if c == "length_s" else str(r[c]).strip() if c == "policy" else
                 "–" if pd.isna(r[c]) else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_strip(out: Path, length: float, scene: int, labels: list[str]) -> Path | None:
    """One image: the frame strips of ``scene`` at ``length`` for ``labels`` (top to bottom), as
    ``OUT/<length>s_scene<i>_compare.png`` (written for every scene of a run)."""
    paths = [out / "strips" / f"{int(length)}s_scene{scene}_{_slug(label)}.png" for label in labels]
    return stack_strips(paths, out / f"{int(length)}s_scene{scene}_compare.png")  # strips never saved are left out


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.strip()).strip("-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.evaluate_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=float, nargs="+", default=[30, 120])
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--out", default="docs/eval/memory")
    p.add_argument("--model", default=None, help="tiny-world directory (default: the embedded model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    return p


def main(argv=None) -> int:
    import torch

    from packforcing.tiny_world import TINY_WORLD_DIR, load_tiny_world
    from packforcing.world.memory import memory_caption, memory_scene

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "strips").mkdir(parents=True, exist_ok=True)
    pipe = load_tiny_world(args.model or TINY_WORLD_DIR)
    world = "v2"
    if pipe.height != 64:
        raise SystemExit("error: the memory test's budgets are set for the 64x64 (v2) model")
    specs = memory_specs(trained_hr=pipe.compressor.hr is not None)
    runs_path = out / "runs.csv"
    done = pd.read_csv(runs_path) if (args.resume and runs_path.exists()) else None
    if done is None and runs_path.exists():
        runs_path.unlink()
    for length in args.lengths:
        for i in range(args.scenes):
            seed = SEED_BASE + i
            scene = memory_scene(seed, world=world)
            caption = memory_caption(scene)
            for spec in [None, *specs]:
                label = "ground truth" if spec is None else spec.label
                if done is not None and ((done["length_s"] == length) & (done["policy"] == label)
                                         & (done["seed"] == seed)).any():
                    continue
                if spec is None:
                    frames = 4 * int(round(length)) * 4 - 3
                    video, stats = scene.render(frames, pipe.height, pipe.width, FPS), {"peak_kv_MB": np.nan}
                else:
                    video, stats = run_one(pipe, spec, caption, seed, length)
                score = memory_score(video, scene.background, FPS)
                save_strip(video, out / "strips" / f"{int(length)}s_scene{i}_{_slug(label)}.png", count=12)
                row = {"length_s": length, "policy": label, "seed": seed, "caption": caption,
                       "scene_colour": scene.objects[0].colour, "scene_shape": scene.objects[0].shape,
                       **score, "peak_kv_MB": stats["peak_kv_MB"]}
                _append(runs_path, [row])
                print(f"{length:5.0f} s  {label:40s} returns {row['returns']:2d}  colour kept {row['colour_kept']:.2f}  "
                      f"identity kept {row['identity_kept']:.2f}  first {row['first_colour']} {row['first_shape']}",
                      flush=True)
    for length in args.lengths:
        for i in range(args.scenes):
            compare_strip(out, length, i, ["ground truth", *[spec.label for spec in specs[:6]]])
    table = summarize(pd.read_csv(runs_path))
    (out / "table.md").write_text(f"Command: `python -m analysis.evaluate_memory --lengths "
                                  f"{' '.join(f'{x:g}' for x in args.lengths)} --scenes {args.scenes}`\n\n"
                                  + markdown(table))
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
