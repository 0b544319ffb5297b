"""Benchmark output: text tables, the markdown report, CSV + JSON files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.bench_runs import PHASES


# -- printing / writing ----------------------------------------------------------------------------
def _fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "n/a"
    b = float(b)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def format_summary(summary: pd.DataFrame, device: torch.device) -> str:
    mem_label = "peak GPU mem" if device.type == "cuda" else "RSS peak (process)"
    head = (f"{'run':<32} {'blocks':>6} {'total s':>9} {'blk ref s':>9} {'blk N s':>8} {'N/ref':>6} {'N/ref med5':>10} "
            f"{'tr N/ref':>8} {'fps':>7} {'TFLOP/s':>8} {'ovh %':>6} {'KV final':>10} {'attended':>9} {mem_label:>18}")
    lines = [head, "-" * len(head)]
    for r in summary.itertuples(index=False):
        mem = r.peak_memory_bytes if device.type == "cuda" else r.rss_peak_bytes
        lines.append(
            f"{r.run:<32} {r.blocks:>6} {r.total_s:>9.2f} {r.ref_block_s:>9.3f} {r.last_block_s:>8.3f} "
            f"{r.last_over_ref:>6.2f} {r.last_over_ref_median5:>10.2f} {r.transformer_last_over_ref_median5:>8.2f} "
            f"{r.fps:>7.2f} {r.achieved_tflops:>8.4f} {100 * r.overhead_frac:>6.2f} {_fmt_bytes(r.final_kv_bytes):>10} "
            f"{r.max_attended_tokens:>9} {_fmt_bytes(mem):>18}")
    return "\n".join(lines)


def format_phases(summary: pd.DataFrame) -> str:
    head = f"{'run':<32} " + " ".join(f"{p + ' s':>10}" for p in (*PHASES, "other")) + f" {'total s':>10}"
    lines = [head, "-" * len(head)]
    for r in summary.to_dict("records"):
        lines.append(f"{r['run']:<32} " + " ".join(f"{r[p + '_s']:>10.2f}" for p in (*PHASES, "other"))
                     + f" {r['total_s']:>10.2f}")
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    lines = [f"{'ratio (same run)':<60} {'blocks':>6} {'wall':>7} {'cpu':>7} {'transformer':>11}"]
    for r in rows:
        lines.append(f"{r['what']:<60} {r['blocks']:>6} {r['total_ratio']:>7.3f} {r['cpu_ratio']:>7.3f} "
                     f"{r['transformer_ratio']:>11.3f}")
    return "\n".join(lines)


def format_per_block(blocks: pd.DataFrame, every: int = 10) -> str:
    pick = blocks[(blocks.block == 0) | ((blocks.block + 1) % every == 0)]
    table = pick.pivot(index="block", columns="run", values="seconds")
    table.index = table.index + 1
    return "per-block wall seconds (block numbers 1-based)\n" + table.to_string(float_format=lambda x: f"{x:.3f}")


def _num(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_report(data: dict, every: int = 20) -> str:
    """Markdown tables (summary, phases, ratios, sampled per-block seconds) from a bench JSON."""
    summary = pd.DataFrame(data["summary"])
    blocks = pd.DataFrame(data["blocks"])
    gpu = "cuda" in str(data.get("device", "")).lower() or "nvidia" in str(data.get("device", "")).lower()
    lines = [f"Device: {data['device']}; torch {data['torch']}, {data['threads']} thread(s); commit `{data['commit']}`; "
             f"{data['date']}; pipeline: {data['pipeline']}; interleaved: {data.get('interleaved')}.", "",
             "| run | blocks | total s | block ref s | block N s | N/ref | N/ref (median of 5) | transformer N/ref "
             "(median of 5) | load-normalized N/ref (median of 5) | fps | TFLOP/s (denoise+commit) | "
             "compress+select+rope % | KV final | attended | " + ("peak GPU memory" if gpu else "process RSS peak") + " |",
             "|" + "---|" * 15]
    for r in summary.to_dict("records"):
        mem = r["peak_memory_bytes"] if gpu else r["rss_peak_bytes"]
        lines.append(
            f"| {r['run']} | {r['blocks']} | {r['total_s']:.1f} | {r['ref_block_s']:.3f} (#{r['ref_block']}) | "
            f"{r['last_block_s']:.3f} | {r['last_over_ref']:.2f} | {r['last_over_ref_median5']:.2f} | "
            f"{r['transformer_last_over_ref_median5']:.2f} | {_num(r.get('load_normalized_last_over_ref_median5'))} | "
            f"{r['fps']:.2f} | {r['achieved_tflops']:.4f} | "
            f"{100 * r['overhead_frac']:.2f} | {_fmt_bytes(r['final_kv_bytes'])} | {r['max_attended_tokens']:,} | "
            f"{_fmt_bytes(mem)} |")
    lines += ["", "| run | " + " | ".join(f"{p} s" for p in (*PHASES, "other")) + " | total s |",
              "|" + "---|" * (len(PHASES) + 3)]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['run']} | " + " | ".join(f"{r[p + '_s']:.2f}" for p in (*PHASES, "other"))
                     + f" | {r['total_s']:.1f} |")
    if data.get("ratios"):
        lines += ["", "| ratio (same run, common blocks) | blocks | wall | CPU time | transformer (denoise+commit) |",
                  "|---|---|---|---|---|"]
        for r in data["ratios"]:
            lines.append(f"| {r['what']} | {r['blocks']} | {r['total_ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                         f"{r['transformer_ratio']:.3f} |")
    pick = blocks[(blocks.block == 0) | ((blocks.block + 1) % every == 0) | (blocks.block == 9)]
    table = pick.pivot(index="block", columns="run", values="seconds")
    runs = list(table.columns)
    lines += ["", "| block | " + " | ".join(f"{r} s" for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for b, row in table.iterrows():
        lines.append(f"| {b + 1} | " + " | ".join(f"{row[r]:.3f}" for r in runs) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def write_outputs(out_dir, name: str, blocks: pd.DataFrame, summary: pd.DataFrame, payload: dict) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}_blocks.csv", out / f"{name}_summary.csv", out / f"{name}.json"]
    blocks.to_csv(paths[0], index=False)
    summary.to_csv(paths[1], index=False)
    data = dict(payload)
    data["summary"] = summary.to_dict("records")
    data["blocks"] = blocks.to_dict("list")
    paths[2].write_text(json.dumps(_jsonable(data), indent=1))
    return paths
