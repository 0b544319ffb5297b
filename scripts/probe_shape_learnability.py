"""Can the transformer learn to read the shape words when that is all it trains on? (issue #13)

    PYTHONPATH=. .venv/bin/python scripts/probe_shape_learnability.py runs/tw-r5s/export /tmp/learn/export 400 5e-4 4
    PYTHONPATH=. .venv/bin/python scripts/probe_shape_learnability.py assets/tiny-world /tmp/learn/uniform 300 5e-4 4 1.0 0.0
    PYTHONPATH=. .venv/bin/python scripts/measure_text_binding.py --model /tmp/learn/export --seeds 3

A diagnostic, not a recipe phase: fine-tunes the exported model SRC (transformer and text encoder,
AdamW, constant LR, no EMA) on nothing but shape-contrast groups (`training.v2.shape_group`: a
random training scene in every shape, text-only first blocks sharing one noise draw and timestep
per group; timesteps as in training: with probability P_INFERENCE one of the sampler's, else
shifted-uniform with SHIFT, default the model's shift and 0.5), then writes a copy of SRC with the new weights to DST for `measure_text_binding.py`.
Prints the running loss every 25 steps. ~1.2 s per step with 4 groups on one core.
"""

import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from packforcing.tiny_world import load_tiny_world  # noqa: E402
from packforcing.training.v2 import ClipPool, TransformerV2Config, TransformerV2Stage  # noqa: E402


def main(src: Path, dst: Path, steps: int, lr: float, groups: int, shift: float | None = None,
         p_inference: float = 0.5) -> None:
    torch.set_num_threads(1)
    pipe = load_tiny_world(src)
    vae = AutoencoderKLWan.from_pretrained(src / "vae").eval().requires_grad_(False)
    model, text = pipe.transformer.train(), pipe.text_encoder
    stage = TransformerV2Stage(model, text, ClipPool(vae, 1), TransformerV2Config(
        shape_groups=groups, bf16=True, seed=99, inference_steps=tuple(pipe.sampler.timesteps),
        shift=pipe.sampler.shift if shift is None else shift, p_inference=p_inference))
    params = list(model.parameters()) + list(text.model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    tic, running = time.time(), 0.0
    for step in range(steps):
        loss, _ = stage.shape_group_loss(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = 0.98 * running + 0.02 * float(loss.detach())
        if step % 25 == 0:
            print(f"step {step}: loss {running / (1 - 0.98 ** (step + 1)):.4f}, {time.time() - tic:.0f} s", flush=True)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(dst / "transformer" / "model.safetensors"))
    shutil.rmtree(dst / "text")
    text.save(dst / "text")
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) not in (6, 8):
        raise SystemExit(__doc__)
    extra = (float(sys.argv[6]), float(sys.argv[7])) if len(sys.argv) == 8 else ()
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), *extra)
