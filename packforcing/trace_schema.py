"""The trace's tables: names, columns and dtypes (the contract of `TraceRecorder.tables` and of the
files of `packforcing.trace_io`; read in prose in docs/trace.md). Units: blocks are generation
blocks, frames latent frames, tokens per layer, seconds wall time.

- ``occupancy``  block, step, layer, partition, tokens, bytes — KV tokens/bytes held per
  partition at one denoising step (``step`` = 0..S-1, ``S`` = the clean commit pass).
  Convention: ``mid_archive`` counts every compressed mid block held (stored), and
  ``mid_selected`` the top-k subset of it attended this block, so
  stored = sink + mid_archive + recent + current, attended = sink + mid_selected + recent + current.
- ``scores``     block, layer, candidate, frame_start, frame_end, score, selected, rank —
  one row per mid candidate; frames are latent frames [start, end); rank is 1-based by
  descending score within (block, layer), ties broken by report order.
- ``positions``  block, layer, region, source_block, frame_start, frame_end, pos_before,
  pos_after — temporal RoPE start position of each cached block before/after adjustment.
- ``timing``     block, phase, seconds — wall seconds, one row per report (not summed).
- ``blocks``     block, seconds, latent_frames (added by the block), video_seconds, kv_tokens, kv_bytes,
  peak_memory_bytes — ``seconds`` = wall time of the block, ``video_seconds`` = seconds of
  video the block adds, ``peak_memory_bytes`` may be missing (nullable ``Int64``).
- ``mid_attention`` block, layer, source_block, token, token_t, token_y, token_x, mass — for every
  token of every *selected* mid block: the attention probability it receives from the current
  block's sampled queries at the commit pass (mean over the query sample, the scoring heads and the
  batch rows; softmax over everything the block attends). ``token`` indexes the block's compressed
  tokens, (token_t, token_y, token_x) its cell in the compressed grid (``meta["compressed_grid"]``).
  Per block: layers × selected blocks × N_c rows (tiny world, 64×64: 4 × ≤16 × 2 ≤ 128).
- ``switches``   block, video_seconds, prompt_index, mode, recached_blocks, seconds — a prompt
  switch at the start of ``block`` (``video_seconds`` of video before it) to prompt
  ``meta["prompts"][prompt_index]``; ``mode`` "keep" | "recache"; ``recached_blocks`` committed
  blocks re-run under the new prompt, in ``seconds`` of wall time.
"""

from __future__ import annotations

PARTITIONS = ("sink", "mid_archive", "mid_selected", "recent", "current")
PHASES = ("denoise", "commit", "compress", "select", "rope", "decode", "recache")

#: column -> dtype for every table (the contract of :meth:`TraceRecorder.tables`).
SCHEMA: dict[str, dict[str, str]] = {
    "occupancy": {"block": "int64", "step": "int64", "layer": "int64", "partition": "str",
                  "tokens": "int64", "bytes": "int64"},
    "scores": {"block": "int64", "layer": "int64", "candidate": "int64", "frame_start": "int64",
               "frame_end": "int64", "score": "float64", "selected": "bool", "rank": "int64"},
    "positions": {"block": "int64", "layer": "int64", "region": "str", "source_block": "int64",
                  "frame_start": "int64", "frame_end": "int64", "pos_before": "float64",
                  "pos_after": "float64"},
    "timing": {"block": "int64", "phase": "str", "seconds": "float64"},
    "blocks": {"block": "int64", "seconds": "float64", "latent_frames": "int64",
               "video_seconds": "float64", "kv_tokens": "int64", "kv_bytes": "int64",
               "peak_memory_bytes": "Int64"},
    "mid_attention": {"block": "int64", "layer": "int64", "source_block": "int64", "token": "int64",
                      "token_t": "int64", "token_y": "int64", "token_x": "int64", "mass": "float64"},
    "switches": {"block": "int64", "video_seconds": "float64", "prompt_index": "int64", "mode": "str",
                 "recached_blocks": "int64", "seconds": "float64"},
}
TABLES = tuple(SCHEMA)
