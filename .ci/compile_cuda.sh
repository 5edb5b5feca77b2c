#!/usr/bin/env bash
# Compile csrc/ against the CUDA build of torch in .venv (nvcc, no GPU needed), load the library
# and check that its ops registered. Exits non-zero on any compile, link or registration error.
# Builds in a temporary directory (never in build/ or the source tree).
#
# Env: CUDA_HOME (default /usr/local/cuda-13.0), TORCH_CUDA_ARCH_LIST (default 9.0),
#      MAX_JOBS (default: all cores), LIGHTNING_PEFT_CUDA_BUILD_DIR (reuse a build directory),
#      LIGHTNING_PEFT_PTXAS_VERBOSE=1 (print registers / spills per kernel), PYTHON.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PATH="$CUDA_HOME/bin:$PATH"
if [ -n "${LIGHTNING_PEFT_CUDA_BUILD_DIR:-}" ]; then
  build_dir=$LIGHTNING_PEFT_CUDA_BUILD_DIR
else
  build_dir=$(mktemp -d "${TMPDIR:-/tmp}/lightning_peft_cuda.XXXXXX")
  trap 'rm -rf "$build_dir"' EXIT
fi
start=$(date +%s)
"$PY" - "$build_dir" <<'PYEOF'
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"compile_cuda: torch {torch.__version__} is a CPU-only build; install the CUDA build (torch==2.14.1 here)")
from lightning_peft.ops import cuda_backend

print(f"compile_cuda: torch {torch.__version__} (CUDA {torch.version.cuda}), {len(cuda_backend.source_files())} sources -> {sys.argv[1]}")
cuda_backend.jit_build(sys.argv[1], verbose=False)
for name in ("lora_forward", "lora_backward", "set_debug_options", "lora_grouped_forward", "lora_grouped_backward"):
    print("  registered:", getattr(torch.ops.lightning_peft_cuda, name).default._schema)
PYEOF
echo "compile_cuda: OK in $(( $(date +%s) - start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
