// CPU instruction-set detection and the cap that tests and users set (see deepseek_ext/cpu.h).
#include "deepseek_ext/cpu.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace deepseek_ext {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "amx"};

Isa detect() {
#ifdef DSX_X86
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2");
  if (!avx2) return Isa::kScalar;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512cd");
  if (!avx512) return Isa::kAvx2;
  // AMX is reached through oneDNN's micro-kernels only: count it when this torch can run them here (which also
  // covers the kernel's permission to use the tile registers).
  const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                   __builtin_cpu_supports("amx-int8") && at::native::cpublas::could_pack(at::kBFloat16);
  return amx ? Isa::kAmx : Isa::kAvx512;
#else
  return Isa::kScalar;
#endif
}

Isa parse(const std::string& name, const char* what) {
  for (int i = 0; i < 4; ++i) {
    if (name == kNames[i]) return static_cast<Isa>(i);
  }
  TORCH_CHECK_VALUE(false, what, ": expected one of 'scalar', 'avx2', 'avx512' or 'amx', but got '", name, "'");
}

std::atomic<int> g_cap{-1};  // -1: not read from the environment yet
std::once_flag g_env_once;

Isa cap() {
  std::call_once(g_env_once, [] {
    const char* env = std::getenv("DEEPSEEK_EXT_CPU_ISA");
    int expected = -1;
    const int value = env == nullptr || *env == '\0' ? static_cast<int>(Isa::kAmx)
                                                     : static_cast<int>(parse(env, "DEEPSEEK_EXT_CPU_ISA"));
    g_cap.compare_exchange_strong(expected, value);  // a cap set before the first use wins
  });
  return static_cast<Isa>(g_cap.load(std::memory_order_relaxed));
}

struct PathRegistry {
  std::mutex mu;
  std::vector<std::pair<std::string, CpuPathDescriber>> entries;
};

PathRegistry& registry() {
  static PathRegistry r;
  return r;
}

}  // namespace

Isa detected_cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa cpu_isa() { return std::min(detected_cpu_isa(), cap()); }

bool cpu_has(CpuFeature f) {
#ifdef DSX_X86
  if (cpu_isa() < Isa::kAvx512) return false;
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool fp16 = __builtin_cpu_supports("avx512fp16");
  switch (f) {
    case CpuFeature::kAvx512Vnni: return vnni;
    case CpuFeature::kAvx512Bf16: return bf16;
    case CpuFeature::kAvx512Fp16: return fp16;
  }
#endif
  return false;
}

void set_cpu_isa_cap(const std::string& name) {
  const Isa isa = parse(name, "deepseek_ext.set_cpu_isa_cap");
  cap();  // read the environment first, so it cannot override this later
  g_cap.store(static_cast<int>(isa), std::memory_order_relaxed);
}

std::string cpu_isa_cap() { return kNames[static_cast<int>(cap())]; }

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

std::vector<std::string> cpu_feature_names() {
  std::vector<std::string> out;
#ifdef DSX_X86
  const Isa d = detected_cpu_isa();
  if (d >= Isa::kAvx2) out.emplace_back("avx2");
  if (d >= Isa::kAvx512) out.emplace_back("avx512");
  if (d >= Isa::kAvx512 && __builtin_cpu_supports("avx512vnni")) out.emplace_back("avx512_vnni");
  if (d >= Isa::kAvx512 && __builtin_cpu_supports("avx512bf16")) out.emplace_back("avx512_bf16");
  if (d >= Isa::kAvx512 && __builtin_cpu_supports("avx512fp16")) out.emplace_back("avx512_fp16");
  if (d >= Isa::kAmx) out.emplace_back("amx");
#endif
  return out;
}

DescribeCpuPaths::DescribeCpuPaths(const char* op, CpuPathDescriber fn) {
  std::lock_guard<std::mutex> lock(registry().mu);
  registry().entries.emplace_back(op, fn);
}

std::vector<std::pair<std::string, std::vector<std::pair<std::string, std::string>>>> cpu_paths() {
  std::lock_guard<std::mutex> lock(registry().mu);
  std::vector<std::pair<std::string, std::vector<std::pair<std::string, std::string>>>> out;
  const Isa isa = cpu_isa();
  for (const auto& [op, fn] : registry().entries) out.emplace_back(op, fn(isa));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  return out;
}

}  // namespace deepseek_ext
