"""Benchmark machine facts (CPU, commit, memory) and model presets (random-weight Wan2.1, UMT5-XXL)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

from packforcing.devices import synchronize


# -- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
# -- presets -------------------------------------------------------------------------------------
class StubTextEncoder:
    """Fixed random text embeddings [1, L, text_dim] (20 'prompt' tokens, zero padding like Wan)."""

    def __init__(self, text_dim: int, max_length: int = 512, tokens: int = 20, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        emb = torch.randn(1, max_length, text_dim, generator=gen) * 0.1
        emb[:, tokens:] = 0
        self.emb, self.max_length = emb, max_length

    def encode(self, prompts):
        return self.emb.expand(len(prompts), -1, -1).clone()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


UMT5_XXL = dict(vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0)


def build_umt5_xxl(device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A random-weight UMT5-XXL encoder (Wan2.1's text encoder, 5.7 B parameters) on ``device``."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**{**UMT5_XXL, **overrides})
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = UMT5EncoderModel(cfg)
    return model.eval()


def text_encoder_experiment(device: torch.device, dtype: torch.dtype, text_len: int = 512, offload: bool = True,
                            log=print, **overrides) -> tuple[torch.Tensor, dict]:
    """Encode with a random UMT5-XXL on the device; measure its resident bytes; move it off if ``offload``."""
    info = {"text_encoder": "umt5-xxl (random weights)"}
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    t0 = time.perf_counter()
    model = build_umt5_xxl(device, dtype, **overrides)
    synchronize(device)
    info["build_s"] = time.perf_counter() - t0
    resident = (torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()) - before
    info["resident_bytes"] = int(resident)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, text_len), generator=gen).to(device)
    mask = torch.zeros(1, text_len, dtype=torch.long, device=device)
    mask[:, :20] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        emb = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    emb = emb.masked_fill(mask[..., None] == 0, 0.0)
    synchronize(device)
    info["encode_s"] = time.perf_counter() - t0
    info["offloaded"] = bool(offload)
    if offload:
        t0 = time.perf_counter()
        model.to("cpu")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        info["offload_s"] = time.perf_counter() - t0
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
        info["freed_bytes"] = int(before + resident - after)
    else:
        info["kept"] = model  # keep it resident for the whole run (the "before" case)
    log(f"text encoder: {info['text_encoder']}, resident {resident / 2**30:.2f} GiB, encode {info['encode_s']:.2f} s,"
        f" {'moved to CPU' if offload else 'kept on the device'}")
    return emb, info


def build_wan(device: torch.device, dtype: torch.dtype = torch.bfloat16, layers: int | None = None,
              height: int = 480, width: int = 832, vae_dtype: torch.dtype | None = None, seed: int = 0):
    """The full Wan2.1-T2V-1.3B architecture with random weights, as a `Pipeline` (text encoder: stub)."""
    from diffusers import AutoencoderKLWan

    from packforcing.compressor import Compressor
    from packforcing.configs import WAN21_T2V_1P3B
    from packforcing.model import CausalWanTransformer
    from packforcing.pipeline import Pipeline
    from packforcing.vae import WanVAE

    cfg = dict(WAN21_T2V_1P3B)
    if layers is not None:
        cfg["num_layers"] = int(layers)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the device (no host copy of 1.4 B params)
        transformer = CausalWanTransformer(**cfg)
        vae_model = AutoencoderKLWan()  # diffusers defaults = the Wan2.1 VAE (127 M params)
        compressor = Compressor(cfg["num_attention_heads"] * cfg["attention_head_dim"], mode="both")
    # as `packforcing.loading` / diffusers' from_pretrained: cast, but keep `_keep_in_fp32_modules` in fp32
    keep = getattr(type(transformer), "_keep_in_fp32_modules", None) or []
    for pname, param in transformer.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if any(m in pname.split(".") for m in keep) else dtype)
    if vae_dtype not in (None, torch.float32):  # the library loads the VAE in float32 by default
        vae_model.to(vae_dtype)
    vae_model.eval()
    compressor.to(dtype)
    text = StubTextEncoder(cfg["text_dim"], 512, seed=seed)
    name = "wan-1.3b (RANDOM weights)" if layers is None else f"wan-1.3b with {layers} layers (RANDOM weights)"
    return Pipeline(transformer, WanVAE(vae_model), text, compressor, height, width, name=name)
