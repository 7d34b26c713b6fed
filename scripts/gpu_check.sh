#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, torch (CUDA build), nvcc and pytest already installed and no
# network, in one call of at most 8 minutes (on one H100 / H200 with 16 cores):
#   1. build the extension with CUDA for sm_90a (TORCH_CUDA_ARCH_LIST),
#   2. every CUDA test (`pytest -m cuda`),
#   3. compute-sanitizer memcheck, racecheck and synccheck on a reduced set (tests/ops/test_cuda.py's
#      test_sanitizer_workload: every kernel once on small shapes; only our kernels are instrumented),
#   4. the CUDA benchmarks (quick mode: TFLOP/s next to SDPA / torch._scaled_mm / a bf16 matmul),
#   5. with time left, the CPU op tests as a compatibility check with this torch.
# Each step gets what is left of the time budget (GPU_CHECK_BUDGET seconds, default 470) after a reserve for the
# steps after it, and says so when it was cut short. Logs and JSON go to OUT_DIR; summary.txt has the verdicts.
# Without a GPU it still builds and tests what it can, and says what it skipped.
#
# Usage: scripts/gpu_check.sh OUT_DIR        (env: PYTHON, TORCH_CUDA_ARCH_LIST [9.0a], MAX_JOBS [nproc],
#                                             GPU_CHECK_BUDGET [470])
set -uo pipefail
out=$(mkdir -p "${1:?usage: scripts/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET:-470}
# torch finds the toolkit from CUDA_HOME, else from `which nvcc`; a wrapper script on PATH can mislead the latter.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
SECONDS=0
step() { echo; echo "== $1 (t=${SECONDS}s, $(date +%T))"; }
# Seconds a step may take: at most $1, leaving $2 for the steps after it (0 when nothing is left).
allow() { local left=$((BUDGET - SECONDS - $2)); [ "$left" -gt "$1" ] && left=$1; [ "$left" -lt 0 ] && left=0; echo "$left"; }
# Runs "$@" with a timeout of $1 seconds; a timeout is reported as such.
timed() {
  local t=$1; shift
  if [ "$t" -lt 10 ]; then echo "SKIPPED: out of time budget"; return 0; fi
  timeout "$t" "$@"; local rc=$?
  if [ "$rc" = 124 ]; then echo "TIMED OUT after ${t}s"; fi
  return $rc
}

step "environment" | tee "$out/summary.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  nvcc --version 2>&1 | tail -1
} | tee -a "$out/summary.txt"
has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" | tee -a "$out/summary.txt"
if [ "$has_gpu" = 1 ]; then export DEEPSEEK_EXT_CUDA=1; fi
if timed "$(allow 300 150)" "$PY" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "built at t=${SECONDS}s" | tee -a "$out/summary.txt"
else
  echo "BUILD FAILED at t=${SECONDS}s; tail of build.log:" | tee -a "$out/summary.txt"
  tail -40 "$out/build.log" | tee -a "$out/summary.txt"
  exit 1
fi
"$PY" - "$out/capabilities.json" <<'PYEOF' 2>&1 | tee -a "$out/summary.txt"
import json, sys
import deepseek_ext
caps = deepseek_ext.capabilities()
open(sys.argv[1], "w").write(json.dumps(caps, indent=1))
ops = caps.get("ops", {})
print(f"built against torch {caps.get('torch_built')} (CUDA {caps.get('cuda_version')}, archs {caps.get('cuda_archs')}); "
      f"CUDA kernels for {sum(bool(v.get('cuda')) for v in ops.values())} of {len(ops)} ops")
PYEOF

step "pytest -m cuda" | tee -a "$out/summary.txt"
if [ "$has_gpu" = 1 ]; then
  timed "$(allow 180 150)" "$PY" -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=15 tests/ops \
    > "$out/pytest_cuda.log" 2>&1 || status=1
  grep -E "TIMED OUT|SKIPPED: out" "$out/pytest_cuda.log" | tee -a "$out/summary.txt"
  grep -E "^(FAILED|ERROR)" "$out/pytest_cuda.log" | head -30 | tee -a "$out/summary.txt"
  tail -1 "$out/pytest_cuda.log" | tee -a "$out/summary.txt"
else
  echo "skipped: no CUDA device" | tee -a "$out/summary.txt"
fi

step "compute-sanitizer (memcheck, racecheck, synccheck) on test_sanitizer_workload" | tee -a "$out/summary.txt"
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ "$has_gpu" = 1 ] && [ -x "$SAN" ]; then
  filter=()
  # Instrument only this project's kernels (namespace deepseek_ext): torch's own are not under test and slow it down.
  help=$("$SAN" --help 2>&1)
  if grep -q -- "--kernel-name " <<< "$help"; then filter=(--kernel-name kns=deepseek_ext); fi
  # torch probes the driver with calls that return errors on purpose; our launches are checked by the tests.
  if grep -q -- "--report-api-errors" <<< "$help"; then filter+=(--report-api-errors no); fi
  reserve=(100 50 0)
  i=0
  for tool in memcheck racecheck synccheck; do
    extra=()
    if [ "$tool" = memcheck ]; then
      extra=(--leak-check no)
      export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # the caching allocator would hide overruns inside its pools
    else
      unset PYTORCH_NO_CUDA_MEMORY_CACHING  # any value turns caching off
    fi
    timed "$(allow 110 "${reserve[$i]}")" "$SAN" --tool "$tool" "${filter[@]}" "${extra[@]}" --error-exitcode 99 \
      --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py -k test_sanitizer_workload \
      > "$out/sanitizer_$tool.log" 2>&1
    rc=$?
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|TIMED OUT|SKIPPED: out" "$out/sanitizer_$tool.log" | tail -1)
    echo "$tool: exit $rc; ${summary:-no summary line} ($(tail -1 "$out/sanitizer_$tool.log"))" | tee -a "$out/summary.txt"
    [ "$rc" = 0 ] || status=1
    i=$((i + 1))
  done
else
  echo "skipped: no CUDA device or no compute-sanitizer" | tee -a "$out/summary.txt"
fi

step "benchmarks (CUDA, quick)" | tee -a "$out/summary.txt"
if [ "$has_gpu" = 1 ]; then
  timed "$(allow 80 0)" "$PY" -m benchmarks --device cuda --quick --no-compile --family attention --family fp8 --family quant \
    --json "$out/benchmarks_cuda.json" > "$out/benchmarks.log" 2>&1 || status=1
  cat "$out/benchmarks.log" | tee -a "$out/summary.txt" > /dev/null
  tail -40 "$out/benchmarks.log"
else
  echo "skipped: no CUDA device" | tee -a "$out/summary.txt"
fi

step "CPU op tests with this torch (time left: $((BUDGET - SECONDS))s)" | tee -a "$out/summary.txt"
timed "$(allow 120 0)" "$PY" -m pytest -m "not cuda and not slow" -q -x -p no:cacheprovider tests/ops \
  -k "opcheck or compile or bad_arguments or errors" > "$out/pytest_cpu.log" 2>&1 || status=1
tail -1 "$out/pytest_cpu.log" | tee -a "$out/summary.txt"

echo "gpu_check: exit $status after ${SECONDS}s" | tee -a "$out/summary.txt"
exit $status
