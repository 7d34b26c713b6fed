// Helpers for CPU kernels.
#pragma once

// Compile a hot loop twice, for x86-64-v3 (AVX2, FMA, F16C) and for baseline x86-64, and pick the copy at load
// time: one binary, fast where the CPU allows. Elsewhere a plain function.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#else
#define DSX_CPU_CLONES
#endif

// Hand-written AVX2 kernels inside an otherwise baseline x86-64 build: functions marked DSX_AVX2_FN /
// DSX_AVX2_INLINE are compiled for AVX2 + FMA + F16C and may only be called when cpu_has_avx2() is true, so the
// library still loads and runs on older x86-64 CPUs. DSX_HAVE_AVX2 says whether such kernels exist in this build.
#if defined(__x86_64__) && defined(__GNUC__)
#define DSX_HAVE_AVX2 1
#define DSX_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define DSX_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace deepseek_ext {

// Whether this CPU runs DSX_AVX2_FN code: every feature those functions are compiled for.
inline bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace deepseek_ext
#endif
