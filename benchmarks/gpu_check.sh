#!/usr/bin/env bash
# The GPU check of the fused LoRA kernels, in one script: correctness first, then timing.
#
#   bash benchmarks/gpu_check.sh             # GPU machine (H200 image: python3, torch, nvcc, no network, no .venv)
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: compiles for sm_90, CPU stages, GPU stages marked "dry run"
#
# Stages in order (limits in seconds; the correctness limits add up to less than the budget, so
# they are never skipped for time on a healthy machine; the benchmarks share what is left):
#   env        GPU / torch / nvcc / compute-sanitizer versions -> environment.json                     20
#   build      JIT build of csrc/ (ptxas -v: registers.txt) and the ops registered -> build.log       150
#   tests      pytest tests/test_cuda_*.py, forced-split and target-shape tests included -> tests.xml 130
#   memcheck   compute-sanitizer memcheck over the forced-split test of every kernel instantiation    70
#   racecheck  compute-sanitizer racecheck, bf16 instantiations                                        40
#   synccheck  compute-sanitizer synccheck, bf16 instantiations                                        25
#   kernels    benchmarks/gpu_bench.py kernels (target config first) -> kernels.json          time left
#   e2e_peft, e2e_ours   benchmarks/gpu_bench.py e2e, one process each -> e2e_*.json          time left
#   profile    per-kernel device time at the target config -> profile.json                    time left
#   report     summary.md / summary.json / results.png; the compact table is printed last
# Each stage's status: passed, failed, timed out, skipped: out of time, refused by device (the
# sanitizer said "Device not supported", as on gVisor), not run: <why>.
# Exit: 1 if a correctness stage (build, tests, memcheck, racecheck, synccheck) failed, timed out
# or was skipped (on a GPU also: no compute-sanitizer); else 3 if a sanitizer refused the device;
# else 2 if a benchmark stage failed; else 0.
# Results: benchmarks/results/gpu_check/ (a temp dir on a dry run) and $OUT when set.
# Env: PYTHON (default .venv/bin/python if present, else python3; the checkout is put first on
# PYTHONPATH, so no install is needed), LP_GPU_CHECK_BUDGET_S (default 450; 1500 on a dry run),
# LP_GPU_CHECK_RESULTS, TORCH_EXTENSIONS_DIR (default /tmp/lightning_peft_gpu_check_ext),
# MAX_JOBS, TORCH_CUDA_ARCH_LIST (default 9.0), LP_E2E_LAYERS (default 2), COMPUTE_SANITIZER.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,30p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY: running the dry run"
  DRY=1
fi
if [ $DRY = 1 ]; then
  RES=${LP_GPU_CHECK_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/lightning_peft_gpu_check.XXXXXX")}
  BUDGET=${LP_GPU_CHECK_BUDGET_S:-1500}
else
  RES=${LP_GPU_CHECK_RESULTS:-$ROOT/benchmarks/results/gpu_check}
  BUDGET=${LP_GPU_CHECK_BUDGET_S:-450}
fi
mkdir -p "$RES"
rm -f "$RES"/*.tsv "$RES"/*.json "$RES"/*.xml "$RES"/*.md "$RES"/*.log "$RES"/*.png "$RES"/*.txt
exec > >(tee "$RES/gpu_check.log") 2>&1

START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=15
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PY RES ROOT DRY
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/lightning_peft_gpu_check_ext}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export LIGHTNING_PEFT_PTXAS_VERBOSE=1  # part of the build flags: every stage must agree, or it rebuilds
if [ -z "${CUDA_HOME:-}" ]; then  # torch would guess /usr/local for a /usr/local/bin/nvcc wrapper
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /none/bin/nvcc)")")")" /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; break; fi
  done
fi
JIT_DIR=$TORCH_EXTENSIONS_DIR/lightning_peft_cuda_jit
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1 || true)}
export SANITIZER
echo "gpu_check: $(date -u +%FT%TZ) dry_run=$DRY python=$PY results=$RES budget=${BUDGET}s"

record() {  # record NAME STATUS RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RES/stages.tsv"
}

# stage NAME MAX MIN 'bash commands': run with limit min(MAX, time left - report reserve);
# skipped when that is under MIN. Exit code 90 from the body means "refused by device".
stage() {
  local name=$1 max=$2 min=$3 body=$4
  local left=$((DEADLINE - $(date +%s) - REPORT_RESERVE))
  local limit=$max
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt "$min" ]; then
    echo "== [$name] skipped: out of time (${left}s left, needs ${min}s)"
    record "$name" "skipped: out of time" - 0 "$((limit > 0 ? limit : 0))" "${left}s left"
    return 0
  fi
  echo "== [$name] (limit ${limit}s)"
  local t0 rc dt status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$body"
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status=passed ;;
    90) status="refused by device" ;;
    124|137) status="timed out" ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$dt" "$limit" "${NOTE:-}"
  echo "== [$name] $status (exit $rc) in ${dt}s"
  return 0
}

not_run() {  # not_run NAME WHY
  echo "== [$1] not run: $2"
  record "$1" "not run: $2" - 0 - ""
}

status_of() { awk -F'\t' -v n="$1" '$1==n {s=$2} END {print s}' "$RES/stages.tsv"; }

# ------------------------------------------------------------------------------------- env
stage env 20 5 '
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "no nvcc on PATH (torch finds CUDA_HOME itself)"
  if [ -n "$SANITIZER" ]; then "$SANITIZER" --version 2>&1 | tail -1; else echo "no compute-sanitizer"; fi
  "$PY" - <<PYEOF
import json, os, subprocess, sys, torch
import lightning_peft
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0], "dry_run": os.environ["DRY"] == "1",
       "lightning_peft": os.path.dirname(lightning_peft.__file__)}  # the checkout (PYTHONPATH), not an install
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
PYEOF'

# ----------------------------------------------------------------------------------- build
BUILD_LIMIT=150
if [ $DRY = 1 ]; then BUILD_LIMIT=900; fi  # 2 cores here, 16 there
rm -f "$JIT_DIR/lock"  # nothing else builds here: a lock can only be left over
stage build $BUILD_LIMIT 30 '
  "$PY" - >"$RES/build.log" 2>&1 <<PYEOF
import json, os, sys, time, torch
from lightning_peft.ops import cuda_backend
t0 = time.time()
path = os.path.join(os.environ["RES"], "environment.json")
env = json.load(open(path)) if os.path.exists(path) else {}
try:
    cuda_backend.jit_build(verbose=True)  # the default directory: the one every later load looks in
    ops = torch.ops.lightning_peft_cuda
    for name in ("lora_forward", "lora_backward", "set_debug_options"):
        print("registered:", getattr(ops, name).default._schema)
    env["kernels"] = f"jit build, {time.time() - t0:.0f} s"
except Exception as exc:
    env["kernels"] = f"build FAILED: {type(exc).__name__}: {str(exc)[-300:]}"
    raise
finally:
    json.dump(env, open(path, "w"), indent=1)
    print("build:", env["kernels"])
PYEOF
  rc=$?
  grep -E "error|registered:|^build:" "$RES/build.log" | head -20
  "$PY" - "$RES/build.log" >"$RES/registers.txt" <<PYEOF
import re, sys
name = None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function .*?(dropout_hidden_kernel|dropout_grad_kernel|reduce_splits_kernel)I\d*(\w+?)(?:Li(\d+)E)?E", line)
    if m:
        dtype = {"f": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}.get(m.group(2), m.group(2))
        name = f"{m.group(1)} {dtype}" + (f" R={16 * int(m.group(3))}" if m.group(3) else "")
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and name:
        spill = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        print(f"{name:<32} registers {m.group(1):>3}  spill stores {spill} B")
        name = None
PYEOF
  cat "$RES/registers.txt"
  exit $rc'
case $(status_of build) in
  passed) ;;
  "timed out") rm -f "$JIT_DIR/lock"; export LIGHTNING_PEFT_NO_JIT=1 ;;  # a killed build leaves torch's lock
  *) export LIGHTNING_PEFT_NO_JIT=1 ;;  # later stages fail fast ("not built") instead of compiling again
esac

# ----------------------------------------------------------------------------------- tests
XDIST=""  # pytest options the image may lack: 4 workers, and a per-test limit so one hang cannot eat the stage
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then XDIST="$XDIST --timeout=90"; fi
if [ $DRY = 1 ]; then TEST_FILES=$(ls tests/test_cuda_*.py); else TEST_FILES=$(ls tests/test_cuda_*.py | grep -v test_cuda_emulation.py); fi
export XDIST TEST_FILES
stage tests $([ $DRY = 1 ] && echo 600 || echo 130) 30 '
  "$PY" -m pytest $TEST_FILES -q -rfEs $XDIST -p no:cacheprovider --durations=15 --junitxml="$RES/tests.xml" >"$RES/tests.log" 2>&1
  rc=$?
  grep -v "^SKIPPED" "$RES/tests.log" | tail -30
  exit $rc'

# ------------------------------------------------------------------------------ sanitizers
# The forced-split test of every kernel instantiation (tests/test_cuda_lora_op.py) and the grouped kernels'
# fp64-reference cases (tests/test_cuda_lora_grouped.py), one process,
# no caching allocator (each tensor its own allocation, so an overrun leaves it).
sanitize() {  # sanitize NAME MAX TOOL PYTEST_K
  local name=$1 max=$2 tool=$3 k=$4
  if [ -z "$SANITIZER" ]; then
    if [ $DRY = 1 ]; then not_run "$name" "dry run (no GPU)"; else record "$name" "failed" - 0 - "compute-sanitizer not found"; fi
    return
  fi
  if [ $DRY = 1 ] && [ -z "${COMPUTE_SANITIZER:-}" ]; then not_run "$name" "dry run (no GPU)"; return; fi
  if [ "$(status_of build)" != passed ]; then record "$name" "failed" - 0 - "no kernels (build $(status_of build))"; echo "== [$name] failed: no kernels"; return; fi
  TOOL=$tool K=$k stage "$name" "$max" 20 '
    log="$RES/$TOOL.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$TOOL" --error-exitcode 1 --print-limit 20 \
      "$PY" -m pytest tests/test_cuda_lora_op.py tests/test_cuda_lora_grouped.py -q -p no:cacheprovider -k "$K" >"$log" 2>&1
    rc=$?
    tail -12 "$log"
    if grep -q -E "Device not supported|device is not supported" "$log"; then exit 90; fi
    exit $rc'
}
# the grouped (mixed-adapter) kernels: their fp64-reference cases, bf16 for the race / sync checks
sanitize memcheck 70 memcheck "walks_many_tiles or grouped_kernels_match_fp64"
sanitize racecheck 40 racecheck "(walks_many_tiles or grouped_kernels_match_fp64) and bfloat16"
sanitize synccheck 25 synccheck "(walks_many_tiles or grouped_kernels_match_fp64) and bfloat16"

# ------------------------------------------------------------------------------ benchmarks
# Whatever time is left, the most telling first: the microbenchmark (target config first), the
# two end-to-end runs, the profile. Each leaves room for the minimum of the ones after it.
left_minus() { echo $((DEADLINE - $(date +%s) - REPORT_RESERVE - $1)); }
if [ $DRY = 1 ]; then GRID=cpu; E2E_ARGS="--tiny --cpu"; else GRID=gpu; E2E_ARGS="--layers ${LP_E2E_LAYERS:-2}"; fi
export GRID E2E_ARGS
KERNELS_LIMIT=$(left_minus 110)
if [ "$KERNELS_LIMIT" -gt 150 ]; then KERNELS_LIMIT=150; fi
export KERNELS_BUDGET=$((KERNELS_LIMIT - 20))
stage kernels "$KERNELS_LIMIT" 40 '"$PY" benchmarks/gpu_bench.py kernels --grid $GRID --out "$RES" --budget-s $KERNELS_BUDGET'
stage e2e_peft 100 45 '"$PY" benchmarks/gpu_bench.py e2e --impl peft $E2E_ARGS --out "$RES" 2>&1 | grep -v -i "tip\|litlogger\|deprecat" | tail -6; exit ${PIPESTATUS[0]}'
stage e2e_ours 100 45 '"$PY" benchmarks/gpu_bench.py e2e --impl ours $E2E_ARGS --out "$RES" 2>&1 | grep -v -i "tip\|litlogger\|deprecat" | tail -6; exit ${PIPESTATUS[0]}'
if [ $DRY = 0 ]; then
  stage profile 60 20 '"$PY" benchmarks/gpu_bench.py profile --out "$RES"'
else
  not_run profile "dry run (no GPU)"
fi

# ---------------------------------------------------------------------------------- report
echo "== [report]"
"$PY" benchmarks/gpu_bench.py report "$RES" >"$RES/summary.txt" 2>&1 || cat "$RES/summary.txt"
"$PY" benchmarks/plot_results.py "$RES/summary.json" "$RES/results.png" >/dev/null 2>&1 || echo "plot failed"
exit_code=$(awk -F'\t' '
  $1 ~ /^(build|tests|memcheck|racecheck|synccheck)$/ && $2 !~ /^(passed|refused by device|not run)/ {bad=1}
  $1 ~ /^(memcheck|racecheck|synccheck)$/ && $2 == "refused by device" {refused=1}
  $1 ~ /^(kernels|e2e_peft|e2e_ours|profile)$/ && ($2 == "failed" || $2 == "timed out") {bench=1}
  END {print bad ? 1 : refused ? 3 : bench ? 2 : 0}' "$RES/stages.tsv")
echo "results in $RES ($(($(date +%s) - START)) s total); exit $exit_code"
if [ -n "${OUT:-}" ]; then
  for f in summary.md summary.json summary.txt stages.tsv environment.json tests.xml kernels.json profile.json e2e_peft.json \
           e2e_ours.json registers.txt results.png tests.log memcheck.log racecheck.log synccheck.log build.log; do
    case $f in
      *.log) [ -f "$RES/$f" ] && tail -c 300000 "$RES/$f" >"$OUT/$f" ;;  # logs: their ends
      *) [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/" ;;
    esac
  done
fi
cat "$RES/summary.txt"
sleep 1  # let tee copy the table into gpu_check.log before the copy below
[ -n "${OUT:-}" ] && cp "$RES/gpu_check.log" "$OUT/" 2>/dev/null
exit "$exit_code"
