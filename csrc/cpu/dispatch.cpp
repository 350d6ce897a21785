// dispatch.cpp: chooses, once at load time, the instruction-set variant of the
// CPU kernels (csrc/cpu/isa/) that this CPU runs best, so that one build runs
// on any x86-64 machine: AVX-512 (x86-64-v4), else AVX2 (x86-64-v3), else the
// x86-64 baseline. The variants compute the same bits (same source, same
// summation order; no -ffast-math, no FP contraction across the fixed order).
//
// The environment variable PYREG_CPU_ISA=x86_64|avx2|avx512 (any case) forces a
// variant (one this CPU supports; otherwise the best it does, and archs() says
// why), e.g. to compare them.
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/kernels_api.h"

namespace pyreg {

extern const Kernels kCpuX86_64;
extern const Kernels kCpuAvx2;
extern const Kernels kCpuAvx512;

namespace {

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2");
}

bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

struct Choice {
  const Kernels* kernels;
  std::string name;  // the variant, as PYREG_CPU_ISA names it
  std::string note;  // what archs() adds: how it was chosen
};

Choice choose() {
  __builtin_cpu_init();
  const char* forced = std::getenv("PYREG_CPU_ISA");
  const std::string all = "x86_64, avx2, avx512";
  const bool avx512 = has_avx512(), avx2 = has_avx2();
  const Choice best = avx512 ? Choice{&kCpuAvx512, "avx512", ""}
                      : avx2 ? Choice{&kCpuAvx2, "avx2", ""}
                             : Choice{&kCpuX86_64, "x86_64", ""};
  if (forced != nullptr && *forced != '\0') {
    std::string f = forced;
    for (char& c : f) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const bool known = f == "x86_64" || f == "avx2" || f == "avx512";
    const bool runs = f == "x86_64" || (f == "avx2" && avx2) || (f == "avx512" && avx512);
    if (runs) {
      const Kernels* want = f == "x86_64" ? &kCpuX86_64 : f == "avx2" ? &kCpuAvx2 : &kCpuAvx512;
      return {want, f, "forced by PYREG_CPU_ISA=" + std::string(forced)};
    }
    return {best.kernels, best.name,
            "PYREG_CPU_ISA=" + std::string(forced) + " ignored (" +
                (known ? "this CPU does not support it" : "not one of " + all) + "); chosen at load time"};
  }
  return {best.kernels, best.name, "chosen at load time from " + all};
}

const Choice& chosen() {
  static const Choice c = choose();
  return c;
}

Kernels make() {
  Kernels k = *chosen().kernels;
  k.archs = [] {
    return chosen().name + ": " + chosen().kernels->archs() + " (" + chosen().note + ")";
  };
  return k;
}

}  // namespace

extern const Kernels kCpu = make();

}  // namespace pyreg
