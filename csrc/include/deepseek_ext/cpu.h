// Which instruction sets the CPU kernels may use, and how one kernel source is compiled for each of them.
//
// Levels, each including the ones below it:
//   kScalar  baseline x86-64 (SSE2) or any other architecture: portable C++ that the compiler vectorises as it can
//   kAvx2    AVX2 + FMA + F16C (x86-64-v3: Haswell, Zen 1-3)
//   kAvx512  AVX-512 F/BW/VL/DQ (x86-64-v4: Skylake-X, Ice Lake, Sapphire Rapids, Zen 4/5); the optional
//            extensions VNNI (int8 dot products) and BF16 (bf16 dot products) are asked for separately
//   kAmx     AMX tiles (Sapphire Rapids and later), reached only through PyTorch's oneDNN micro-kernels
//            (at::native::cpublas::brgemm)
//
// cpu_isa() is the level detected on this CPU, capped by DEEPSEEK_EXT_CPU_ISA=scalar|avx2|avx512|amx (read on first
// use) or by set_cpu_isa_cap() (the Python tests run every op under every level the machine supports). Kernels
// look it up on every call, so a changed cap takes effect on the next call.
//
// One source, several instruction sets: a kernel is written once against the vector types of simd.h with the
// vector width as a template parameter, in functions marked DSX_INLINE; a thin wrapper per level marked
// DSX_TARGET_AVX2 / DSX_TARGET_AVX512 instantiates it, so the compiler generates that level's code for the whole
// inlined body. Wrappers must be entered from inside at::parallel_for's lambda (a lambda does not inherit its
// enclosing function's target), and a wrapper for a level may only run when cpu_isa() is at least that level.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#define DSX_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define DSX_X86 1
#define DSX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")))
#define DSX_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")))
#define DSX_TARGET_AVX512_VNNI                                                                                \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512vnni,avx2,fma,f16c,bmi,bmi2,lzcnt," \
                        "popcnt")))
#define DSX_TARGET_AVX512_BF16                                                                                \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt," \
                        "popcnt")))
#else
#define DSX_TARGET_AVX2
#define DSX_TARGET_AVX512
#define DSX_TARGET_AVX512_VNNI
#define DSX_TARGET_AVX512_BF16
#endif

namespace deepseek_ext {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// Optional extensions of a level, reported by cpu_has().
enum class CpuFeature : int { kAvx512Vnni, kAvx512Bf16, kAvx512Fp16 };

// The level the kernels use now: what the CPU supports, capped.
Isa cpu_isa();
// What the CPU supports, without the cap.
Isa detected_cpu_isa();
// Whether the CPU has an extension and the current cap allows it (AVX-512 extensions need the kAvx512 level).
bool cpu_has(CpuFeature f);
// Sets the cap (kAmx: no cap). Throws c10::ValueError naming the accepted values for an unknown name.
void set_cpu_isa_cap(const std::string& name);
std::string cpu_isa_cap();
const char* isa_name(Isa isa);
// The names of the extensions this CPU has that the kernels can use (e.g. "avx512_vnni"), without the cap.
std::vector<std::string> cpu_feature_names();

// Per op family, a description of the CPU path each dtype / mode takes at the current level (for capabilities()).
// Families register a describer with a static DescribeCpuPaths object in their kernel file.
using CpuPathDescriber = std::vector<std::pair<std::string, std::string>> (*)(Isa isa);
struct DescribeCpuPaths {
  DescribeCpuPaths(const char* op, CpuPathDescriber fn);
};
// {op: [(case, path)]} at the current level.
std::vector<std::pair<std::string, std::vector<std::pair<std::string, std::string>>>> cpu_paths();

}  // namespace deepseek_ext
