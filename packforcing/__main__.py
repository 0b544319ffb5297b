"""Command line: ``python -m packforcing generate --prompt ... --seconds ... --policy ... --out video.mp4``.

With no ``--model`` it uses the embedded default model (see README). ``--model`` takes a
diffusers-format Wan2.1 directory or cached hub id, optionally with a Self-Forcing ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

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
    gen.add_argument("--prompt", action="append", default=None,
                     help="the prompt; repeat as --prompt 'T:text' to change it at T seconds (e.g. --prompt "
                          "'0:a red circle…' --prompt '20:a blue square…')")
    gen.add_argument("--prompt-schedule", default=None, metavar="FILE",
                     help="a text file of 'SECONDS: prompt' lines (instead of --prompt)")
    gen.add_argument("--on-switch", default=None, choices=["keep", "recache"],
                     help="at a prompt switch keep the cache as it is (default) or re-cache it under the new prompt")
    gen.add_argument("--seconds", type=float, default=5.0, help="video length in seconds (default 5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--policy", default="packforcing", choices=POLICY_NAMES)
    gen.add_argument("--out", default="video.mp4", help="output mp4 path")
    gen.add_argument("--model", default=None,
                     help="'self-forcing' (Self-Forcing DMD on Wan2.1-T2V-1.3B, from the local Hugging Face cache), "
                          "or a diffusers-format Wan2.1 directory or hub id (local cache only); default: embedded model")
    gen.add_argument("--checkpoint", default=None, help="Self-Forcing .pt replacing the transformer weights of --model")
    gen.add_argument("--compressor-weights", default=None, help="trained compressor .safetensors (python -m packforcing.training.distill)")
    gen.add_argument("--height", type=pixels, default=480, help="with --model: video height in pixels")
    gen.add_argument("--width", type=pixels, default=832, help="with --model: video width in pixels")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--max-seconds", type=float, default=None, help="raise the duration limit (default 120)")
    gen.add_argument("--compressor", default=None, choices=["lr", "hr", "both"])
    add_policy_flags(gen)
    gen.add_argument("--trace", default=None, help="write the trace (.parquet, .csv or .json)")
    return parser


def pixels(text: str) -> int:
    """An argparse type: a positive whole number of pixels (checked before any model is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {value}")
    return value


def policy_fields() -> dict:
    """name -> (config field, policies using it) for every knob of every policy's config dataclass
    (the one source of names, limits and help)."""
    from .cache import POLICIES

    fields: dict = {}
    for cls in POLICIES.values():
        for f in cls.config_class.knobs():
            fields.setdefault(f.name, (f, []))[1].append(cls.name)
    return fields


def add_policy_flags(parser) -> None:
    """One flag per config field: ``--sink-frames N``, ``--mid-span CHOICE``, ``--no-rope-adjust``…"""
    from .cache.config import knob_kind

    for name, (f, users) in policy_fields().items():
        flag, meta, kind = "--" + name.replace("_", "-"), f.metadata, knob_kind(f)
        unit = f" ({meta['unit']})" if meta.get("unit") else ""
        help_text = f"{', '.join(users)}: {meta.get('help', '')}{unit}"
        if kind == "bool":
            on = f.default is not False
            parser.add_argument(("--no-" if on else "--") + name.replace("_", "-"), dest=name, action="store_const",
                                const=not on, default=None, help=help_text)
        elif kind == "choice":
            parser.add_argument(flag, dest=name, default=None, choices=list(meta["choices"]), help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=int if kind == "int" else float, default=None, help=help_text)


def policy_options(args) -> dict:
    """The policy knobs given on the command line (unset ones keep the policy's defaults, which
    follow the model's block size)."""
    return {name: getattr(args, name) for name in policy_fields() if getattr(args, name, None) is not None}




def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _unwritable(flag: str, value: str) -> str | None:
    """Why a file cannot be created at ``value`` (its directory is made and probed with a temporary
    file, which is what writing it will do), or None."""
    parent = Path(value).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".packforcing-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{flag} {value!r} cannot be written: {err.strerror or err} ({parent})"
    return None


def check_paths(args) -> str | None:
    """What is wrong with the output paths (checked before any work is done), or None."""
    out = Path(args.out)
    if out.is_dir():
        return f"--out {args.out!r} is a directory; give a file name such as video.mp4"
    if out.suffix.lower() != ".mp4":
        return f"--out {args.out!r} must end in .mp4"
    if args.trace is not None:
        from .trace_io import EXTENSIONS as TRACE_EXTENSIONS

        trace = Path(args.trace)
        if trace.is_dir():
            return f"--trace {args.trace!r} is a directory"
        if trace.suffix.lower() not in TRACE_EXTENSIONS:
            return f"--trace {args.trace!r} must end in one of {', '.join(TRACE_EXTENSIONS)}"
    if args.max_seconds is not None and not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        return f"--max-seconds must be a positive number, got {args.max_seconds}"
    return _unwritable("--out", args.out) or (_unwritable("--trace", args.trace) if args.trace else None)


class Interrupts:
    """SIGINT while generating: the first Ctrl-C interrupts the block in progress (KeyboardInterrupt);
    later ones only note that they came. From :meth:`saving` on, SIGINT is blocked in this thread,
    so the finished blocks are written whole and the ffmpeg it starts inherits the block (no Ctrl-C
    reaches it, not even between its fork and exec). Installed with ``with``; on exit the previous
    handler comes back unless a Ctrl-C came (then the process is ending: SIGINT is ignored from then
    on, so it ends with its message and status 130 rather than a traceback)."""

    def __init__(self):
        self.count = 0
        self._raise = True
        self._previous = None
        self._blocked = False

    def _handler(self, signum, frame):
        self.count += 1
        if self._raise:
            self._raise = False
            raise KeyboardInterrupt
        print("\ninterrupt noted: still writing the finished blocks…", file=sys.stderr, flush=True)

    def saving(self) -> None:
        """From now on Ctrl-C no longer interrupts (the outputs are being written)."""
        self._raise = False
        if self._previous is not None and hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            self._blocked = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is None:
            return
        if self._blocked and not self.count:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is noted here
            self._blocked = False
        if self.count:  # ignored, not blocked only: the interpreter's shutdown resets handlers, not SIG_IGN
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        signal.signal(signal.SIGINT, self._previous)


def save_outputs(args, frames, recorder, fps: int) -> tuple[Path, Path | None]:
    """The mp4 and, with ``--trace``, the trace, each written to a temporary file and renamed."""
    import numpy as np

    from .video import replaced_atomically, write_video

    path = write_video(np.concatenate(frames), args.out, fps=fps)
    trace = None
    if args.trace:
        with replaced_atomically(args.trace) as tmp:
            recorder.save(tmp)
        trace = Path(args.trace)
    return path, trace


MAX_SCHEDULE_BYTES = 64 * 1024


def prompt_schedule(args):
    """The run's `PromptSchedule` from --prompt / --prompt-schedule (ValueError with a message)."""
    from .schedule import PromptSchedule

    if bool(args.prompt) == bool(args.prompt_schedule):
        raise ValueError("give --prompt (repeatable as --prompt 'T:text') or --prompt-schedule FILE, not both"
                         if args.prompt else "a prompt is needed: --prompt TEXT or --prompt-schedule FILE")
    if args.prompt:
        return PromptSchedule.from_items(args.prompt)
    path = Path(args.prompt_schedule)
    if not path.is_file():
        raise ValueError(f"--prompt-schedule: no such file {path}")
    if path.stat().st_size > MAX_SCHEDULE_BYTES:
        raise ValueError(f"--prompt-schedule: {path} is larger than {MAX_SCHEDULE_BYTES // 1024} KiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-schedule: {path} is not UTF-8 text") from None
    return PromptSchedule.parse(text)


def generate(args) -> int:
    from .embedded import default_pipeline
    from .pipeline import Pipeline
    from .video import to_uint8
    from .trace import NullRecorder, TraceRecorder

    problem = check_paths(args)
    if problem:
        return _fail(problem)
    try:
        schedule = prompt_schedule(args)
    except ValueError as err:
        return _fail(str(err))
    try:
        if args.model == "self-forcing":
            from .self_forcing import load_pipeline

            if args.checkpoint is not None:
                return _fail("--checkpoint cannot be combined with --model self-forcing (it brings its own)")
            pipe = load_pipeline(device=args.device, compressor_path=args.compressor_weights, height=args.height,
                                 width=args.width)
        elif args.model is not None:
            import torch

            dtype = torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32
            pipe = Pipeline.from_pretrained(args.model, args.checkpoint, args.compressor_weights, args.height,
                                            args.width, device=args.device, dtype=dtype)
        else:
            pipe = default_pipeline()
            if args.compressor_weights:
                from .loading import load_compressor

                pipe.compressor = load_compressor(args.compressor_weights, pipe.dim, pipe.transformer.device)
    except (OSError, ValueError) as err:  # missing/corrupted weights, bad sizes
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_seconds is not None:
        pipe.max_seconds = args.max_seconds
    recorder = TraceRecorder() if args.trace else NullRecorder()
    try:
        blocks = pipe.stream(
            schedule, args.seconds, policy=args.policy, seed=args.seed, recorder=recorder,
            compressor_mode=args.compressor, prompt_switch=args.on_switch, **policy_options(args),
        )
        total = pipe.num_blocks(args.seconds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frames, t0, failure = [], time.perf_counter(), None
    with Interrupts() as interrupts:
        with tqdm(total=total, unit="block", desc=f"{args.policy}") as bar:
            try:
                for block in blocks:
                    frames.append(to_uint8(block.pixels))
                    bar.set_postfix(kv_MB=f"{_kv_mb(recorder, block):.1f}")
                    bar.update(1)
            except (KeyboardInterrupt, Exception) as err:  # Ctrl-C, out of memory, a failing block
                failure = err
            finally:
                interrupts.saving()
                blocks.close()  # frees the cache
        if failure is not None and not frames:
            what = "interrupted" if isinstance(failure, KeyboardInterrupt) else f"{type(failure).__name__}: {failure}"
            return _fail(f"generation failed at block 1 ({what}); nothing was written", 130 if interrupts.count else 1)
        if failure is not None:
            print(f"saving the {len(frames)} finished blocks…", file=sys.stderr, flush=True)
        try:
            path, trace = save_outputs(args, frames, recorder, pipe.fps)
        except OSError as err:  # disk full, ffmpeg gone: the previous files are untouched
            return _fail(f"writing the outputs failed ({type(err).__name__}: {err}); {args.out!r}"
                         + (f" and {args.trace!r}" if args.trace else "") + " were left as they were", 1)
    if failure is not None:
        what = "interrupted" if isinstance(failure, KeyboardInterrupt) else f"{type(failure).__name__}: {failure}"
        kept = f"{path}" + (f" and the trace to {trace}" if trace else "")
        return _fail(f"generation stopped at block {len(frames) + 1} of {total} ({what}); "
                     f"the {len(frames)} finished blocks were written to {kept}",
                     130 if isinstance(failure, KeyboardInterrupt) else 1)
    n = sum(len(f) for f in frames)
    seconds = time.perf_counter() - t0
    print(f"wrote {path} ({n} frames, {n / pipe.fps:.2f} s of video) in {seconds:.1f} s")
    if trace:
        print(f"trace: {trace}")
        summary = recorder.summary()
        print(f"peak KV tokens per layer: {summary.get('peak_kv_tokens')}, peak KV bytes: {summary.get('peak_kv_bytes')}")
    if interrupts.count:
        return _fail("interrupted while writing; the complete video was written first", 130)
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
    """Run the command line; returns the exit code (2 = bad input, with "error: ..." on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: bad or missing arguments (it printed the reason), --help
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
