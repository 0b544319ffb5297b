"""Ground-truth memory clips for compressor distillation: samples at which an object comes back.

Self-distillation on the model's own rollouts (`training.distill`) teaches the HR branch to stand in
for a mid block in general, but in 5 s rollouts an object hardly ever leaves the recent window, so
nothing asks the compressed tokens to carry what the memory test needs: *what the object looked
like* when it is out of view. These clips do.

A clip is a tiny-world memory training clip (`world.memory.training_clip`: one object leaves the
frame and comes back within 5 s, caption without its colour), rendered, encoded with the pipeline's
frozen VAE, LR tokens from its pixels (as inference computes them from decoded pixels). Its
`Rollout.returns` lists each block ``n`` in which the object is in view while it was out of view in
every recent block (``n_recent`` blocks before ``n``), with the mid blocks (archive: after the sink,
before the recent window) that show it for at least half of their frames. `distill.draw_sample`
draws such a clip's samples only there, with the **sink left out** of the context (training clips
start with the object in view, so the sink would show it): the teacher sees ``m`` at full
resolution, the student only through its compressed tokens, and ``m`` is the only view of the
object either has.

Data: memory scenes from seeds 0… (the memory test's scenes start at 2,000,000), never its clips.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sampler import block_frame_ranges
from ..world.memory import memory_caption, training_clip, visible
from .data import to_pixels
from .rollouts import MAX_ROLLOUT_SECONDS, Rollout, policy_for

MIN_SHOWN = 0.5  # a mid block "shows" the object when it is in view in at least this share of its frames


def clip_returns(in_view: np.ndarray, ranges: list[tuple[int, int]], n_sink: int, n_recent: int):
    """((n, mid blocks showing the object), ...) for a bool [T] visibility of one object.

    ``n``: the object is in view in some frame of block n and in no frame of the ``n_recent`` blocks
    before it; the mid blocks are the archive blocks ``n_sink ≤ m < n − n_recent`` in which it is
    in view for at least `MIN_SHOWN` of the frames."""
    share = [float(in_view[a:e].mean()) for a, e in ranges]
    out = []
    for n in range(n_sink + n_recent + 1, len(ranges)):
        if share[n] > 0 and all(share[k] == 0 for k in range(n - n_recent, n)):
            shown = tuple(m for m in range(n_sink, n - n_recent) if share[m] >= MIN_SHOWN)
            if shown:
                out.append((n, shown))
    return tuple(out)


@torch.no_grad()
def memory_rollouts(pipe, compressor, count: int, seconds: float = MAX_ROLLOUT_SECONDS, seed: int = 0,
                    policy_options: dict | None = None, max_tries: int = 50) -> list[Rollout]:
    """``count`` ground-truth memory clips of ``seconds`` (≤ 5 s) with at least one return each,
    for the PackForcing layout of ``policy_options`` (sink / recent sizes); scenes from ``seed``."""
    if not 0 < seconds <= MAX_ROLLOUT_SECONDS:
        raise ValueError(f"memory clips must be at most {MAX_ROLLOUT_SECONDS:g} s (the training length), got {seconds}")
    model, vae = pipe.transformer, pipe.vae
    probe = policy_for(pipe, compressor, 1, **(policy_options or {}))
    ranges = block_frame_ranges(pipe.num_blocks(seconds), pipe.block_frames, vae.temporal_ratio)
    frames = ranges[-1][1]
    height, width = pipe.height, pipe.width
    rng = np.random.default_rng(seed)
    out, tries = [], 0
    while len(out) < count:
        tries += 1
        if tries > max_tries * max(count, 1):
            raise ValueError(f"found {len(out)} of {count} memory clips with a return for sink {probe.n_sink} + "
                             f"recent {probe.n_recent} blocks in {tries - 1} tries: use a smaller recent window")
        scene, start = training_clip(rng)
        returns = clip_returns(visible(scene, frames, height, width, pipe.fps, start)[:, 0], ranges,
                               probe.n_sink, probe.n_recent)
        if not returns:
            continue
        pixels = to_pixels(scene.render(frames, height, width, pipe.fps, start=start))[None].to(model.device)
        latents = vae.encode(pixels)  # [1, C, F, h, w], normalised
        blocks, lr_tokens = [], []
        for b, (a, e) in enumerate(ranges):
            x0 = latents[:, :, b * pipe.block_frames:(b + 1) * pipe.block_frames]
            blocks.append(x0)
            lr_tokens.append(None if compressor.mode == "hr" else compressor.lr(
                x0, vae, model.patch_embedding, compressor.output_grid(*x0.shape[2:]),
                pixels=pixels[:, :, a:e], first_block=b == 0).detach())
        out.append(Rollout(blocks, lr_tokens, pipe.encode_prompt(memory_caption(scene)), returns))
    return out
