"""Command line: ``python -m packforcing generate --prompt ... --seconds ... --policy ... --out video.mp4``.

With no ``--model`` it uses the embedded default model (see README). ``--model`` takes a
diffusers-format Wan2.1 directory or cached hub id, optionally with a Self-Forcing ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

POLICY_NAMES = ["packforcing", "sink_window", "window", "deep_sink", "full"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m packforcing", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate a video",
        description="Generate a video. Without --model: the embedded tiny model (random weights for now).",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seconds", type=float, default=5.0, help="video length in seconds (default 5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--policy", default="packforcing", choices=POLICY_NAMES)
    gen.add_argument("--out", default="video.mp4", help="output mp4 path")
    gen.add_argument("--model", default=None,
                     help="diffusers-format Wan2.1 directory or hub id (local cache only); default: embedded model")
    gen.add_argument("--checkpoint", default=None, help="Self-Forcing .pt replacing the transformer weights of --model")
    gen.add_argument("--compressor-weights", default=None, help="trained compressor .safetensors for --model")
    gen.add_argument("--height", type=int, default=480, help="with --model: video height in pixels")
    gen.add_argument("--width", type=int, default=832, help="with --model: video width in pixels")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--max-seconds", type=float, default=None, help="raise the duration limit (default 120)")
    gen.add_argument("--sink-frames", type=int, default=None, help="latent frames kept as sink")
    gen.add_argument("--recent-frames", type=int, default=None, help="latent frames kept at full resolution")
    gen.add_argument("--window-frames", type=int, default=None, help="window/sink_window: latent frames kept")
    gen.add_argument("--top-k", type=int, default=None, help="packforcing: mid blocks attended")
    gen.add_argument("--archive-blocks", type=int, default=None, help="packforcing: mid archive capacity")
    gen.add_argument("--compressor", default=None, choices=["lr", "hr", "both"])
    gen.add_argument("--selection", default=None, choices=["topk", "recency"])
    gen.add_argument("--mid-span", default=None, choices=["span", "compressed", "single"])
    gen.add_argument("--no-rope-adjust", action="store_true")
    gen.add_argument("--trace", default=None, help="write the trace (.parquet, .csv or .json)")
    return parser


def policy_options(args) -> dict:
    names = {
        "sink_frames": args.sink_frames, "recent_frames": args.recent_frames, "window_frames": args.window_frames,
        "top_k": args.top_k, "archive_blocks": args.archive_blocks, "selection": args.selection,
        "mid_span": args.mid_span,
    }
    options = {k: v for k, v in names.items() if v is not None}
    if args.no_rope_adjust:
        options["rope_adjust"] = False
    return options


def generate(args) -> int:
    from .pipeline import Pipeline, to_uint8, write_video
    from .trace import NullRecorder, TraceRecorder

    try:
        if args.model is not None:
            import torch

            dtype = torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32
            pipe = Pipeline.from_pretrained(args.model, args.checkpoint, args.compressor_weights, args.height,
                                            args.width, device=args.device, dtype=dtype)
        else:
            pipe = Pipeline.default()
    except (OSError, ValueError) as err:  # missing/corrupted weights, bad sizes
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_seconds is not None:
        pipe.max_seconds = args.max_seconds
    recorder = TraceRecorder() if args.trace else NullRecorder()
    try:
        blocks = pipe.stream(
            args.prompt, args.seconds, policy=args.policy, seed=args.seed, recorder=recorder,
            compressor_mode=args.compressor, **policy_options(args),
        )
        total = pipe.num_blocks(args.seconds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frames, t0 = [], time.perf_counter()
    with tqdm(total=total, unit="block", desc=f"{args.policy}") as bar:
        for block in blocks:
            frames.append(to_uint8(block.pixels))
            bar.set_postfix(kv_MB=f"{_kv_mb(recorder, block):.1f}")
            bar.update(1)
    import numpy as np

    video = np.concatenate(frames)
    path = write_video(video, args.out, fps=pipe.fps)
    seconds = time.perf_counter() - t0
    print(f"wrote {path} ({len(video)} frames, {len(video) / pipe.fps:.2f} s of video) in {seconds:.1f} s")
    if args.trace:
        print(f"trace: {recorder.save(args.trace)}")
        summary = recorder.summary()
        print(f"peak KV tokens per layer: {summary.get('peak_kv_tokens')}, peak KV bytes: {summary.get('peak_kv_bytes')}")
    return 0


def _kv_mb(recorder, block) -> float:
    if recorder.enabled:
        blocks = recorder.tables()["blocks"]
        if len(blocks):
            return float(blocks["kv_bytes"].iloc[-1]) / 2**20
    return float("nan")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
