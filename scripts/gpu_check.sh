#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, torch (CUDA build), nvcc and pytest already installed and no
# network: builds the extension with CUDA for sm_90a, runs the CUDA tests (then the rest, as a compatibility check
# with that torch), and the benchmarks on the GPU. Logs and JSON go to OUT_DIR. Meant to finish within 8 minutes
# on 16 cores. Without a GPU it still builds and tests what it can, and says what it skipped.
#
# Usage: scripts/gpu_check.sh OUT_DIR        (env: PYTHON, TORCH_CUDA_ARCH_LIST [9.0a], MAX_JOBS [nproc])
set -uo pipefail
out=$(mkdir -p "${1:?usage: scripts/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# torch finds the toolkit from CUDA_HOME, else from `which nvcc`; a wrapper script on PATH can mislead the latter.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
step() { echo; echo "== $1 ($(date +%T))"; }

step "environment" | tee "$out/summary.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  nvcc --version 2>&1 | tail -1
} | tee -a "$out/summary.txt"
has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" | tee -a "$out/summary.txt"
SECONDS=0
if [ "$has_gpu" = 1 ]; then export DEEPSEEK_EXT_CUDA=1; fi
if "$PY" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "built in ${SECONDS}s" | tee -a "$out/summary.txt"
else
  echo "BUILD FAILED after ${SECONDS}s; tail of build.log:" | tee -a "$out/summary.txt"
  tail -40 "$out/build.log" | tee -a "$out/summary.txt"
  exit 1
fi
"$PY" -c "import deepseek_ext, json; print(json.dumps(deepseek_ext.capabilities(), indent=1))" | tee -a "$out/summary.txt"

step "pytest -m cuda" | tee -a "$out/summary.txt"
if [ "$has_gpu" = 1 ]; then
  timeout 240 "$PY" -m pytest -m cuda -q -p no:cacheprovider > "$out/pytest_cuda.log" 2>&1 || status=1
  tail -5 "$out/pytest_cuda.log" | tee -a "$out/summary.txt"
else
  echo "skipped: no CUDA device" | tee -a "$out/summary.txt"
fi

step "pytest -m 'not cuda' (this torch: $("$PY" -c 'import torch; print(torch.__version__)'))" | tee -a "$out/summary.txt"
# tests/examples run the CPU-only example scripts (CI covers them); here they would only spend device time.
timeout 180 "$PY" -m pytest -m "not cuda" -q -x -p no:cacheprovider --ignore=tests/examples > "$out/pytest_cpu.log" 2>&1 \
  || status=1
tail -3 "$out/pytest_cpu.log" | tee -a "$out/summary.txt"

step "benchmarks" | tee -a "$out/summary.txt"
if [ "$has_gpu" = 1 ]; then
  timeout 180 "$PY" -m benchmarks --device cuda --json "$out/benchmarks_cuda.json" 2>&1 | tee -a "$out/summary.txt" \
    || status=1
else
  echo "skipped: no CUDA device" | tee -a "$out/summary.txt"
fi
echo "gpu_check: exit $status" | tee -a "$out/summary.txt"
exit $status
