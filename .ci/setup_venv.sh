#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned torch and everything the project needs, then install
# the project in editable mode. Idempotent: a second run only checks. Offline-safe except for
# PyPI. Usage: source this file, or run it; afterwards `. .venv/bin/activate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_PIN="torch==2.14.1"   # local CUDA 13.0 build: runs on CPU and lets nvcc build csrc/ (never let pip pick torch)
STAMP=.venv/.lightning_peft_setup_v2  # bump when requirements-dev.txt changes

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_PIN"
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  touch "$STAMP"
fi
# --no-build-isolation: setup.py must see the torch above (it decides whether to build CUDA code);
# the extension itself is compiled separately (.ci/compile_cuda.sh) so installs stay fast.
LIGHTNING_PEFT_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# The CPU kernels of the LoRA op (csrc/cpu/lora_rows.cpp): compiled for this CPU on first use and
# cached in the torch extensions directory; done here so that neither the main job nor the tests
# pay the ~30 s inside a timed run. A compile failure is printed and the PyTorch path is used.
HF_HUB_OFFLINE=1 .venv/bin/python -W ignore -c "
import sys
from lightning_peft.ops import cpu_backend
if not cpu_backend.load():
    print('lightning_peft: CPU kernels unavailable:', cpu_backend.status()['reason'], file=sys.stderr)
"
