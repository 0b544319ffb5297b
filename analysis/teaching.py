"""The teaching view: one generation block's life in plain language, with the run's numbers filled in
(noise → denoising steps → decode → commit → compression → selection → RoPE re-positioning →
attention), each step naming the Studio panel that shows it. A pure function of the trace tables
and ``meta`` (`packforcing.trace`); Markdown out."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

import pandas as pd

MB = 2**20


def _rows(tables, name, block):
    df = (tables or {}).get(name)
    if df is None or not len(df):
        return None
    part = df[df["block"] == block]
    return part if len(part) else None


def _text(value) -> str:
    """User text shown as text: HTML escaped, Markdown's special characters backslashed."""
    escaped = html.escape(str(value), quote=False)
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|>~" else c for c in escaped)


def _seconds(timing, phase) -> float:
    if timing is None:
        return 0.0
    return float(timing.loc[timing["phase"] == phase, "seconds"].sum())


def block_story(tables: Mapping | None, meta: Mapping | None, block: int) -> str:
    """Markdown: what happened to generation ``block`` (see the module docstring)."""
    meta = dict(meta or {})
    info = _rows(tables, "blocks", block)
    if info is None:
        return f"*Block {block} has not been recorded (yet).*"
    info = info.iloc[0]
    policy = meta.get("policy") or "this policy"
    occ = _rows(tables, "occupancy", block)
    timing = _rows(tables, "timing", block)
    steps = int(occ["step"].max()) if occ is not None else None  # S: the commit pass is step S
    layers = int(occ["layer"].nunique()) if occ is not None else None
    per = {}
    if occ is not None:
        final = occ[occ["step"] == occ["step"].max()]
        per = final.groupby("partition")["tokens"].mean().to_dict()
    current = int(per.get("current", 0))
    lines = [f"### Block {block}: {info['video_seconds']:.2f} s of video, {int(info['latent_frames'])} latent "
             f"frames, made in {info['seconds']:.2f} s ({_text(policy)})"]

    switch = _rows(tables, "switches", block)
    if switch is not None:
        s = switch.iloc[0]
        prompts = meta.get("prompts") or []
        new = prompts[int(s["prompt_index"])]["prompt"] if int(s["prompt_index"]) < len(prompts) else "?"
        how = (f"the cache was **re-cached**: {int(s['recached_blocks'])} committed blocks re-run under the new "
               f"prompt in {s['seconds']:.2f} s" if s["mode"] == "recache"
               else "the cache was **kept** as it was (its keys and values still carry the old prompt)")
        lines.append(f"0. **Prompt switch.** From this block on the prompt is “{_text(new)}”; {how}. "
                     "→ the dashed line in *Cache occupancy* and *Latency and memory*")

    denoise = _seconds(timing, "denoise")
    lines.append(f"1. **Noise.** The block starts as Gaussian noise: {current:,} tokens per layer"
                 + (f" ({layers} layers)." if layers else "."))
    if steps is not None:
        lines.append(f"2. **Denoising.** {steps} denoising steps in {denoise:.2f} s: each step the block's tokens "
                     "attend to the cache and the model predicts the clean block. → *Cache occupancy* (x = steps)")
    lines.append(f"3. **Decode.** The streaming VAE turns the clean latents into video frames in "
                 f"{_seconds(timing, 'decode'):.2f} s. → the preview / the video")
    lines.append(f"4. **Commit.** One more pass at t = 0 writes the block's clean keys and values into the cache "
                 f"({_seconds(timing, 'commit'):.2f} s). → *Latency and memory*")

    grid = meta.get("compressed_grid")
    selected = _rows(tables, "scores", block)
    if per.get("mid_archive", 0) or selected is not None or "compress" in set(getattr(timing, "phase", [])):
        n_c = math.prod(grid) if grid else None
        ratio = f", {current / n_c:.0f}× fewer" if n_c and current else ""
        lines.append(f"5. **Compression.** The block is also packed into "
                     f"{n_c if n_c else 'a few'} compressed tokens"
                     f"{f' (a {grid[0]}×{grid[1]}×{grid[2]} grid)' if grid else ''} instead of {current:,}{ratio}"
                     f" ({_seconds(timing, 'compress'):.2f} s). It keeps its full tokens while it is *recent*; when it "
                     "leaves the recent window, only the compressed tokens stay, in the mid archive.")
    else:
        lines.append(f"5. **Compression.** None: {_text(policy)} keeps no compressed mid blocks "
                     "(a block is either kept at full resolution or dropped).")

    if selected is not None:
        mean = selected.groupby("candidate").agg(score=("score", "mean"), sel=("selected", "mean"))
        chosen = mean[mean["sel"] > 0.5].sort_values("score", ascending=False)
        top = ", ".join(f"{int(c)} ({r.score:.3g})" for c, r in chosen.head(6).iterrows())
        more = f" and {len(chosen) - 6} more" if len(chosen) > 6 else ""
        k = int(selected.groupby("layer")["selected"].sum().max())
        lines.append(f"6. **Selection.** Each layer attended the top {k} of the {len(mean)} archived mid blocks, "
                     "ranked by the score q·k/√d of this block's and the recent blocks' queries against each mid "
                     f"block's keys; {len(chosen)} blocks were chosen by most layers: {top or 'none'}{more} "
                     "(mean score). → *Top-k scores*, *Mid-token inspector*")
    else:
        lines.append("6. **Selection.** No mid candidates at this block (no archive yet, or a policy without "
                     "top-k selection).")

    pos = _rows(tables, "positions", block)
    if pos is not None:
        first = pos[pos["layer"] == pos["layer"].min()]
        moved = first[first["pos_before"] != first["pos_after"]]
        span = first["pos_after"].max() + int(info["latent_frames"])
        lines.append(f"7. **RoPE re-positioning.** {len(moved)} of {len(first)} attended blocks were given new "
                     f"temporal positions so the kept history is contiguous: every key sits in [0, {span:g}) "
                     f"latent frames although this block is at frame {int(block * info['latent_frames'])} of the "
                     f"video. → *RoPE position map*")
    parts = {k: int(per[k]) for k in ("sink", "mid_selected", "recent", "current") if k in per}
    attended = sum(parts.values())
    mass = _rows(tables, "mid_attention", block)
    share = ""
    if mass is not None:
        share_value = mass.groupby("layer")["mass"].sum().mean()
        share = f" The compressed mid tokens receive {share_value:.1%} of the attention of the sampled queries."
    if attended:
        bits = ", ".join(f"{name.replace('_', ' ')} {tokens:,}" for name, tokens in parts.items() if tokens)
        lines.append(f"8. **Attention.** The block attends {attended:,} tokens per layer ({bits}); the cache "
                     f"holds {int(info['kv_tokens']):,} tokens, {info['kv_bytes'] / MB:.2f} MB of keys and values."
                     f"{share} → *Cache occupancy*, *Mid-token inspector*")
    return "\n\n".join(lines)
