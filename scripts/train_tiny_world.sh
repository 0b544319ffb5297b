#!/usr/bin/env bash
# The exact sequence of training commands behind assets/tiny-world (CPU, one thread per process;
# about 4 h of CPU time in all on our 2-core machines: the sum of the per-step times in the logs).
# Every command is resumable: re-run it with the same arguments to continue after an interruption.
# `python -m packforcing.train all` runs the same stages in one go, but with a single transformer
# phase instead of the three below (not re-run end to end here).
set -euo pipefail
OUT=${OUT:-runs/tiny-world}
PY=${PY:-.venv/bin/python}
T="$PY -m packforcing.train --out $OUT --resume --threads 1"
$T vae                                   # 1,100 steps, 9-frame clips
$T vae_decoder                           # 2,100 steps, decoder only, up to 25-frame clips
$T data                                  # encode 200 clips with that encoder (-> latents of the first VAE)
$T transformer --stage-dir transformer_oldlatents --transformer-steps 1600 --transformer-lr 8e-4 \
   --transformer-object-weight 0
$T vae_long                              # 350 steps, encoder + decoder on 25-frame clips
$T data                                  # re-encode the clips with the long-clip VAE
$T transformer --stage-dir transformer_ft500 --transformer-steps 500 --transformer-lr 5e-4 \
   --transformer-object-weight 0 --transformer-init "$OUT/transformer_oldlatents/checkpoint.safetensors"
$T vae_decoder_ft --vae-decoder-ft-steps 1500 --vae-decoder-ft-lr 8e-4   # colours of small objects
# object-weighted loss: the model learns to draw objects at all (but over-draws them: the weights
# depend on the target, which biases the prediction towards "object"; see docs/tiny_world_v1.md) ...
$T transformer --stage-dir transformer_obj2000 --transformer-steps 2000 --transformer-lr 3e-4 \
   --transformer-object-weight 4 --transformer-init "$OUT/transformer_ft500/checkpoint.safetensors"
# ... then an unweighted fine-tune removes the bias, but 600 steps of it drift back towards drawing
# background only (objects fade after the first block) ...
$T transformer --stage-dir transformer_unbias600 --transformer-steps 600 --transformer-lr 2e-4 \
   --transformer-object-weight 0 --transformer-init "$OUT/transformer_obj2000/checkpoint.safetensors"
# ... so the shipped transformer is the midpoint of the two (weight-space interpolation)
$T average --average-from "$OUT/transformer_obj2000/checkpoint.safetensors" \
   "$OUT/transformer_unbias600/checkpoint.safetensors" --average-weight 0.5
# compressor (three-partition context, against the shipped transformer), sampler stored with the model
$T compressor --sample-solver euler --sample-steps 1000 875 750 625 500 375 250 125 \
   --export assets/tiny-world "$@"
