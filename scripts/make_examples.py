"""The Studio's instant examples: 2-minute runs of the embedded model, one per cache policy (same
prompt and seed) plus one prompt schedule, each a video and its trace, replayed without a model.

    PYTHONPATH=. .venv/bin/python scripts/make_examples.py          # ~8 min on one CPU thread

Writes ``assets/examples/<name>/{video.mp4, trace.parquet}`` and ``assets/examples/index.json``
(what each example is, its size, and the fingerprint of the model that made it: a test fails when
the embedded model changes and the examples were not made again). Run it after every model change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from packforcing.embedded import default_pipeline
from packforcing.schedule import PromptSchedule
from packforcing.tiny_world import TINY_WORLD_DIR
from packforcing.trace import TraceRecorder
from packforcing.video import to_uint8, write_video

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "examples"
PROMPT = "a red circle and a blue square bouncing over a dark grey background"
SCHEDULE = PromptSchedule.from_items([
    "0: a red circle and a blue square bouncing over a dark grey background",
    "40: a yellow triangle bouncing over a navy background",
    "80: a green square and a white circle bouncing over a black background",
])
SEED, SECONDS = 0, 120.0
EXAMPLES = [  # (name, label, policy, prompt or schedule, prompt_switch)
    ("packforcing", "PackForcing (sink + top-k compressed mid + recent)", "packforcing", PROMPT, None),
    ("sink_window", "Sink + window", "sink_window", PROMPT, None),
    ("window", "Window", "window", PROMPT, None),
    ("deep_sink", "Deep sink", "deep_sink", PROMPT, None),
    ("full", "Full cache (unbounded)", "full", PROMPT, None),
    ("packforcing_schedule", "PackForcing, three prompts, re-cached at each switch", "packforcing", SCHEDULE,
     "recache"),
]


def model_fingerprint(path: Path = TINY_WORLD_DIR) -> str:
    """sha256 over the embedded model's weight files (names and bytes), 16 hex digits."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".safetensors", ".json"):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def make(name, label, policy, prompt, switch, pipe, out: Path, seconds: float = SECONDS) -> dict:
    recorder = TraceRecorder()
    frames, t0 = [], time.perf_counter()
    for block in pipe.stream(prompt, seconds, policy, SEED, recorder, prompt_switch=switch):
        frames.append(to_uint8(block.pixels))
    elapsed = time.perf_counter() - t0
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_video(np.concatenate(frames), folder / "video.mp4", fps=pipe.fps, quality=5)  # small files
    recorder.meta.update(example=name)
    recorder.save(folder / "trace.parquet")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: {len(frames)} blocks in {elapsed:.1f} s, {size / 2**20:.2f} MiB", flush=True)
    schedule = prompt if isinstance(prompt, PromptSchedule) else PromptSchedule.single(prompt)
    return dict(name=name, label=label, policy=policy, prompts=schedule.to_text(), prompt_switch=switch or "keep",
                seed=SEED, seconds=seconds, video=f"{name}/video.mp4", trace=f"{name}/trace.parquet", bytes=size,
                generation_seconds=round(elapsed, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", default=None, help="example names to (re)make")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="video length (a quick check: fewer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = default_pipeline()
    index_path = args.out / "index.json"
    previous = json.loads(index_path.read_text())["examples"] if index_path.exists() and args.only else []
    entries = {e["name"]: e for e in previous}
    for name, label, policy, prompt, switch in EXAMPLES:
        if args.only and name not in args.only:
            continue
        shutil.rmtree(args.out / name, ignore_errors=True)
        entries[name] = make(name, label, policy, prompt, switch, pipe, args.out, args.seconds)
    order = [e[0] for e in EXAMPLES]
    examples = sorted(entries.values(), key=lambda e: order.index(e["name"]))
    total = sum(e["bytes"] for e in examples)
    index = {"model": pipe.name, "model_fingerprint": model_fingerprint(), "total_bytes": total,
             "command": "PYTHONPATH=. .venv/bin/python scripts/make_examples.py", "examples": examples}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {index_path} ({len(examples)} examples, {total / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
