"""Soak test: many consecutive generations in one process, resident memory after each.

    .venv/bin/python scripts/soak.py                       # 50 runs, 1-10 s, every policy
    .venv/bin/python scripts/soak.py --runs 80 --csv runs/soak.csv --tolerance 0.05

Runs the Space's own generation path (``studio.validate_request`` + ``studio.GenerationWorker``:
per-block preview segments, final mp4, Parquet/CSV trace in a per-run directory) with the embedded
model, cycling through the cache policies and their knobs with video lengths drawn from
[--min-seconds, --max-seconds]. After each run it records the resident set size (``/proc/self/statm``,
after ``gc.collect()``), prints a table, writes a CSV and checks that the memory after the last run
is within ``--tolerance`` (default 5 %) of the memory after the fifth (exit code 1 otherwise).
Not part of the default test run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (policy, options) cycled through; the knobs vary too (zero sink / top-k ablations included)
PLANS = [
    ("packforcing", {}),
    ("sink_window", {}),
    ("window", {"window_frames": 8}),
    ("deep_sink", {}),
    ("full", {}),
    ("packforcing", {"sink_frames": 0, "top_k": 1}),
    ("packforcing", {"top_k": 0, "compressor": "lr"}),
    ("sink_window", {"sink_frames": 0, "window_frames": 4}),
    ("deep_sink", {"keep_tokens": 64}),
    ("packforcing", {"recent_frames": 8, "top_k": 4, "mid_span": "single"}),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=int, default=1)
    parser.add_argument("--max-seconds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seeds the lengths and generation seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--csv", default=str(ROOT / "runs" / "soak.csv"), help="per-run table (default runs/soak.csv, git-ignored)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative RSS change, run 5 -> last")
    parser.add_argument("--keep-runs", action="store_true", help="keep the per-run directories")
    args = parser.parse_args(argv)
    if args.runs < 6:
        parser.error("--runs must be at least 6 (memory is compared with the fifth run)")
    if not 1 <= args.min_seconds <= args.max_seconds:
        parser.error("need 1 <= --min-seconds <= --max-seconds")
    return args


def lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """``n`` video lengths in [lo, hi], both ends included at least once."""
    rng = random.Random(seed)
    out = [rng.randint(lo, hi) for _ in range(n)]
    out[1], out[2] = lo, hi
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    runs_root = Path(tempfile.mkdtemp(prefix="packforcing-soak-"))
    os.environ.update({"PACKFORCING_MIN_SECONDS": str(args.min_seconds),
                       "PACKFORCING_MAX_SECONDS": str(max(args.max_seconds, 5)),
                       "PACKFORCING_RUNS_DIR": str(runs_root)})
    import torch

    torch.set_num_threads(args.threads)
    from packforcing import studio

    pipe = studio.get_pipeline(studio.DEFAULT_MODEL)
    print(f"model: {pipe.name}, {pipe.width}x{pipe.height}, {args.runs} runs, torch threads {args.threads}, "
          f"RSS at start {rss_bytes() / 2**20:.1f} MiB", flush=True)
    rng = random.Random(args.seed)
    rows, t_start = [], time.perf_counter()
    header = f"{'run':>4} {'policy':<12} {'seconds':>7} {'blocks':>6} {'frames':>6} {'result':<6} " \
             f"{'wall s':>7} {'peak KV MB':>10} {'RSS MiB':>8}"
    print(header, flush=True)
    try:
        for i, seconds in enumerate(lengths(args.runs, args.min_seconds, args.max_seconds, args.seed)):
            policy, options = PLANS[i % len(PLANS)]
            options = dict(options)
            compressor = options.pop("compressor", None)
            request = studio.validate_request("a red circle and a blue square bouncing over a dark grey background",
                                              seconds, rng.randrange(2**31), policy, options, compressor)
            t0 = time.perf_counter()
            final = studio.GenerationWorker(request).run(timeout=900)
            wall = time.perf_counter() - t0
            peak_kv = final.tables["blocks"]["kv_bytes"].max() / 2**20 if len(final.tables["blocks"]) else 0.0
            ok = final.kind == "done" and not final.stopped and final.blocks_done == request.num_blocks
            video_dir = final.video.parent if final.video else None
            del final
            gc.collect()
            rss = rss_bytes()
            row = dict(run=i + 1, policy=policy, options=str(options), seconds=seconds, blocks=request.num_blocks,
                       frames=16 * request.num_blocks - 3, result="ok" if ok else "FAIL", wall_s=round(wall, 2),
                       peak_kv_mb=round(float(peak_kv), 3), rss_mib=round(rss / 2**20, 2), rss_bytes=rss)
            rows.append(row)
            print(f"{row['run']:>4} {policy:<12} {seconds:>7} {row['blocks']:>6} {row['frames']:>6} "
                  f"{row['result']:<6} {wall:>7.2f} {row['peak_kv_mb']:>10.3f} {row['rss_mib']:>8.2f}", flush=True)
            if video_dir is not None and not args.keep_runs:
                shutil.rmtree(video_dir, ignore_errors=True)  # disk, not memory: keep /tmp small
    finally:
        if not args.keep_runs:
            shutil.rmtree(runs_root, ignore_errors=True)
        if rows:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    fifth, last = rows[4]["rss_bytes"], rows[-1]["rss_bytes"]
    change = (last - fifth) / fifth
    peak = max(rows, key=lambda r: r["rss_bytes"])
    failures = [r["run"] for r in rows if r["result"] != "ok"]
    print(f"\n{len(rows)} generations in {time.perf_counter() - t_start:.0f} s; failures: {failures or 'none'}")
    print(f"RSS after run 5: {fifth / 2**20:.2f} MiB; after run {len(rows)}: {last / 2**20:.2f} MiB; "
          f"change {change:+.2%} (tolerance ±{args.tolerance:.0%}); peak {peak['rss_mib']:.2f} MiB after run "
          f"{peak['run']}")
    print(f"table: {args.csv}")
    within = abs(change) <= args.tolerance
    print("PASS" if within and not failures else "FAIL")
    return 0 if within and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
