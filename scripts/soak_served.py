"""Soak of the *served* app: many generations through gradio_client against a launched `app.py`.

    .venv/bin/python scripts/soak_served.py                       # 100 requests, 1-4 s videos
    .venv/bin/python scripts/soak_served.py --requests 30 --csv runs/soak_served.csv

The server runs in a child process (``multiprocessing`` spawn: a fresh interpreter that imports
`app` and launches ``app.demo`` on a free localhost port, with its own runs and Gradio cache
directories under a temporary folder). The driver sends mixed requests — every cache
policy, lengths drawn from [--min-seconds, --max-seconds], a Compare of two policies every 10th
request, a fresh client (a new session, as a REST caller or a new visitor) every 3rd — and after each
one reads, from ``/proc/<pid>``, what the OS sees of the server: resident memory (VmRSS, no
``gc.collect()`` and no ``malloc_trim``), threads, open file descriptors, and the bytes on disk under
the runs and Gradio directories. At the end it asks the server to run ``gc.collect()`` and then
``malloc_trim(0)``, and reports RSS after each, so that memory Python could free (a leak of
objects) and memory the allocator holds (retention) are told apart.

Pass/fail (exit code 1 on fail): RSS at the last request within --tolerance (default 5 %) of RSS at
request 10; threads and open files at the last request no more than their highest over the first
10 requests (sockets come and go; a leak grows past the warm-up's peak).
Not part of the default test run (it takes minutes).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a yellow square and a blue circle bouncing over a black background",
           "a red circle over a navy background", "a green triangle over a dark grey background"]
POLICIES = ["packforcing", "sink_window", "window", "deep_sink", "full"]
MiB = 2**20


# ---- the server (child process) ----------------------------------------------------------------
def serve(port: int, commands, env: dict) -> None:
    """(A child process.) Launch the app, send "READY", then answer "gc" / "trim" with RSS in bytes
    until "quit"."""
    import ctypes
    import gc

    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import app

    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                    **app.launch_kwargs())
    commands.send("READY")
    while (command := commands.recv()) != "quit":
        if command == "gc":
            gc.collect()
        elif command == "trim":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        commands.send(rss_of(os.getpid()))
    app.demo.close()


# ---- what the OS sees of a process ---------------------------------------------------------------
def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def process_stats(pid: int, dirs: dict[str, Path]) -> dict:
    stats = {"rss_mib": rss_of(pid) / MiB, "threads": len(os.listdir(f"/proc/{pid}/task")),
             "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    stats.update({f"{name}_mib": du(path) / MiB for name, path in dirs.items()})
    return stats


# ---- the driver ----------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--min-seconds", type=int, default=1)
    parser.add_argument("--max-seconds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=str(ROOT / "runs" / "soak_served.csv"))
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative RSS drift, request 10 -> last")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the server (e.g. a disk cap), repeatable")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: the child
    return parser.parse_args(argv)


def start_server(work: Path, extra_env: list[str]):
    """The app in a child process (``spawn``: a fresh interpreter, as `python app.py` is) with its
    own runs and Gradio directories under ``work``; returns (process, command pipe, url, dirs)."""
    import multiprocessing

    sys.path.insert(0, str(ROOT))
    from tests.conftest import free_port

    dirs = {"runs": work / "runs", "gradio": work / "gradio"}
    for path in dirs.values():
        path.mkdir()
    env = dict(PACKFORCING_RUNS_DIR=str(dirs["runs"]), GRADIO_TEMP_DIR=str(dirs["gradio"]),
               PACKFORCING_MIN_SECONDS="1", OMP_NUM_THREADS="1")
    env.update(item.split("=", 1) for item in extra_env)
    port = free_port()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    server = context.Process(target=serve, args=(port, theirs, env), daemon=True)
    server.start()
    if not ours.poll(300) or ours.recv() != "READY":
        server.kill()
        raise SystemExit("the server did not start within 5 minutes")
    return server, ours, f"http://127.0.0.1:{port}/", dirs


def ask(commands, command: str) -> float:
    commands.send(command)
    return commands.recv() / MiB


def send(client, rng: random.Random, index: int, lengths: tuple[int, int]) -> str:
    seconds = rng.randint(*lengths)
    prompt, policy = rng.choice(PROMPTS), POLICIES[index % len(POLICIES)]
    if index % 10 == 9:
        pair = rng.sample(POLICIES, 2)
        client.predict(prompt=prompt, seconds=seconds, seed=index, policy=pair[0], policies=pair, api_name="/compare")
        return f"compare {'+'.join(pair)} {seconds} s"
    client.predict(prompt=prompt, seconds=seconds, seed=index, policy=policy, api_name="/generate")
    return f"{policy} {seconds} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    from gradio_client import Client

    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="soak-served-") as tmp:
        server, commands, url, dirs = start_server(Path(tmp), args.env)
        try:
            client = None
            for index in range(args.requests):
                if client is None or index % 3 == 0:
                    client = Client(url, verbose=False)
                tic = time.perf_counter()
                what = send(client, rng, index, (args.min_seconds, args.max_seconds))
                row = dict(request=index + 1, what=what, seconds=round(time.perf_counter() - tic, 2),
                           **process_stats(server.pid, dirs))
                rows.append(row)
                print(f"{row['request']:4d} {what:32s} {row['seconds']:6.1f} s  rss {row['rss_mib']:7.1f} MiB  "
                      f"threads {row['threads']:3d}  fds {row['fds']:4d}  runs {row['runs_mib']:6.1f} MiB  "
                      f"gradio {row['gradio_mib']:6.1f} MiB", flush=True)
            after_gc, after_trim = ask(commands, "gc"), ask(commands, "trim")
            commands.send("quit")
            server.join(timeout=30)
        finally:
            if server.is_alive():
                server.kill()
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first, warm = rows[min(9, len(rows) - 1)], rows[: min(10, len(rows))]
    last = rows[-1]
    drift = last["rss_mib"] / first["rss_mib"] - 1
    print(f"\nRSS request {first['request']}: {first['rss_mib']:.1f} MiB, request {last['request']}: "
          f"{last['rss_mib']:.1f} MiB ({drift:+.2%}); after gc.collect(): {after_gc:.1f} MiB; "
          f"after malloc_trim(0): {after_trim:.1f} MiB")
    print(f"threads {first['threads']} -> {last['threads']}, open files {first['fds']} -> {last['fds']} "
          f"(highest in the first 10 requests: {max(r['fds'] for r in warm)}), "
          f"disk (runs + gradio) {first['runs_mib'] + first['gradio_mib']:.1f} -> "
          f"{last['runs_mib'] + last['gradio_mib']:.1f} MiB (max {max(r['runs_mib'] + r['gradio_mib'] for r in rows):.1f})")
    ok = (abs(drift) <= args.tolerance and last["threads"] <= max(r["threads"] for r in warm)
          and last["fds"] <= max(r["fds"] for r in warm))
    print("PASS" if ok else "FAIL", f"(tolerance {args.tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
