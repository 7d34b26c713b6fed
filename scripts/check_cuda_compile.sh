#!/usr/bin/env bash
# Compiles every CUDA source in kernels/ with nvcc for sm_80 and sm_90a, without a GPU and against whatever torch
# is installed (a CPU wheel ships the CUDA headers of ATen/c10 too). Keeps CUDA code from rotting on CPU-only CI.
# Usage: scripts/check_cuda_compile.sh [python]      (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC=$c; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  # No toolkit on the machine: CUDA's compiler, runtime headers and CCCL from PyPI, into the given environment.
  echo "check_cuda_compile: no nvcc found; installing the CUDA 13 compiler from PyPI"
  "$PY" -m pip install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
  root=$("$PY" -c "import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), 'nvidia', 'cu13'))")
  NVCC=$root/bin/nvcc
fi
CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd)

mapfile -t TORCH_INC < <("$PY" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
INC=()
for d in "${TORCH_INC[@]}" csrc/include build/generated "$CUDA_ROOT/include"; do INC+=("-I$d"); done
mkdir -p build/cuda-check
FLAGS=(-std=c++20 -O1 --expt-relaxed-constexpr -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  # CPU wheels lack c10/cuda's generated cmake header; it only sets export macros, which nothing here needs.
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)

mapfile -t SOURCES < <(find kernels -name '*.cu' | sort)
echo "check_cuda_compile: $("$NVCC" --version | tail -1); ${#SOURCES[@]} file(s) for sm_80 and sm_90a"
status=0
pids=()
for src in "${SOURCES[@]}"; do
  obj=build/cuda-check/$(echo "$src" | tr / _).o
  ( "$NVCC" "${FLAGS[@]}" "${INC[@]}" -c "$src" -o "$obj" > "$obj.log" 2>&1 && echo "  ok   $src" \
      || { echo "  FAIL $src"; cat "$obj.log"; exit 1; } ) &
  pids+=($!)
  if [ "${#pids[@]}" -ge "${MAX_JOBS:-2}" ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
