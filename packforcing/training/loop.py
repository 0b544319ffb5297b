"""Generic training loop: deterministic per-step randomness, resumable safetensors checkpoints.

A *stage* (VAE, transformer, compressor; see `stages.py`) exposes its trainable modules and a
``loss(step)`` method (and optionally ``after_step(step)``, run after each optimizer step; modules
without trainable parameters, such as EMA copies, are checkpointed but not optimised). Every random draw of a step comes from generators seeded by
``(seed, step)`` (`step_rng`), so a run resumed from a checkpoint continues bit-identically: the
checkpoint holds the trainable weights, the AdamW state (tensors in safetensors, hyper-parameters
as JSON metadata) and the step counter; the learning rate is a pure function of the step.
Checkpoints never contain pickled Python objects.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"


def step_rng(seed: int, step: int, salt: int = 0) -> tuple[torch.Generator, np.random.Generator]:
    """(torch, numpy) generators for one step; independent of anything that ran before."""
    key = [int(seed) & 0xFFFFFFFF, int(step), int(salt)]
    ss = np.random.SeedSequence(key)
    torch_gen = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    return torch_gen, np.random.default_rng(ss)


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# -- checkpoints ----------------------------------------------------------------------------------
def _module_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every module's state dict under ``model.<name>.``; tied weights (e.g. UMT5's shared input
    embedding) are stored as separate copies, as safetensors requires."""
    out, seen = {}, set()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            value = value.detach().cpu().contiguous()
            if value.data_ptr() in seen:
                value = value.clone()
            seen.add(value.data_ptr())
            out[f"model.{name}.{key}"] = value
    return out


def save_checkpoint(path: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:
    """Weights + optimizer state as safetensors (atomic write: tmp file, then rename)."""
    tensors = _module_tensors(modules)
    state = optimizer.state_dict()
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    meta = {"step": str(step), "param_groups": json.dumps(groups), "extra": json.dumps(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Restore weights (and optimizer state if given); returns the step to continue from."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"model.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    if optimizer is not None:
        groups = json.loads(meta["param_groups"])
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                per_param.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return int(meta["step"])


def checkpoint_extra(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("extra", "{}"))


# -- loop -----------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    progress: bool = True
    desc: str = "train"
    stop_at: int | None = None  # stop (with a checkpoint) before this step; resume later


def run_stage(stage, out_dir: str | os.PathLike, cfg: LoopConfig, resume: bool = False) -> list[float]:
    """Train ``stage`` for ``cfg.steps`` steps; returns the losses of the steps run in this call.

    ``out_dir/checkpoint.safetensors`` is written every ``checkpoint_every`` steps and at the end;
    ``out_dir/log.csv`` gets one row per step (step, loss, lr, seconds). With ``resume`` an
    existing checkpoint is loaded and training continues from its step.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = stage.trainable()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ckpt = out / CHECKPOINT
    start = 0
    if resume and ckpt.exists():
        start = load_checkpoint(ckpt, modules, optimizer)
    elif not resume and (out / LOG).exists():
        (out / LOG).unlink()
    losses: list[float] = []
    log_new = not (out / LOG).exists()
    with open(out / LOG, "a", newline="") as fh:
        writer = csv.writer(fh)
        if log_new:
            writer.writerow(["step", "loss", "lr", "seconds"])
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.desc,
                   disable=not cfg.progress, mininterval=2.0, dynamic_ncols=True)
        ema = None
        for step in bar:
            if cfg.stop_at is not None and step >= cfg.stop_at:
                save_checkpoint(ckpt, step, modules, optimizer, extra={"stage": cfg.desc})
                break
            tic = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for m in modules.values():
                m.train()
            loss = stage.loss(step)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(stage, "after_step"):  # e.g. an EMA update
                stage.after_step(step)
            value = float(loss.detach())
            losses.append(value)
            seconds = time.perf_counter() - tic
            writer.writerow([step, f"{value:.6f}", f"{lr:.3e}", f"{seconds:.3f}"])
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.set_postfix(loss=f"{ema:.4f}", s_per_step=f"{seconds:.2f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                fh.flush()
                save_checkpoint(ckpt, step + 1, modules, optimizer, extra={"stage": cfg.desc})
        bar.close()
    for m in modules.values():
        m.eval()
    return losses
