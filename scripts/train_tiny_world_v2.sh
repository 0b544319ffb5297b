#!/usr/bin/env bash
# The second tiny world (WORLD_V2: 64x64, 1-2 large objects, 5 colours, 4 backgrounds, 3 shapes),
# phase by phase. Every phase is resumable (re-run the same line after an interruption) and lands its
# weights in $OUT/<phase>/checkpoint.safetensors; the CPU time of each phase is in its log.csv.
# DEVICE=cuda runs the same phases on a GPU.
set -euo pipefail
OUT=${OUT:-runs/tiny-world-v2}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
T="$PY -m packforcing.train_v2 --out $OUT --resume --threads 1 --device $DEVICE"
$T vae                                        # ~1.2 CPU-h: 1,400 steps, 9 -> 17 -> 25-frame clips
# the two phases below ran side by side (the decoder phase leaves the encoder, hence the latents, alone)
$T vae_decoder &                              # decoder only, 25-frame clips
$T transformer --transformer-steps 2400 --self-context-from 1400   # ~1 CPU-h on a shared core
wait
$T export --export "${EXPORT:-runs/tiny-world-v2/export}" --guidance-scale "${GUIDANCE:-1}"
