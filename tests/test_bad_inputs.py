"""Bad inputs, one matrix: library, command line and the app's handler logic (issue 7).

Every case expects a clear, specific error, then checks that the system still works: the same
shared pipeline generates a 1-block video (bit-identical to the one made before any bad input, so
no state was corrupted), the command line writes an mp4, or the Studio worker completes a run.
Public-Space safety (model allow-list and paths, environment limits, no shell) follows the matrix.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from packforcing import embedded, safety, studio
from packforcing.__main__ import main
from packforcing.cache import make_policy
from packforcing.compressor import Compressor
from packforcing.loading import WeightLoadError, save_transformer
from packforcing.pipeline import Pipeline
from tests.test_loading import _Evil, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle bouncing over a navy background"
LONG = "a red circle " * 770  # 10,010 characters
CHINESE, ARABIC, EMOJI = "一个红色的圆在深蓝色背景上弹跳", "دائرة حمراء تقفز فوق خلفية زرقاء", "🔴⬛🟦 bouncing 🎈"


# ---- shared, cheap fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine this is several times faster and steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_pipeline(side: int = 32) -> Pipeline:
    """The embedded architecture at ``side`` x ``side`` pixels with the zero-shot (LR-only)
    compressor, as a Wan checkpoint without compressor weights runs. At 32x32 a 1-block video takes
    ~0.2 s on one CPU core, but compressing policies need 64x64."""
    pipe = Pipeline.tiny_random(height=side, width=side)
    pipe.compressor = Compressor(pipe.dim, mode="lr").eval()
    return pipe


@pytest.fixture(scope="module")
def pipe():
    """One small pipeline shared by every case and path (library, CLI default model, Studio)."""
    return small_pipeline()


@pytest.fixture(scope="module")
def pipe64():
    """For the cases that need a compressing policy to run."""
    return small_pipeline(64)


@pytest.fixture(scope="module")
def reference(pipe):
    """A 1-block video made before any bad input."""
    return pipe.generate(PROMPT, 1, policy="window", seed=3)


@pytest.fixture()
def ctx(pipe, reference, tmp_path, monkeypatch):
    """The shared pipeline behind the library, the CLI (its default model) and the Studio."""
    for name in list(os.environ):
        if name.startswith("PACKFORCING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(safety.MIN_SECONDS_ENV, "1")
    monkeypatch.setenv(safety.RUNS_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(embedded, "default_pipeline", lambda: pipe)
    monkeypatch.setitem(studio._PIPELINES, studio.DEFAULT_MODEL, pipe)
    pipe.max_seconds = 120.0
    yield Ctx(pipe, reference, tmp_path)
    pipe.max_seconds = 120.0


@dataclasses.dataclass
class Ctx:
    pipe: Pipeline
    reference: np.ndarray
    tmp: Path

    def still_works(self, kind: str) -> None:
        if kind == "lib":
            assert np.array_equal(self.pipe.generate(PROMPT, 1, policy="window", seed=3), self.reference)
        elif kind == "cli":
            out = self.tmp / "ok.mp4"
            assert main(["generate", "--prompt", PROMPT, "--seconds", "1", "--policy", "window",
                         "--out", str(out)]) == 0
            assert out.stat().st_size > 0
        else:
            request = studio.validate_request(PROMPT, 1, 3, "window", {})
            final = studio.GenerationWorker(request, self.tmp / "ok-run", segments=False).run(timeout=120)
            assert final.kind == "done" and final.frames_done == 13 and final.video.exists()


# ---- model directories for the loading cases -----------------------------------------------------
def transformer_dir(root: Path, weights: Callable[[Path], None] | None = None) -> Path:
    """A diffusers-layout model dir (``transformer/config.json`` of TINY) with the given weights."""
    tdir = root / "transformer"
    save_transformer(tiny_model(0), tdir)  # writes config.json + diffusion_pytorch_model.safetensors
    if weights is not None:
        (tdir / "diffusion_pytorch_model.safetensors").unlink()
        weights(tdir)
    return root


def truncated(tdir: Path) -> None:
    save_transformer(tiny_model(0), tdir / "full")
    data = (tdir / "full" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tdir / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    import shutil

    shutil.rmtree(tdir / "full")


def evil_pickle(tdir: Path) -> None:
    with open(tdir / "model.pt", "wb") as f:
        pickle.dump({"patch_embedding.weight": _Evil(tdir.parent / "PWNED")}, f, protocol=2)


def wrong_width(tdir: Path) -> None:
    """Weights of a wider transformer under the tiny config."""
    save_transformer(tiny_model(0, num_attention_heads=8), tdir / "wide")
    (tdir / "wide" / "diffusion_pytorch_model.safetensors").rename(tdir / "diffusion_pytorch_model.safetensors")


def other_architecture(tdir: Path) -> None:
    """A checkpoint of a different network altogether."""
    from safetensors.torch import save_file

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    save_file(net.state_dict(), str(tdir / "diffusion_pytorch_model.safetensors"))


# ---- the matrix ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # lib | cli | app
    run: Callable[[Ctx], object]  # lib/app: raises; cli: returns argv (without "generate")
    match: str  # regex the message must contain (stderr for the CLI)
    error: type = ValueError


def lib(fn, match, error=ValueError) -> Case:
    return Case("lib", fn, match, error)


def cli(args, match) -> Case:
    return Case("cli", lambda c: args(c) if callable(args) else args, match)


def app(fn, match) -> Case:
    return Case("app", fn, match, studio.StudioError)


def gen(**kw):
    """A library generation with one argument changed (1 block, window policy by default)."""
    args = dict(prompt=PROMPT, seconds=1, policy="window", seed=0)
    args.update(kw)
    return lambda c: c.pipe.generate(args.pop("prompt"), args.pop("seconds"), **args)


def req(**kw):
    """A Studio request (the app handler's validation) with one value changed."""
    args = dict(prompt=PROMPT, seconds=1, seed=0, policy="packforcing", options={}, compressor_mode=None)
    args.update(kw)
    return lambda c: studio.validate_request(**args)


def latents(shape, frames=None):
    def run(c):
        c.pipe.transformer.check_latents(torch.zeros(shape), frames=frames)
    return run


def forward_block_with(shape):
    def run(c):
        policy, _ = c.pipe.build_policy("window")
        store = policy.allocate(1)
        plan = policy.plan(0)
        text = c.pipe.encode_prompt(PROMPT)
        c.pipe.transformer.forward_block(torch.zeros(shape), torch.tensor([500.0]), text, store.context(plan, 0), 0, 0.0)
    return run


def from_pretrained(make):
    def run(c):
        Pipeline.from_pretrained(make(c), height=32, width=32)
    return run


def loaded_with(weights):
    return lambda c: transformer_dir(c.tmp / "model", weights)


def refuse_pickle(c):
    try:
        from_pretrained(loaded_with(evil_pickle))(c)
    finally:
        assert not (c.tmp / "model" / "PWNED").exists(), "the pickle ran code"


def low_memory(c, monkeypatch_free=2**20):
    import packforcing.pipeline as pipeline_module

    real = pipeline_module.available_memory
    pipeline_module.available_memory = lambda device: monkeypatch_free
    try:
        c.pipe.generate(PROMPT, 60, policy="full")
    finally:
        pipeline_module.available_memory = real


def cli_out(c):
    return ["--out", str(c.tmp / "bad.mp4")]


CASES = {
    # prompts
    "lib-prompt-empty": lib(gen(prompt=""), "prompt is empty"),
    "lib-prompt-whitespace": lib(gen(prompt=" \n\t  "), "prompt is empty"),
    "lib-prompt-10000-chars": lib(gen(prompt=LONG), r"prompt is too long: 10010 characters \(at most 2000\)"),
    "lib-prompt-not-text": lib(gen(prompt=12345), "prompt must be text, got int"),
    "cli-prompt-whitespace-tabs": cli(["--prompt", "\t \n"], "prompt is empty"),
    "cli-prompt-10000-chars": cli(["--prompt", LONG], "prompt is too long"),
    "app-prompt-empty": app(req(prompt=""), "Please enter a prompt: it is empty"),
    "app-prompt-10000-chars": app(req(prompt=LONG), r"too long \(10009 characters; at most 2000\)"),
    # durations
    "lib-seconds-zero": lib(gen(seconds=0), "positive number of seconds, got 0"),
    "lib-seconds-negative": lib(gen(seconds=-3), "positive number of seconds, got -3"),
    "lib-seconds-nan": lib(gen(seconds=float("nan")), "positive, finite number of seconds, got nan"),
    "lib-seconds-inf": lib(gen(seconds=math.inf), "finite number of seconds, got inf"),
    "lib-seconds-huge-int": lib(gen(seconds=10**400), "finite number of seconds, got inf"),
    "lib-seconds-text": lib(gen(seconds="five"), "duration must be a number of seconds, got 'five'"),
    "lib-seconds-bool": lib(gen(seconds=True), "duration must be a number of seconds, got True"),
    "lib-seconds-over-max": lib(gen(seconds=120.5), "duration 120.5 s exceeds the maximum of 120 s"),
    "cli-seconds-negative": cli(["--seconds", "-2"], "positive number of seconds"),
    "cli-seconds-inf": cli(["--seconds", "inf"], "finite"),
    "cli-seconds-text": cli(["--seconds", "soon"], "argument --seconds: invalid float value: 'soon'"),
    "cli-max-seconds-nan": cli(["--max-seconds", "nan"], "--max-seconds must be a positive number"),
    "app-seconds-negative": app(req(seconds=-1), "between 1 and 120 seconds, got -1"),
    "app-seconds-inf": app(req(seconds=math.inf), "between 1 and 120 seconds, got inf"),
    "app-seconds-text": app(req(seconds="a minute"), "number of seconds, got 'a minute'"),
    # seeds
    "lib-seed-negative": lib(gen(seed=-1), r"seed must be in \[0, 2\*\*63\), got -1"),
    "lib-seed-2**63": lib(gen(seed=2**63), r"seed must be in \[0, 2\*\*63\)"),
    "lib-seed-fraction": lib(gen(seed=0.5), "seed must be an integer, got 0.5"),
    "lib-seed-text": lib(gen(seed="7"), "seed must be an integer, got '7'"),
    "cli-seed-huge": cli(["--seed", str(2**64)], r"seed must be in \[0, 2\*\*63\)"),
    "cli-seed-fraction": cli(["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    "app-seed-huge": app(req(seed=2**70), "seed must be a whole number between 0 and 2"),
    "app-seed-text": app(req(seed="lucky"), "seed must be a whole number"),
    "app-seed-5000-digits": app(req(seed="9" * 5000), r"seed must be a whole number .* got '9+… \(5002 chars\)"),
    # cache knobs: negative, fractional, absurd, not whole blocks, impossible combinations
    "lib-top-k-negative": lib(gen(policy="packforcing", top_k=-1), "top_k must be >= 0 blocks, got -1"),
    "lib-top-k-fraction": lib(gen(policy="packforcing", top_k=2.5), "top_k must be a whole number, got 2.5"),
    "lib-sink-negative": lib(gen(policy="sink_window", sink_frames=-4), "sink_frames must be >= 0"),
    "lib-recent-absurd": lib(gen(policy="packforcing", recent_frames=10**9),
                             "recent_frames=1000000000 is too large: at most 1024 latent frames"),
    "lib-keep-tokens-absurd": lib(gen(policy="deep_sink", keep_tokens=10**12), "keep_tokens=.* is too large"),
    "lib-window-zero": lib(gen(window_frames=0), "window_frames must be at least one block"),
    "lib-window-not-block-multiple": lib(gen(window_frames=6), "window_frames=6 latent frames is not a multiple"),
    "lib-deep-sink-recent-zero": lib(gen(policy="deep_sink", recent_frames=0), "needs recent_frames >= one block"),
    "lib-archive-below-top-k": lib(gen(policy="packforcing", top_k=8, archive_blocks=4), r"archive_blocks \(4\)"),
    "lib-rope-adjust-not-bool": lib(gen(policy="packforcing", rope_adjust="no"), "rope_adjust must be true or false"),
    "lib-cache-exceeds-free-memory": lib(low_memory, r"needs .* GiB for its KV cache .* only 0\.00 GiB"),
    "cli-top-k-negative": cli(["--top-k", "-3"], "top_k must be >= 0"),
    "cli-window-zero": cli(["--policy", "window", "--window-frames", "0"], "at least one block"),
    "cli-recent-absurd": cli(["--recent-frames", "99999"], "too large"),
    "app-top-k-negative": app(req(options={"top_k": -1}), "Top-k mid blocks must be at least 0"),
    "app-sink-not-block-multiple": app(req(options={"sink_frames": 6}), "sink_frames=6 latent frames is not a multiple"),
    "app-top-k-huge-int": app(req(options={"top_k": 10**400}), "Top-k mid blocks must be a finite number, got inf"),
    "app-recent-absurd": app(req(options={"recent_frames": 10**6}), "Recent frames must be at most 32"),
    # names
    "lib-unknown-policy": lib(gen(policy="lru"), "unknown cache policy 'lru'; choose from"),
    "lib-unknown-compressor": lib(gen(policy="packforcing", compressor_mode="jpeg"), "unknown compressor mode 'jpeg'"),
    "lib-compressing-policy-frames-too-small": lib(gen(policy="packforcing"),
                                                   "compresses blocks, which needs frames of at least 64x64 pixels"),
    "lib-unknown-option": lib(lambda c: make_policy("packforcing", c.pipe.geometry(), compressed_t_offsets=torch.zeros(1),
                                                    topk=4), r"unknown option\(s\) \['topk'\]"),
    "cli-unknown-policy": cli(["--policy", "lru"], "argument --policy: invalid choice: 'lru'"),
    "cli-unknown-compressor": cli(["--compressor", "jpeg"], "argument --compressor: invalid choice: 'jpeg'"),
    "app-policy-not-a-name": app(req(policy=["window"]), r"Unknown cache policy \['window'\]"),
    "app-unknown-compressor-type": app(req(compressor_mode=["lr"]), "Unknown compressor branch"),
    # latent shapes
    "lib-latents-channels": lib(latents((1, 8, 4, 8, 8)), r"latents must be \[B, 16, F, H, W\], got \(1, 8, 4, 8, 8\)"),
    "lib-latents-4d": lib(latents((16, 4, 8, 8)), "latents must be"),
    "lib-latents-odd-size": lib(latents((1, 16, 4, 7, 8)), "must be multiples of the patch"),
    "lib-latents-block-frames": lib(forward_block_with((1, 16, 3, 4, 4)), "block has 3 latent frames but the cache expects 4"),
    # model paths and checkpoints
    "lib-model-missing": lib(from_pretrained(lambda c: str(c.tmp / "no-such-model")), "neither a directory nor a hub id",
                             FileNotFoundError),
    "lib-model-dir-without-weights": lib(from_pretrained(lambda c: c.tmp), "no checkpoint at .*transformer",
                                         FileNotFoundError),
    "lib-model-truncated-safetensors": lib(from_pretrained(loaded_with(truncated)), "truncated or corrupted",
                                           WeightLoadError),
    "lib-model-code-running-pickle": lib(refuse_pickle, "refused: the pickle holds objects other than tensors",
                                         WeightLoadError),
    "lib-model-other-architecture": lib(from_pretrained(loaded_with(other_architecture)),
                                        r"does not fit CausalWanTransformer\n  missing keys", WeightLoadError),
    "cli-model-missing": cli(lambda c: ["--model", str(c.tmp / "nope")], "neither a directory nor a hub id"),
    "cli-model-uncached-hub-id": cli(["--model", "someone/not-a-cached-model"], "not in the Hugging Face cache"),
    "cli-model-dir-without-weights": cli(lambda c: ["--model", str(c.tmp)], "no checkpoint at"),
    "cli-model-wrong-width": cli(lambda c: ["--model", str(transformer_dir(c.tmp / "model", wrong_width))],
                                 "shape mismatches"),
    "cli-out-is-a-directory": cli(lambda c: ["--out", str(c.tmp)], "is a directory"),
    "app-model-etc-passwd": app(req(model="/etc/passwd"), "unknown model '/etc/passwd'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error_and_the_system_still_works(name, ctx, capsys):
    case = CASES[name]
    if case.kind == "cli":
        argv = case.run(ctx)
        defaults = {"--prompt": PROMPT, "--seconds": "1", "--policy": "packforcing"}
        flags = dict(zip(argv[::2], argv[1::2]))
        out = [] if "--out" in flags else cli_out(ctx)
        full = ["generate", *[x for kv in {**defaults, **flags}.items() for x in kv], *out]
        assert main(full) == 2
        err = capsys.readouterr().err
        assert re.search(case.match, err), err
        assert "Traceback" not in err
        assert not (ctx.tmp / "bad.mp4").exists()
    else:
        with pytest.raises(case.error, match=case.match):
            case.run(ctx)
    ctx.still_works(case.kind)


# ---- valid edge cases must work ------------------------------------------------------------------
@pytest.mark.parametrize("kind, value", [
    ("lib", CHINESE), ("lib", ARABIC), ("lib", EMOJI), ("cli", CHINESE), ("app", f"{ARABIC} {EMOJI}"),
])
def test_non_latin_prompts_work(kind, value, ctx):
    if kind == "lib":
        video = ctx.pipe.generate(value, 1, policy="window", seed=1)
        assert video.shape == (13, 32, 32, 3)
    elif kind == "cli":
        out = ctx.tmp / "cn.mp4"
        assert main(["generate", "--prompt", value, "--seconds", "1", "--policy", "sink_window",
                     "--out", str(out)]) == 0 and out.exists()
    else:
        final = studio.GenerationWorker(studio.validate_request(value, 1, 0, "full", {}), ctx.tmp / "ar",
                                        segments=False).run(timeout=120)
        assert final.kind == "done" and final.request.prompt == value and final.video.exists()


@pytest.mark.parametrize("policy, options", [
    ("packforcing", {"top_k": 0}),  # no mid block attended: sink + recent only (ablation)
    ("packforcing", {"sink_frames": 0}),  # no sink (ablation)
    ("packforcing", {"recent_frames": 0, "top_k": 0, "sink_frames": 0}),  # the current block alone
    ("sink_window", {"sink_frames": 0}),  # = window
    ("packforcing", {"sink_frames": 64, "recent_frames": 32, "top_k": 64}),  # larger than the 2-block history
    ("window", {"window_frames": 8.0}),  # a whole float is a whole number
])
def test_zero_and_oversized_cache_settings_work(policy, options, pipe64):
    """Zero sink / top-k / recent are valid ablations; settings larger than the history just hold it all.
    (With no sink, the first block is compressed at once: the compressor runs in these 2-block videos.)"""
    video = pipe64.generate(PROMPT, 2, policy=policy, seed=0, **options)
    assert video.shape == (29, 64, 64, 3)


# ---- public-Space safety: the model field --------------------------------------------------------
@pytest.fixture()
def models_dir(ctx, monkeypatch):
    root = ctx.tmp / "models"
    (root / "empty-model").mkdir(parents=True)
    (root / "wan" / "nested").mkdir(parents=True)
    (ctx.tmp / "secret").mkdir()
    (ctx.tmp / "secret" / "token.txt").write_text("s3cr3t")
    (root / "escape").symlink_to(ctx.tmp / "secret", target_is_directory=True)
    (root / "passwd").symlink_to("/etc/passwd")
    monkeypatch.setenv(safety.MODELS_DIR_ENV, str(root))
    monkeypatch.setenv(safety.ALLOWED_MODELS_ENV, "someone/not-cached, not a hub id, ../evil/x")
    return root


@pytest.mark.parametrize("value, match", [
    ("/etc/passwd", "refused model path '/etc/passwd': it is outside the models directory"),
    ("/etc", "outside the models directory"),
    ("../secret", r"refused model path '\.\./secret': '\.\.' and backslashes are not allowed"),
    ("wan/../../secret", r"'\.\.' and backslashes"),
    ("..\\secret", "backslashes"),
    ("escape", "refused model path 'escape': it is outside the models directory"),  # symlink out
    ("passwd", "outside the models directory"),
    ("no-such-model", "unknown model 'no-such-model'"),
    ("Wan-AI/Wan2.1-T2V-14B", "unknown model"),  # a hub id that is not allow-listed
    ("embedded\x00", "control characters"),
    ("x" * 300, "too long"),
    ("../evil/x", r"'\.\.'"),  # dropped from the allow-list as malformed
    ("empty-model", "model '<models>/empty-model' cannot be loaded: no checkpoint at <models>/empty-model/transformer"),
    ("someone/not-cached", "cannot be loaded: .*not in the Hugging Face cache"),
])
def test_model_field_accepts_only_the_allow_list_and_the_models_dir(value, match, models_dir, ctx):
    with pytest.raises(studio.StudioError, match=match):
        studio.validate_request(PROMPT, 1, 0, "window", {}, model=value)
    assert list(studio._PIPELINES) == [studio.DEFAULT_MODEL]  # nothing else was loaded
    ctx.still_works("app")


def test_model_resolution_rules(models_dir, monkeypatch):
    assert safety.allowed_models() == ("someone/not-cached",)
    assert safety.resolve_model("embedded") == safety.ModelRef("embedded", "embedded")
    assert safety.resolve_model(None).kind == "embedded"
    assert safety.resolve_model("someone/not-cached") == safety.ModelRef("hub", "someone/not-cached")
    inside = safety.resolve_model("wan/nested")
    assert inside.kind == "local" and Path(inside.source) == (models_dir / "wan" / "nested").resolve()
    assert safety.resolve_model(str(models_dir / "wan")).kind == "local"  # absolute, inside
    with pytest.raises(safety.UnsafeInput, match="outside"):
        safety.resolve_model(str(models_dir))  # the directory itself is not a model
    monkeypatch.delenv(safety.MODELS_DIR_ENV)
    with pytest.raises(safety.UnsafeInput, match="local model paths are disabled"):
        safety.resolve_model("wan/nested")
    monkeypatch.delenv(safety.ALLOWED_MODELS_ENV)
    assert safety.allowed_models() == ()  # the base 50-step model is not offered unless an operator lists it
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" not in [k for _, k in studio.model_choices()]


# ---- public-Space safety: limits from the environment --------------------------------------------
@pytest.mark.parametrize("env, value, expected", [
    (safety.MAX_SECONDS_ENV, None, 120.0), (safety.MAX_SECONDS_ENV, "30", 30.0),
    (safety.MAX_SECONDS_ENV, "nan", 120.0), (safety.MAX_SECONDS_ENV, "-5", 120.0), (safety.MAX_SECONDS_ENV, "1e9", 1e9),
    (safety.MIN_SECONDS_ENV, None, 5.0), (safety.MIN_SECONDS_ENV, "0", 5.0), (safety.MIN_SECONDS_ENV, "2", 2.0),
    (safety.CONCURRENCY_ENV, None, 1), (safety.CONCURRENCY_ENV, "3", 3), (safety.CONCURRENCY_ENV, "0", 1),
    (safety.CONCURRENCY_ENV, "2.5", 1), (safety.CONCURRENCY_ENV, "many", 1), (safety.CONCURRENCY_ENV, "1000", 1),
    (safety.QUEUE_SIZE_ENV, None, 64), (safety.QUEUE_SIZE_ENV, "8", 8), (safety.QUEUE_SIZE_ENV, "-1", 64),
    (safety.RUN_TTL_ENV, None, 21600.0), (safety.RUN_TTL_ENV, "3600", 3600.0), (safety.RUN_TTL_ENV, "1", 21600.0),
])
def test_limits_come_from_the_environment_with_safe_defaults(env, value, expected, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    if value is not None:
        monkeypatch.setenv(env, value)
    read = {safety.MAX_SECONDS_ENV: safety.max_seconds, safety.MIN_SECONDS_ENV: safety.min_seconds,
            safety.CONCURRENCY_ENV: safety.concurrency_limit, safety.QUEUE_SIZE_ENV: safety.queue_size,
            safety.RUN_TTL_ENV: safety.run_ttl_s}[env]
    assert read() == expected


def test_max_seconds_setting_limits_the_app_handler(ctx, monkeypatch):
    monkeypatch.setenv(safety.MAX_SECONDS_ENV, "30")
    with pytest.raises(studio.StudioError, match="between 1 and 30 seconds, got 31.*PACKFORCING_MAX_SECONDS"):
        studio.validate_request(PROMPT, 31, 0, "window", {})
    assert studio.validate_request(PROMPT, 30, 0, "window", {}).num_blocks == 30
    ctx.still_works("app")


def test_app_wires_the_concurrency_and_queue_limits(monkeypatch):
    import app

    def limits(demo):
        fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("generate", "compare")}
        return {name: fn.concurrency_limit for name, fn in fns.items()}, demo._queue.default_concurrency_limit, \
            demo._queue.max_size

    assert limits(app.demo) == ({"generate": 1, "compare": 1}, 1, 64)  # the defaults
    monkeypatch.setenv(safety.CONCURRENCY_ENV, "3")
    monkeypatch.setenv(safety.QUEUE_SIZE_ENV, "10")
    assert limits(app.build_demo()) == ({"generate": 3, "compare": 3}, 3, 10)


# ---- public-Space safety: no user string reaches a shell -----------------------------------------
SHELL_CALLS = {"system", "popen", "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve", "spawnvp", "execl", "execle",
               "execlp", "execv", "execve", "execvp", "getoutput", "getstatusoutput"}


def _shell_uses(path: Path) -> list[str]:
    """Calls in a source file that could hand a string to a shell or an interpreter: ``shell=``
    anything but False, os.system/popen/exec*/spawn*, subprocess.getoutput & co., a subprocess call
    whose command is not a literal list of constant strings, and eval/exec."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}"
        for k in node.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                found.append(f"{where} shell=")
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module, name = func.value.id, func.attr
            if module in ("os", "subprocess") and name in SHELL_CALLS:
                found.append(f"{where} {module}.{name}")
            elif module == "subprocess":
                cmd = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
                fixed = isinstance(cmd, (ast.List, ast.Tuple)) and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in cmd.elts)
                if not fixed:
                    found.append(f"{where} subprocess.{name} with a non-literal command")
        if isinstance(func, ast.Name) and func.id in ("eval", "exec", "system", "popen"):
            found.append(f"{where} {func.id}()")
    return found


def test_no_user_string_reaches_a_shell(tmp_path):
    import app

    sources = [ROOT / "app.py", *sorted((ROOT / "packforcing").rglob("*.py")), *sorted((ROOT / "analysis").rglob("*.py")),
               *sorted((ROOT / "scripts").rglob("*.py"))]
    assert len(sources) > 20
    found = [use for path in sources for use in _shell_uses(path)]
    # issue 11: app.py names its API handlers' parameters with __signature__ now, not exec()
    assert found == []
    assert list(inspect.signature(app.generate).parameters) == ["request", *app.INPUTS]
    assert list(inspect.signature(app.compare).parameters) == ["request", *app.INPUTS, "policies"]
    # the detector works
    probe = tmp_path / "probe.py"
    probe.write_text("import os, subprocess\nos.system(x)\nsubprocess.run(x, shell=True)\n"
                     "subprocess.run(['git', 'status'])\neval(x)\n")
    assert [u.split(" ", 1)[1] for u in _shell_uses(probe)] == [
        "os.system", "shell=", "subprocess.run with a non-literal command", "eval()"]
