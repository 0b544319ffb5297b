#!/usr/bin/env bash
# Sets up everything PackForcing Studio needs on a fresh Debian/Ubuntu machine (or reuses it):
#   system: ffmpeg + ffprobe (Gradio's streaming video), chromium (the browser test)
#   python: .venv with torch 2.13 (CPU build) and requirements-dev.txt
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: warning: please install ${need_apt[*]} (streaming preview / browser test need them)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is a local CPU wheel here; an unpinned torch would pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements-dev.txt
echo "setup: done ($(.venv/bin/python -c 'import torch, diffusers, gradio; print("torch", torch.__version__, "diffusers", diffusers.__version__, "gradio", gradio.__version__)'))"
