"""Why does trained PackForcing not beat sink_window on the tiny world? (issue #5's investigation)

    .venv/bin/python scripts/investigate_tiny_world.py      # ~10 min on one CPU thread

30-second videos of the first 4 held-out prompts (the evaluation's seeds) for sink_window and
PackForcing variants that isolate the mid tokens (top_k), the compressor branch (LR / HR / both),
and how many mid blocks are attended. Prints one line per variant (means over the prompts) and
writes docs/eval/investigate_30s.csv (one row per video).
"""
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
from analysis.evaluate import PolicySpec, heldout_prompts, run_one, score  # noqa: E402
from packforcing.tiny_world import load_tiny_world  # noqa: E402

pipe = load_tiny_world()
pf = dict(sink_frames=8, recent_frames=4, top_k=8, archive_blocks=16)
specs = [
    PolicySpec("sink_window (8+8)", "sink_window", options=dict(sink_frames=8, window_frames=8)),
    PolicySpec("pf trained HR+LR", "packforcing", "both", dict(pf)),
    PolicySpec("pf top_k=0 (sink 8 + recent 4 only)", "packforcing", "both", dict(pf, top_k=0)),
    PolicySpec("pf zero-shot LR", "packforcing", "lr", dict(pf)),
    PolicySpec("pf trained HR only", "packforcing", "hr", dict(pf)),
    PolicySpec("pf trained, top_k=2", "packforcing", "both", dict(pf, top_k=2)),
]
rows = []
for spec in specs:
    for prompt, seed in heldout_prompts(4):
        video, stats = run_one(pipe, spec, prompt, seed, 30)
        rows.append(dict(policy=spec.label, prompt=prompt, **score(video, prompt), **stats))
    df = pd.DataFrame(rows)
    m = df[df.policy == spec.label][["fidelity", "background_similarity", "dynamics", "jump_ratio", "peak_kv_tokens"]].mean()
    print(f"{spec.label:38s} fid {m.fidelity:.3f} bg {m.background_similarity:.3f} dyn {m.dynamics:.2f} jump {m.jump_ratio:.2f} kv {m.peak_kv_tokens:.0f}", flush=True)
pd.DataFrame(rows).to_csv("docs/eval/investigate_30s.csv", index=False)
