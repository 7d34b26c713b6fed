// Helpers for CPU kernels.
#pragma once

// Compile a hot loop twice, for x86-64-v3 (AVX2, FMA, F16C) and for baseline x86-64, and pick the copy at load
// time: one binary, fast where the CPU allows. Elsewhere a plain function.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#else
#define DSX_CPU_CLONES
#endif
