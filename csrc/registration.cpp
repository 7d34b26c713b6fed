// Every operator schema of the deepseek_ext library, in one place. Kernels register themselves per backend at the
// bottom of their own files: TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) in csrc/, (..., CUDA, m) in kernels/.
// Fake (meta) kernels and autograd formulas are registered from Python, in deepseek_ext/ops/.
#include <torch/library.h>

TORCH_LIBRARY(deepseek_ext, m) {
  // FP8 quantisation (deepseek_ext/ops/fp8.py documents the semantics).
  m.def("quantize_fp8(Tensor x, ScalarType? dtype=None, str granularity=\"tensor\", int block_size=128)"
        " -> (Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor x, Tensor scale, str granularity=\"tensor\", int block_size=128,"
        " ScalarType? out_dtype=None) -> Tensor");
}
