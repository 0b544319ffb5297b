"""Benchmark harness: per-block wall time, per-phase time, KV bytes and memory as a video grows.

    python -m analysis.bench --preset tiny --policies packforcing,full --seconds 120 --out docs/bench
    python -m analysis.bench --preset wan-1.3b --policies packforcing,full --seconds 120 --out docs/bench

Presets:

- ``tiny``: the embedded pipeline (`packforcing.embedded.default_pipeline`) on the CPU.
- ``wan-1.3b``: the full Wan2.1-T2V-1.3B architecture (30 layers, dim 1536) with RANDOM bf16 weights
  at 832×480, 4-latent-frame blocks, 4 steps + commit, the full-size random-weight
  `AutoencoderKLWan` decoding every block, and (on CUDA) a random-weight UMT5-XXL text encoder that
  is moved off the GPU after encoding. Needs CUDA; on a CPU it refuses unless ``--allow-cpu`` (one
  or two blocks, for smoke tests; ``--layers/--height/--width`` shrink it further).

Policies are specs ``name[:key=value,...]``: options go to the policy (e.g.
``packforcing:score_queries=all`` or ``packforcing:archive_device=cpu``), except ``compile=ffn|block``
(torch.compile of the transformer blocks' FFN + cross-attention, or of the whole blocks, for that run
only), so before/after pairs run in the same process. By default on the CPU the runs are
*interleaved* block by block (run A block 0, run B block 0, run A block 1, …) so that load from other
processes hits every run alike; on CUDA they run one after the other and each gets its own peak
memory (``torch.cuda.max_memory_allocated``). A run whose KV buffers would not fit in the device
memory (estimated with `analysis.estimate` before running) is capped to the blocks that fit, and
ratios are taken over the blocks every run completed.

Timed phases (seconds per block): ``denoise`` (the 4 steps), ``commit`` (clean pass), ``compress``,
``decode`` (streaming VAE), from the sampler's synced timers; ``select`` (top-k scoring) and ``rope``
(temporal re-rotation) from the cache store's clock — nested *inside* denoise (and ``rope`` partly in
``other`` = block time minus the four timed phases). On CUDA the store times them with CUDA events,
read once after the block (no synchronisation inside attention).

FLOPs per block come from `analysis.estimate.forward_flops` applied to the query and context tokens
of every forward as the block's plan states them (``plan.attend_tokens``, the compressed stream of
the commit pass), so the achieved FLOP/s is ``flops / (denoise + commit)``.

Modules: `bench_runs` (specs, runs, summaries), `bench_env` (machine, presets), `bench_micro`
(micro-benchmarks), `bench_report` (tables and files); this module is the command line. Generation fps = output pixel frames / wall seconds, decode included.

Outputs in ``--out``: ``<name>_blocks.csv`` (one row per run and block), ``<name>_summary.csv`` (one
row per run) and ``<name>.json`` (both, plus ratios, micro-benchmarks, calibration and the machine).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from analysis import estimate as est
from analysis.bench_env import (  # noqa: F401  (re-exported)
    StubTextEncoder, build_umt5_xxl, build_wan, cpu_model, device_description, git_commit, rss_bytes,
    rss_peak_bytes, text_encoder_experiment,
)
from analysis.bench_micro import (  # noqa: F401
    micro_decode_conv, micro_kv_path, micro_lr_reuse, micro_scoring, run_micro,
)
from analysis.bench_report import (  # noqa: F401
    _jsonable, format_per_block, format_phases, format_ratios, format_summary, markdown_report, write_outputs,
)
from analysis.bench_runs import (  # noqa: F401
    BLOCK_COLUMNS, PHASES, RANDOM_WEIGHTS_NOTE, SUMMARY_COLUMNS, BlockRun, RunSpec, _fit_blocks, parse_runs, ratios,
    run_benchmark, summarize,
)
from packforcing.vae import conv3d_backend


# -- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "wan-1.3b"], default="tiny")
    p.add_argument("--policies", default="packforcing,full",
                   help="comma-separated run specs name[:key=value;...] (see the module doc)")
    p.add_argument("--seconds", type=float, default=None, help="video length (default: 120 s on CUDA or tiny, "
                                                                  "one block with --allow-cpu)")
    p.add_argument("--out", default="docs/bench", help="output folder (CSV + JSON)")
    p.add_argument("--name", default=None, help="output file stem (default: <preset>_<seconds>s)")
    p.add_argument("--device", default=None, help="default: cuda for wan-1.3b when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="wan-1.3b weights/KV dtype (default bfloat16)")
    p.add_argument("--vae-dtype", default="float32", choices=["bfloat16", "float32", "float16"],
                   help="wan-1.3b VAE dtype (default float32, as the library loads it)")
    p.add_argument("--allow-cpu", action="store_true", help="wan-1.3b on the CPU: smoke test of <= 2 blocks")
    p.add_argument("--layers", type=int, default=None, help="wan-1.3b: fewer layers (smoke tests; not the preset)")
    p.add_argument("--height", type=int, default=None, help="wan-1.3b: pixel height (default 480)")
    p.add_argument("--width", type=int, default=None, help="wan-1.3b: pixel width (default 832)")
    p.add_argument("--text-encoder", choices=["auto", "stub", "umt5-xxl"], default="auto",
                   help="wan-1.3b: random UMT5-XXL on the device (auto on CUDA) or fixed random embeddings")
    p.add_argument("--keep-text-encoder", action="store_true",
                   help="keep the text encoder on the device during generation (the un-optimised case)")
    p.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                   help="alternate runs block by block (default on the CPU)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false")
    p.add_argument("--warmup", type=int, default=1, help="blocks run and discarded before timing (default 1)")
    p.add_argument("--ref-block", type=int, default=10, help="1-based reference block for ratios (default 10)")
    p.add_argument("--micro", action="store_true", help="also run the micro-benchmarks")
    p.add_argument("--micro-only", action="store_true", help="only the micro-benchmarks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a red ball bouncing on a blue floor")
    p.add_argument("--fast-conv", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: VAE Conv3d through oneDNN (the library default); --no-fast-conv measures ATen's path")
    p.add_argument("--report", default=None, metavar="JSON", help="print markdown tables of a bench JSON and exit")
    return p


def _refuse_cpu(args, num_blocks: int) -> str | None:
    if args.preset != "wan-1.3b":
        return None
    if not args.allow_cpu:
        spec = est.PRESETS["wan-1.3b"]
        per_block = est.estimate(spec, "packforcing", 120, with_params=False)["flops"][-1]
        return (f"the wan-1.3b preset needs a CUDA GPU: one 832x480 block is ~{per_block / 1e12:.0f} TFLOP, hours on a "
                f"CPU. Run it on an H100/H200, or pass --allow-cpu (at most 2 blocks, e.g. --seconds 1, optionally "
                f"with --layers 1 --height 64 --width 64) for a smoke test.")
    if num_blocks > 2:
        return f"--allow-cpu is for smoke tests: at most 2 blocks (asked for {num_blocks}); use --seconds 1 or 2"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.report:
        print(markdown_report(json.loads(Path(args.report).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        runs = parse_runs(args.policies)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    want_cuda = args.preset == "wan-1.3b" and torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if want_cuda else "cpu"))
    if args.seconds is None:
        args.seconds = 1.0 if (args.preset == "wan-1.3b" and device.type != "cuda") else 120.0
    spec0 = est.PRESETS[args.preset]
    num_blocks = spec0.num_blocks(args.seconds)
    if device.type != "cuda":
        msg = _refuse_cpu(args, num_blocks)
        if msg:
            print(f"error: {msg}", file=sys.stderr)
            return 2
    elif args.preset == "tiny":
        log("note: the tiny preset is defined on the CPU; running it on CUDA as asked")

    t_build = time.perf_counter()
    text_info = None
    text = None
    if args.preset == "tiny":
        from packforcing.embedded import default_pipeline

        pipe = default_pipeline()
        if device.type != "cpu":
            pipe.transformer.to(device)
            pipe.vae.vae.to(device)
            pipe.compressor.to(device)
        log(f"preset tiny: {pipe.name}")
    else:
        dtype = getattr(torch, args.dtype or "bfloat16")
        height, width = args.height or 480, args.width or 832
        log(f"preset wan-1.3b: Wan2.1-T2V-1.3B architecture with {RANDOM_WEIGHTS_NOTE}")
        pipe = build_wan(device, dtype, args.layers, height, width, vae_dtype=getattr(torch, args.vae_dtype),
                         seed=args.seed)
        if args.layers or args.height or args.width:
            log(f"NOTE: shrunk for a smoke test (layers={args.layers or 30}, {width}x{height}): NOT the preset")
        choice = args.text_encoder
        if choice == "auto":
            choice = "umt5-xxl" if device.type == "cuda" else "stub"
        if choice == "umt5-xxl":
            text, text_info = text_encoder_experiment(device, dtype, offload=not args.keep_text_encoder, log=log)
            text = text.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        else:
            text_info = {"text_encoder": "stub (fixed random embeddings, no encoder on the device)"}
    build_s = time.perf_counter() - t_build
    model_spec = est.spec_from_pipeline(pipe, name=args.preset)
    log(f"device: {device_description(device)}; build {build_s:.1f} s; {num_blocks} blocks of "
        f"{model_spec.tokens_per_block} tokens (+{model_spec.compressed_tokens} compressed)")

    name = args.name or f"{args.preset}_{args.seconds:g}s"
    payload = {
        "preset": args.preset, "pipeline": pipe.name, "weights": RANDOM_WEIGHTS_NOTE,
        "command": "python -m analysis.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "device": device_description(device), "cpu": cpu_model(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": args.seconds, "num_blocks": num_blocks,
        "build_s": build_s, "text_encoder": {k: v for k, v in (text_info or {}).items() if k != "kept"},
        "model_spec": {"tokens_per_block": model_spec.tokens_per_block, "n_c": model_spec.compressed_tokens,
                       "bytes_per_token": model_spec.bytes_per_token, "dtype": model_spec.dtype,
                       "layers": model_spec.layers, "dim": model_spec.dim, "height": model_spec.height,
                       "width": model_spec.width},
    }
    if args.micro or args.micro_only:
        payload["micro"] = run_micro(pipe, args.preset, log=log)
        log(json.dumps(_jsonable(payload["micro"]), indent=1))
    if args.micro_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.name or args.preset + '_micro'}.json"
        path.write_text(json.dumps(_jsonable(payload), indent=1))
        log(f"wrote {path}")
        return 0

    payload["fast_conv"] = bool(args.fast_conv)
    conv_ctx = conv3d_backend(pipe.vae.vae, onednn=args.fast_conv)
    if not args.fast_conv:
        log("NOTE: --no-fast-conv: VAE Conv3d on ATen's default CPU path (the library routes it to oneDNN)")
    t0 = time.perf_counter()
    try:
        with conv_ctx:
                blocks = run_benchmark(pipe, runs, num_blocks, model_spec=model_spec, prompt=args.prompt, seed=args.seed,
                                   interleave=args.interleave, warmup=args.warmup, text=text, log=log)
    except ValueError as err:  # bad policy options
        print(f"error: {err}", file=sys.stderr)
        return 2
    payload["bench_wall_s"] = time.perf_counter() - t0
    calibration = est.fit_calibration(blocks["flops"], blocks["seconds"])
    calibration.update(device=device_description(device), preset=args.preset)
    payload["calibration"] = calibration
    summary = summarize(blocks, model_spec, args.ref_block, calibration, runs)
    payload["ratios"] = ratios(blocks)
    payload["interleaved"] = bool(args.interleave if args.interleave is not None else device.type != "cuda")

    log("")
    log(f"== {args.preset}: {pipe.name} on {device_description(device)}, commit {payload['commit']}")
    log(format_summary(summary, device))
    log("")
    log(format_phases(summary))
    log("")
    log(format_ratios(payload["ratios"]))
    log("")
    log(format_per_block(blocks))
    log("")
    log(f"calibration: {calibration['flops_per_second'] / 1e9:.2f} GFLOP/s + {calibration['fixed_seconds_per_block']:.3f}"
        f" s/block (r2 {calibration['r2']:.3f}); estimator matches measured KV bytes: "
        f"{bool(summary['estimate_kv_match'].all())}, attended tokens: {bool(summary['estimate_attended_match'].all())}")
    if args.preset == "wan-1.3b":
        log(f"NOTE: {RANDOM_WEIGHTS_NOTE}")
    for path in write_outputs(args.out, name, blocks, summary, payload):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
