#!/usr/bin/env bash
# The GPU check of the fused LoRA kernels, in one script (about 6 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh               # GPU machine: torch, nvcc, no network needed
#   bash benchmarks/gpu_check.sh --dry-run     # anywhere: compiles in a temp dir, CPU stages only
#   bash benchmarks/gpu_check.sh --full-grid   # the full microbenchmark grid (long; opt-in)
#
# Stages, each with its own timeout and all under one deadline, so a hung stage cannot eat the rest:
#   env        GPU / torch / nvcc versions -> environment.json
#   build      pip install --no-deps --no-build-isolation --no-index -e .  (builds lightning_peft._C,
#              MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0); dry run: .ci/compile_cuda.sh in a temp dir
#   load       the kernels import and register (a JIT build happens here if the prebuilt one fails)
#   tests      pytest tests/test_cuda_*.py (not the CPU emulation: the real kernels are here) -> tests.xml
#   bench      pytest benchmarks/bench_kernels.py (LP_BENCH_GRID=gpu; cpu on a dry run) -> kernels.md/json
#   profile    per-kernel device time of floor / eager / ours at the target config -> profile.json
#   e2e_peft, e2e_ours   benchmarks/e2e_gpu.py, one process each (own peak memory) -> e2e_*.json
#   memcheck   compute-sanitizer memcheck over benchmarks/gpu_sanitize.py
#   racecheck  compute-sanitizer racecheck --quick, only when time is left
#   report     summary.md / summary.json / results.png; the compact summary is printed last
# Results go to benchmarks/results/gpu_check/ (a temp dir on a dry run) and, when $OUT is set,
# the main files are copied there too.
# Env: PYTHON (default .venv/bin/python if present, else python3), LP_GPU_CHECK_BUDGET_S (default
# 420: the deadline for everything), LP_GPU_CHECK_RESULTS (results dir), LP_E2E_LAYERS (default 2:
# more layers shrink the share of the fixed embedding / lm_head / loss cost), MAX_JOBS, TORCH_CUDA_ARCH_LIST.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
DRY=0
GRID=gpu
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --full-grid) GRID=full ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY: running the dry run (CPU stages only)"
  DRY=1
fi
if [ $DRY = 1 ]; then
  RES=${LP_GPU_CHECK_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/lightning_peft_gpu_check.XXXXXX")}
  GRID=cpu
else
  RES=${LP_GPU_CHECK_RESULTS:-$ROOT/benchmarks/results/gpu_check}
fi
mkdir -p "$RES"
rm -f "$RES"/*.tsv "$RES"/*.json "$RES"/*.xml "$RES"/*.md "$RES"/*.log "$RES"/*.png
exec > >(tee "$RES/gpu_check.log") 2>&1

START=$(date +%s)
BUDGET=${LP_GPU_CHECK_BUDGET_S:-420}
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PY RES GRID ROOT
echo "gpu_check: $(date -u +%FT%TZ) dry_run=$DRY grid=$GRID python=$PY results=$RES budget=${BUDGET}s"

# stage NAME MAX_SECONDS MIN_SECONDS 'bash commands'
stage() {
  local name=$1 max=$2 min=$3 body=$4
  local left=$((DEADLINE - $(date +%s) - 20))  # 20 s kept for the report
  local limit=$max
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt "$min" ]; then
    echo "== [$name] skipped: only ${left}s left"
    printf '%s\tskip\t0\tout of time\n' "$name" >>"$RES/stages.tsv"
    return 0
  fi
  echo "== [$name] (timeout ${limit}s)"
  local t0 rc dt note=""
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$body"
  rc=$?
  dt=$(($(date +%s) - t0))
  if [ $rc = 124 ] || [ $rc = 137 ]; then note="timed out after ${limit}s"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >>"$RES/stages.tsv"
  echo "== [$name] exit $rc in ${dt}s $note"
}

stage env 60 5 '
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "no nvcc on PATH"
  "$PY" - <<PYEOF
import json, os, subprocess, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": os.sys.version.split()[0]}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
else:
    env["gpu"] = "none (dry run)"
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except Exception:
    env["commit"] = "unknown"
json.dump(env, open(os.path.join(os.environ["RES"], "environment.json"), "w"), indent=1)
print(env)
PYEOF
'

if [ $DRY = 1 ]; then
  stage build 600 30 'LIGHTNING_PEFT_CUDA_BUILD_DIR="$RES/jit_build" bash .ci/compile_cuda.sh'
else
  stage build 300 30 '
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LIGHTNING_PEFT_BUILD_CUDA=1
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -v -e . >"$RES/build.log" 2>&1
    rc=$?
    grep -E "error|warning: |Error" "$RES/build.log" | head -40
    tail -3 "$RES/build.log"
    exit $rc'
  stage load 240 20 '
    "$PY" - <<PYEOF
import json, os, sys, torch
from lightning_peft.ops import cuda_backend
ok = cuda_backend.load()
status = cuda_backend.status()
print("kernels:", status)
path = os.path.join(os.environ["RES"], "environment.json")
env = json.load(open(path)) if os.path.exists(path) else {}
env["kernels"] = status["source"] if ok else "FAILED: " + status["reason"][-300:]
json.dump(env, open(path, "w"), indent=1)
sys.exit(0 if ok else 1)
PYEOF'
fi

XDIST=""
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
export XDIST
stage tests 200 30 '"$PY" -m pytest $(ls tests/test_cuda_*.py | grep -v test_cuda_emulation.py) -q -rfEs $XDIST --junitxml="$RES/tests.xml" 2>&1 | tail -60; exit ${PIPESTATUS[0]}'

stage bench 240 30 '
  LP_BENCH_GRID=$GRID "$PY" -m pytest benchmarks/bench_kernels.py -q --benchmark-json="$RES/bench.json" \
    --benchmark-columns=median,rounds >"$RES/bench.log" 2>&1
  rc=$?
  tail -5 "$RES/bench.log"
  "$PY" benchmarks/bench_kernels_report.py "$RES/bench.json" --out-dir "$RES" >/dev/null || rc=1
  exit $rc'

if [ $DRY = 0 ]; then
  stage profile 90 20 '"$PY" benchmarks/gpu_profile.py --json "$RES/profile.json"'
fi

if [ $DRY = 1 ]; then E2E_ARGS="--tiny --cpu"; else E2E_ARGS="--layers ${LP_E2E_LAYERS:-2}"; fi
export E2E_ARGS
stage e2e_peft 150 40 '"$PY" benchmarks/e2e_gpu.py --impl peft $E2E_ARGS --json "$RES/e2e_peft.json" 2>&1 | grep -v -i "tip\|litlogger\|deprecated" | tail -8; exit ${PIPESTATUS[0]}'
stage e2e_ours 150 40 '"$PY" benchmarks/e2e_gpu.py --impl ours $E2E_ARGS --json "$RES/e2e_ours.json" 2>&1 | grep -v -i "tip\|litlogger\|deprecated" | tail -8; exit ${PIPESTATUS[0]}'

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || ls /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1 || true)
export SANITIZER
if [ $DRY = 1 ]; then
  echo "== [memcheck] skipped: dry run (no GPU)"
  printf 'memcheck\tskip\t0\tdry run\n' >>"$RES/stages.tsv"
elif [ -z "$SANITIZER" ]; then
  echo "== [memcheck] skipped: compute-sanitizer not found"
  printf 'memcheck\tskip\t0\tcompute-sanitizer not found\n' >>"$RES/stages.tsv"
else
  stage memcheck 150 40 '
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
      "$PY" benchmarks/gpu_sanitize.py >"$RES/sanitizer.log" 2>&1
    rc=$?
    tail -15 "$RES/sanitizer.log"
    exit $rc'
  stage racecheck 90 60 '
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
      "$PY" benchmarks/gpu_sanitize.py --quick >>"$RES/sanitizer.log" 2>&1
    rc=$?
    tail -8 "$RES/sanitizer.log"
    exit $rc'
fi

echo "== [report]"
"$PY" benchmarks/gpu_report.py "$RES" >"$RES/summary.txt" 2>&1 || cat "$RES/summary.txt"
"$PY" benchmarks/plot_results.py "$RES/summary.json" "$RES/results.png" || echo "plot failed"
echo "results in $RES ($(($(date +%s) - START)) s total)"
cat "$RES/summary.txt"
failed=$(awk -F'\t' '$1=="build"||$1=="load"||$1=="tests"||$1=="memcheck" {if ($2!="0" && $2!="skip") n++} END {print n+0}' "$RES/stages.tsv")
if [ -n "${OUT:-}" ]; then
  sleep 1  # let tee write the summary into gpu_check.log first
  for f in gpu_check.log summary.md summary.json bench.json tests.xml results.png profile.json sanitizer.log; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
fi
exit $((failed > 0 ? 1 : 0))
