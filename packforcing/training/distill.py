"""Data-free compressor training for any causal Wan checkpoint: self-distillation from its own rollouts.

Prompts in, HR-branch weights out; no video dataset::

    python -m packforcing.training.distill --model embedded --prompt "a red circle ..." --out hr.safetensors
    python -m packforcing.training.distill --model self-forcing --prompts prompts.txt --device cuda --out hr.safetensors

1. **Rollouts.** The frozen model generates short clips (≤ 5 s, the paper's training length) with
   the ``full`` cache; each block's clean latents and, for the LR branch, its tokens from the
   decoded pixels (exactly what inference feeds the compressor) are kept.
2. **One sample** = a rollout, a *current* block ``n``, a *mid* block ``m`` and a set of selected
   mid blocks containing ``m`` (the others left out, as top-k leaves them out), drawn at random so
   mid blocks come at varied distances. The PackForcing policy itself (`PackForcingCache.plan`)
   places sink, selected mid, recent and current blocks, so positions — the temporal RoPE
   adjustment included — are the ones inference uses; ``m``'s compressed tokens sit at
   ``start + t_offset·span/B_f`` as the store rotates them.
3. **Loss.** One masked pass (`CausalWanTransformer.forward_tokens`) holds the history blocks at
   full resolution (block-causal, as the rollout computed them), ``m``'s compressed tokens (riding
   its commit pass: they see blocks ≤ m and themselves, nothing sees them but the student), and two
   copies of the noised current block: the *student* sees ``m`` only through its compressed tokens,
   the *teacher* sees ``m`` at full resolution. Loss = MSE(student flow, teacher flow), the teacher
   detached; only the HR branch learns (LR branch and transformer frozen).

Simplification: history blocks attend each other at their packed positions in one pass, whereas at
inference their keys were computed at commit time and re-rotated since (RoPE is relative, so only
blocks whose relative offsets changed differ).

The output is a `Compressor` (mode ``both``) file for ``--compressor-weights`` and the app's
``PACKFORCING_SELF_FORCING_COMPRESSOR``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from ..compressor import Compressor
from ..rope import Rope3D
from ..sampler import NUM_TRAIN_TIMESTEPS
from .rollouts import MAX_ROLLOUT_SECONDS, Rollout, make_rollouts, policy_for


@dataclasses.dataclass(frozen=True)
class Sample:
    rollout: int
    current: int  # block n (noised)
    mid: int  # block m (compressed for the student)
    selected: tuple[int, ...]  # mid blocks attended (m included), temporal order
    timestep: float  # 0..1000
    noise_seed: int
    drop_sink: bool = False  # the sink left out of the context: m is the only view of what it shows


@dataclasses.dataclass
class DistillConfig:
    seconds: float = 5.0  # rollout length (≤ 5 s)
    steps: int = 200
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    keep_prob: float = 0.5  # chance that another mid block is selected alongside m
    seed: int = 0
    autocast: bool = True  # bf16 autocast on CUDA
    policy_options: dict = dataclasses.field(default_factory=dict)  # packforcing knobs (sink, recent, span)

    def __post_init__(self):
        if not 0 < float(self.seconds) <= MAX_ROLLOUT_SECONDS:
            raise ValueError(f"rollouts must be at most {MAX_ROLLOUT_SECONDS:g} s (the training length), got {self.seconds}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")


# ----------------------------------------------------------------------------------------- samples
def draw_sample(pipe, compressor, rollouts: list[Rollout], cfg: DistillConfig, gen: torch.Generator) -> Sample:
    """A random (rollout, current block, mid block, selection, timestep)."""
    probe = policy_for(pipe, compressor, 1, **cfg.policy_options)
    r = int(torch.randint(len(rollouts), (1,), generator=gen))
    blocks = len(rollouts[r].latents)
    first = probe.n_sink + probe.n_recent + 1  # the first block with a mid block in the archive
    if blocks <= first:
        raise ValueError(f"rollouts of {blocks} blocks have no mid block (sink {probe.n_sink} + recent "
                         f"{probe.n_recent} blocks): use longer rollouts or a smaller sink")
    returns = rollouts[r].returns
    if returns:  # a return of the object: m is a mid block that shows it, the sink is left out
        n, shown = returns[int(torch.randint(len(returns), (1,), generator=gen))]
        m = shown[int(torch.randint(len(shown), (1,), generator=gen))]
    else:
        n = int(torch.randint(first, blocks, (1,), generator=gen))
    archive = list(range(probe.n_sink, n - probe.n_recent))
    if not returns:
        m = archive[int(torch.randint(len(archive), (1,), generator=gen))]
    keep = torch.rand(len(archive), generator=gen) < cfg.keep_prob
    selected = tuple(b for b, k in zip(archive, keep) if k or b == m)
    steps = pipe.sampler.timesteps
    t = float(steps[int(torch.randint(len(steps), (1,), generator=gen))])
    return Sample(r, n, m, selected, t, int(torch.randint(2**31 - 1, (1,), generator=gen)), drop_sink=bool(returns))


def placement(pipe, compressor, sample: Sample, **options):
    """(history [(block, start, scale)], current start, compressed t offsets [N_c]) as inference places them."""
    policy = policy_for(pipe, compressor, len(sample.selected), **options)
    policy.reset(sample.current + 1)
    for b in range(sample.current):
        policy.commit(policy.plan(b))
    plan = policy.plan(sample.current)
    scale = policy.span / pipe.block_frames
    history = [(h.block, h.pos, 1.0) for region, h in plan.held if region == "sink"]
    chosen = [h for h in plan.selection.candidates if h.block in sample.selected]
    if [h.block for h in chosen] != list(sample.selected) or plan.selection.count != len(chosen):
        raise ValueError(f"selected mid blocks {sample.selected} are not all in the archive at block {sample.current}")
    starts = dict(zip(sample.selected, plan.selection.starts if policy.config.rope_adjust else [h.pos for h in chosen]))
    history += [(b, starts[b], scale) for b in sample.selected]
    history += [(h.block, h.pos, 1.0) for region, h in plan.held if region == "recent"]
    offsets = torch.tensor(policy.t_offsets, dtype=torch.float64) * scale
    return sorted(history), plan.current_pos, starts[sample.mid] + offsets


# -------------------------------------------------------------------------------------------- loss
def sample_loss(pipe, compressor: Compressor, rollout: Rollout, sample: Sample, cfg: DistillConfig) -> torch.Tensor:
    """MSE between the student's and the teacher's flow for the sample's current block (module doc)."""
    model = pipe.transformer
    device, B = model.device, pipe.block_frames
    h, w = pipe.latent_hw
    _, gh, gw = model.token_grid(1, h, w)
    T = B * gh * gw
    grid = Rope3D.grid(1, gh, gw)  # [gh·gw, 3]

    def block_positions(start: float, scale: float) -> torch.Tensor:
        pos = grid.repeat(B, 1)
        pos[:, 0] = (start + torch.arange(B, dtype=torch.float64) * scale).repeat_interleave(gh * gw)
        return pos

    history, current_pos, comp_t = placement(pipe, compressor, sample, **cfg.policy_options)
    if sample.drop_sink:
        n_sink = policy_for(pipe, compressor, 1, **cfg.policy_options).n_sink
        history = [entry for entry in history if entry[0] >= n_sink]
    parts, positions, spans = [], [], {}
    for block, start, scale in history:
        spans[block] = (sum(p.shape[1] for p in parts), T)
        parts.append(model.patchify(rollout.latents[block]))
        positions.append(block_positions(start, scale))
    x0_m = rollout.latents[sample.mid]
    comp = compressor.hr(x0_m) if compressor.hr is not None else 0
    if rollout.lr_tokens[sample.mid] is not None:
        comp = comp + rollout.lr_tokens[sample.mid]
    n_c = comp.shape[1]
    _, ch, cw = compressor.centres(B, h, w)
    comp_at = sum(p.shape[1] for p in parts)
    parts.append(comp.to(parts[0].dtype))
    positions.append(torch.stack([comp_t, ch.double(), cw.double()], dim=-1))
    x0 = rollout.latents[sample.current]
    gen = torch.Generator("cpu").manual_seed(sample.noise_seed)
    sigma = sample.timestep / NUM_TRAIN_TIMESTEPS
    x_t = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen).to(x0)
    noisy = model.patchify(x_t)
    student_at = comp_at + n_c
    teacher_at = student_at + T
    parts += [noisy, noisy]
    positions += [block_positions(current_pos, 1.0)] * 2
    hidden = torch.cat(parts, dim=1)
    n = hidden.shape[1]

    mask = torch.zeros(n, n, dtype=torch.bool)
    blocks = [b for b, _, _ in history]
    for b in blocks:  # history: block-causal among the blocks present
        rows = slice(spans[b][0], spans[b][0] + T)
        for a in blocks:
            if a <= b:
                mask[rows, spans[a][0]: spans[a][0] + T] = True
    comp_rows = slice(comp_at, comp_at + n_c)
    for a in blocks:  # compressed tokens ride m's commit pass
        if a <= sample.mid:
            mask[comp_rows, spans[a][0]: spans[a][0] + T] = True
    mask[comp_rows, comp_rows] = True
    for at, sees_full_mid in ((student_at, False), (teacher_at, True)):
        rows = slice(at, at + T)
        for a in blocks:
            if a != sample.mid or sees_full_mid:
                mask[rows, spans[a][0]: spans[a][0] + T] = True
        if not sees_full_mid:
            mask[rows, comp_rows] = True
        mask[rows, rows] = True
    timestep = torch.zeros(1, n, device=device)
    timestep[:, student_at:] = sample.timestep
    on_cuda = device.type == "cuda" and cfg.autocast
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        out = model.forward_tokens(hidden, torch.cat(positions), timestep, rollout.text, mask)
    student = out[:, student_at:teacher_at].float()
    teacher = out[:, teacher_at:].float().detach()
    return F.mse_loss(student, teacher)


@torch.no_grad()
def heldout_loss(pipe, compressor, rollouts: list[Rollout], cfg: DistillConfig, samples: int = 16,
                 seed: int = 12345) -> float:
    """Mean distillation loss over ``samples`` fixed draws (the same draws for any compressor)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    draws = [draw_sample(pipe, compressor, rollouts, cfg, gen) for _ in range(samples)]
    return sum(float(sample_loss(pipe, compressor, rollouts[s.rollout], s, cfg)) for s in draws) / samples


# ---------------------------------------------------------------------------------------- training
def new_compressor(pipe, seed: int = 0, mode: str = "both") -> Compressor:
    """A compressor with a freshly initialised HR branch for the pipeline's model width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        compressor = Compressor(pipe.dim, mode=mode)
    return compressor.to(pipe.transformer.device)


def distill(pipe, prompts: list[str], cfg: DistillConfig | None = None, compressor: Compressor | None = None,
            rollouts: list[Rollout] | None = None, log=None) -> tuple[Compressor, list[float]]:
    """Train the HR branch of ``compressor`` (default: fresh, mode ``both``) on ``pipe``'s frozen
    model. Returns the compressor (eval mode) and the loss of every step."""
    cfg = cfg or DistillConfig()
    compressor = compressor if compressor is not None else new_compressor(pipe, cfg.seed)
    if compressor.hr is None:
        raise ValueError("the compressor has no HR branch to train (mode 'lr')")
    if not prompts and rollouts is None:
        raise ValueError("give at least one prompt")
    for p in pipe.transformer.parameters():
        p.requires_grad_(False)
    rollouts = rollouts if rollouts is not None else make_rollouts(pipe, compressor, prompts, cfg.seconds, cfg.seed)
    optimizer = torch.optim.AdamW(compressor.hr.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    losses, t0 = [], time.perf_counter()
    compressor.train()
    for step in range(cfg.steps):
        sample = draw_sample(pipe, compressor, rollouts, cfg, gen)
        loss = sample_loss(pipe, compressor, rollouts[sample.rollout], sample, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(compressor.hr.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, cfg.steps // 20) == 0:
            recent = losses[-max(1, cfg.steps // 20):]
            log(f"step {step + 1}/{cfg.steps}: loss {sum(recent) / len(recent):.5f} ({time.perf_counter() - t0:.0f} s)")
    return compressor.eval(), losses


# --------------------------------------------------------------------------------- command line
def _load(args):
    import torch as _torch

    if args.model == "embedded":
        from ..embedded import default_pipeline

        return default_pipeline().to(args.device)
    from ..tiny_world import has_tiny_world, load_tiny_world

    if has_tiny_world(args.model):  # an exported tiny-world directory (e.g. a fine-tuned one)
        return load_tiny_world(args.model, device=args.device)
    if args.model == "self-forcing":
        from ..self_forcing import load_pipeline

        return load_pipeline(device=args.device, height=args.height, width=args.width)
    from ..pipeline import Pipeline

    dtype = _torch.bfloat16 if args.device.startswith("cuda") else _torch.float32
    return Pipeline.from_pretrained(args.model, args.checkpoint, height=args.height, width=args.width,
                                    device=args.device, dtype=dtype)


def main(argv=None) -> int:
    """``python -m packforcing.training.distill``: see the module docstring. Exit code 2 = bad input."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m packforcing.training.distill",
                                     description="Train a compressor's HR branch by self-distillation (no dataset).")
    parser.add_argument("--model", default="embedded",
                        help="embedded | self-forcing | a tiny-world directory | a diffusers Wan2.1 directory")
    parser.add_argument("--checkpoint", default=None, help="with a directory: Self-Forcing .pt for its transformer")
    parser.add_argument("--prompt", action="append", default=[], help="a training prompt (repeatable)")
    parser.add_argument("--prompts", default=None, help="file with one training prompt per line")
    parser.add_argument("--heldout-prompt", action="append", default=[], help="prompt for the held-out report")
    parser.add_argument("--seconds", type=float, default=5.0, help="rollout length, at most 5 s")
    parser.add_argument("--memory-clips", type=int, default=0,
                        help="tiny worlds: also this many ground-truth memory clips, sampled where the object "
                             "returns (training.memory_distill); as many again, other scenes, for the held-out report")
    parser.add_argument("--sink-frames", type=int, default=None, help="PackForcing sink of the samples (latent frames)")
    parser.add_argument("--recent-frames", type=int, default=None, help="PackForcing recent window of the samples")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=480, help="real models: video height in pixels")
    parser.add_argument("--width", type=int, default=832, help="real models: video width in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output .safetensors (loads with --compressor-weights)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    out = Path(args.out)
    if out.suffix != ".safetensors" or out.is_dir():
        return fail(f"--out {args.out!r} must be a .safetensors file name")
    if not out.parent.is_dir():
        return fail(f"--out: directory {str(out.parent)!r} does not exist")
    prompts = list(args.prompt)
    try:
        if args.prompts:
            prompts += [ln.strip() for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        options = {k: v for k, v in (("sink_frames", args.sink_frames), ("recent_frames", args.recent_frames))
                   if v is not None}
        cfg = DistillConfig(seconds=args.seconds, steps=args.steps, lr=args.lr, seed=args.seed, policy_options=options)
        if not prompts:
            raise ValueError("give --prompt or --prompts")
        pipe = _load(args)
        compressor = new_compressor(pipe, args.seed)
        print(f"{pipe.name}: rolling out {len(prompts)} prompt(s) of {cfg.seconds:g} s on {pipe.transformer.device}")
        rollouts = make_rollouts(pipe, compressor, prompts, cfg.seconds, cfg.seed)
        heldout = make_rollouts(pipe, compressor, args.heldout_prompt, cfg.seconds, cfg.seed + 10_000)
        if args.memory_clips:
            from .memory_distill import memory_rollouts

            print(f"encoding 2 x {args.memory_clips} ground-truth memory clips (training, held-out)")
            rollouts += memory_rollouts(pipe, compressor, args.memory_clips, cfg.seconds, cfg.seed, options)
            returns_heldout = memory_rollouts(pipe, compressor, args.memory_clips, cfg.seconds, cfg.seed + 10_000, options)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return fail(str(err))
    report = {"model": pipe.name, "prompts": len(prompts), "memory_clips": args.memory_clips,
              "config": dataclasses.asdict(cfg)}
    heldouts = {"heldout": heldout, "heldout_returns": returns_heldout if args.memory_clips else []}
    for name, clips in heldouts.items():
        if clips:
            report[f"{name}_untrained"] = heldout_loss(pipe, compressor, clips, cfg)
    compressor, losses = distill(pipe, prompts, cfg, compressor=compressor, rollouts=rollouts, log=print)
    for name, clips in heldouts.items():
        if clips:
            report[f"{name}_trained"] = heldout_loss(pipe, compressor, clips, cfg)
            print(f"{name} distillation loss: untrained {report[f'{name}_untrained']:.6f} -> "
                  f"trained {report[f'{name}_trained']:.6f}")
    compressor.save(str(out))
    report["losses"] = losses
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out} (and {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
