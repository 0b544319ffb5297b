"""Chunked few-step sampler (Self-Forcing inference), as a Python generator.

For every block of ``block_frames`` latent frames:

1. start from Gaussian noise; for each timestep t of the warped schedule, predict the flow
   v = model(x_t, t), take x0 = x_t − σ_t·v, and move to the next timestep. ``solver="renoise"``
   (Self-Forcing inference, right for a few-step distilled generator) re-noises x0 with fresh noise
   (x_{t'} = (1 − σ_{t'})·x0 + σ_{t'}·ε); ``solver="euler"`` takes a deterministic Euler step of
   the flow ODE (x_{t'} = x_t + (σ_{t'} − σ_t)·v), the usual sampler of a plain flow-matching model;
2. decode the clean block with the streaming VAE decoder (yielded to the UI);
3. if the cache policy compresses, compress the block (PackForcing);
4. run the clean block once more at t = 0 (the *commit pass*) so every layer writes its clean K/V,
   and let the policy commit it.

Prompt schedules: ``prompt_switches`` {block: text} changes the prompt at the start of a block. With
``SamplerConfig.prompt_switch="keep"`` the cached K/V stay as they were computed (under the old
prompt); with ``"recache"`` (LongLive's KV re-cache, done exactly) the cache is rebuilt under the new
prompt first: the policy is reset and the commit pass of every block generated so far is re-run in
order, with the same clean latents and compressed tokens, so every kept full-resolution block and
every compressed mid block holds the K/V it would have had, had it been committed under the new
prompt (cost: one commit forward per past block).

σ_t = t / 1000. The schedule [1000, 750, 500, 250] warped with shift 5 is
t' = 1000·s·σ/(1 + (s − 1)·σ) ≈ [1000, 937.5, 833.3, 625].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .devices import synchronize

NUM_TRAIN_TIMESTEPS = 1000
PROMPT_SWITCHES = ("keep", "recache")


def warp_timesteps(steps, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """Flow-matching shift: t -> T·s·σ/(1+(s−1)·σ) with σ = t/T."""
    out = []
    for t in steps:
        sigma = t / num_train_timesteps
        out.append(num_train_timesteps * shift * sigma / (1 + (shift - 1) * sigma))
    return out


@dataclass
class SamplerConfig:
    block_frames: int = 4  # latent frames per block (Self-Forcing's public checkpoint: 3)
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    compressed_kv: str = "commit"  # how compressed tokens get per-layer K/V: "commit" | "projection"
    solver: str = "renoise"  # between timesteps: "renoise" (fresh noise) | "euler" (deterministic ODE step)
    # classifier-free guidance: v = v_u + g·(v_c − v_u); the unconditional text is all zeros (the
    # embedding of caption dropout in training). g = 1: no unconditional pass. g != 1 runs both in
    # one batch, each with its own cache rows (the cache is allocated for twice the batch).
    guidance_scale: float = 1.0
    prompt_switch: str = "keep"  # at a prompt switch the cache is kept as it is ("keep") or rebuilt ("recache")

    def __post_init__(self):
        if self.solver not in ("renoise", "euler"):
            raise ValueError(f"solver must be 'renoise' or 'euler', got {self.solver!r}")
        if not 0.0 <= float(self.guidance_scale) <= 20.0:
            raise ValueError(f"guidance_scale must be in [0, 20], got {self.guidance_scale!r}")
        if self.prompt_switch not in PROMPT_SWITCHES:
            raise ValueError(f"prompt_switch must be one of {PROMPT_SWITCHES}, got {self.prompt_switch!r}")

    @property
    def guided(self) -> bool:
        return float(self.guidance_scale) != 1.0

    @property
    def rows_per_prompt(self) -> int:
        """Model (and cache) batch rows per prompt: 2 with guidance (conditional + unconditional)."""
        return 2 if self.guided else 1

    @property
    def timesteps(self) -> list[float]:
        return warp_timesteps(self.denoising_steps, self.shift)


@dataclass
class BlockResult:
    """One finished block. latents [B, C, F, h, w] (normalised); pixels [B, 3, n, H, W] in [-1, 1];
    phases: seconds per phase (denoise, decode, compress, commit, select, rope)."""

    index: int
    latents: torch.Tensor
    pixels: torch.Tensor | None
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    plan: object = None  # the block's `BlockPlan` (what was attended, where)


class _Timer:
    def __init__(self, device, phases: dict):
        self.device, self.phases = device, phases

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                synchronize(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(timer.device)
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


@torch.no_grad()
def generate_blocks(
    model,
    text: torch.Tensor,
    policy,
    num_blocks: int,
    latent_hw: tuple[int, int],
    config: SamplerConfig | None = None,
    seed: int = 0,
    decoder=None,
    compressor=None,
    vae=None,
    recorder=None,
    fps: float = 16,
    temporal_ratio: int = 4,
    prompt_switches=None,
):
    """Yield a `BlockResult` per block. ``text`` [B, L, text_dim]; ``policy`` a pure `CachePolicy`
    (the sampler allocates its store and drives plan -> apply -> forwards -> commit); ``decoder`` a
    `StreamingDecoder` (None = no pixels); ``compressor``/``vae`` used when ``policy.compresses``;
    ``fps`` and ``temporal_ratio`` (pixel frames per latent frame) give the seconds each block adds;
    ``prompt_switches`` {block index: text [B, L, text_dim]}: the prompt from that block on (see the
    module docstring for ``config.prompt_switch``).

    Same seed, same inputs -> same latents. Closing the generator (a Stop) releases the cache.
    """
    config = config or SamplerConfig()
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    switches = dict(prompt_switches or {})
    if any(not isinstance(b, int) or not 0 < b < num_blocks for b in switches):
        raise ValueError(f"prompt switches must be at blocks 1..{num_blocks - 1}, got {sorted(switches)}")
    device = model.device
    batch = text.shape[0]
    guidance = float(config.guidance_scale)
    rows = batch * config.rows_per_prompt  # model / cache batch: [conditional; unconditional]
    if policy.geometry.batch_size != rows:
        raise ValueError(f"the cache is allocated for batch {policy.geometry.batch_size}, the sampler needs {rows} "
                         f"({batch} prompt(s) x {config.rows_per_prompt} with guidance_scale {guidance:g})")
    frames, (h, w) = config.block_frames, latent_hw
    shape = (batch, model.config.in_channels, frames, h, w)
    timesteps = config.timesteps
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if policy.compresses and compressor is None:
        raise ValueError(f"policy {policy.name!r} needs a compressor")
    if decoder is not None:
        decoder.reset()
    centres = compressor.centres(frames, h, w) if policy.compresses else None

    def prepare(prompt_text):  # cross-attention K/V once per prompt, not per forward
        return model.prompt_context(torch.cat([prompt_text, torch.zeros_like(prompt_text)]) if config.guided
                                    else prompt_text)

    def commit_pass(plan, x0, tokens, step):
        """The clean pass at t = 0 that writes the block's K/V (and its compressed tokens'), then commit."""
        positions = None
        if tokens is not None:
            t_c, h_c, w_c = centres
            positions = torch.stack([t_c + plan.current_pos, h_c, w_c], dim=-1)
        model.forward_block(
            _rows(x0, rows), torch.zeros(rows, device=device), prompt, store.context(plan, step, commit=True),
            step=len(timesteps), t_start=plan.current_pos, commit=True, compressed=tokens,
            compressed_positions=positions, compressed_kv=config.compressed_kv,
        )
        store.commit(plan)
        policy.commit(plan)

    prompt = prepare(text)
    store = policy.allocate(num_blocks)
    recording = recorder is not None and recorder.enabled
    recache = config.prompt_switch == "recache" and bool(switches)
    history: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (x0, compressed tokens) per block, to re-cache
    video_seconds = 0.0
    try:
        for block in range(num_blocks):
            phases: dict[str, float] = {}
            timer = _Timer(device, phases)
            t_block = time.perf_counter()
            if block in switches:
                with timer("recache" if recache else "switch"):
                    prompt = prepare(switches[block])
                    if recache:  # rebuild the cache under the new prompt: replay every commit pass
                        policy.reset(num_blocks)
                        for past, (past_x0, past_tokens) in enumerate(history):
                            past_plan = policy.plan(past)
                            store.apply(past_plan)
                            commit_pass(past_plan, past_x0, past_tokens, step=0)  # step 0: it also selects
                if recording:
                    recorder.prompt_switch(block, video_seconds, sorted(switches).index(block) + 1,
                                           config.prompt_switch, len(history) if recache else 0,
                                           phases.get("recache", phases.get("switch", 0.0)))
                phases.pop("switch", None)
            plan = policy.plan(block)
            store.apply(plan)
            x = torch.randn(shape, generator=generator).to(device)
            with timer("denoise"):
                for step, t in enumerate(timesteps):
                    sigma = t / NUM_TRAIN_TIMESTEPS
                    t_tensor = torch.full((rows,), t, device=device)
                    context = store.context(plan, step)
                    flow = model.forward_block(_rows(x, rows), t_tensor, prompt, context, step=step,
                                               t_start=plan.current_pos)
                    if config.guided:  # [cond; uncond] -> guided flow [B, ...]
                        flow = flow[batch:] + guidance * (flow[:batch] - flow[batch:])
                    x0 = x - sigma * flow
                    if step + 1 < len(timesteps):
                        next_sigma = timesteps[step + 1] / NUM_TRAIN_TIMESTEPS
                        if config.solver == "euler":
                            x = x + (next_sigma - sigma) * flow
                        else:
                            noise = torch.randn(shape, generator=generator).to(device)
                            x = (1 - next_sigma) * x0 + next_sigma * noise
            pixels = None
            if decoder is not None:
                with timer("decode"):
                    pixels = decoder.decode_block(x0)
            tokens = None
            if plan.compress:
                with timer("compress"):
                    tokens = compressor(
                        x0, pixels=pixels, vae=vae, patch_embedding=model.patch_embedding, first_block=block == 0
                    )
                    tokens = _rows(tokens, rows)
            with timer("commit"):
                commit_pass(plan, x0, tokens, step=len(timesteps))
            if recache:
                history.append((x0, tokens))
            phases.update(store.phase_seconds())  # select / rope inside the forwards (CUDA: events)
            seconds = time.perf_counter() - t_block
            added = _added_seconds(block, frames, fps, temporal_ratio)
            video_seconds += added
            if recording:
                policy.record(recorder, plan, store.report(plan), len(timesteps))
                for name, value in phases.items():
                    recorder.phase(block, name, value)
                recorder.block_done(block, seconds, frames, added, policy.kv_tokens(), policy.kv_bytes(),
                                    _peak_memory(device))
            yield BlockResult(block, x0, pixels, seconds, phases, plan)
    finally:
        store.release()


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, ...] repeated to `rows` batch rows (the same latents for the conditional and the
    unconditional pass of guidance)."""
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *([1] * (x.ndim - 1)))


def added_frames(block: int, block_frames: int, temporal_ratio: int = 4) -> int:
    """Pixel frames a block adds: r·B_f (r·B_f − (r − 1) for the first block; r = the VAE's temporal ratio)."""
    return temporal_ratio * block_frames - ((temporal_ratio - 1) if block == 0 else 0)


def block_frame_ranges(num_blocks: int, block_frames: int, temporal_ratio: int = 4) -> list[tuple[int, int]]:
    """Pixel frames [start, end) of each of ``num_blocks`` blocks in the video (see `added_frames`)."""
    ranges, start = [], 0
    for block in range(num_blocks):
        end = start + added_frames(block, block_frames, temporal_ratio)
        ranges.append((start, end))
        start = end
    return ranges


def _added_seconds(block: int, block_frames: int, fps: float, temporal_ratio: int) -> float:
    """Seconds of video a block adds (see `added_frames`)."""
    return added_frames(block, block_frames, temporal_ratio) / fps


def _peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
