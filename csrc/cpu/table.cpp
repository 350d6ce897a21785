// table.cpp: the Kernels table of pyreg's CPU kernels (kernels_api.h), from
// the entry points of elementwise.cpp, group.cpp, optim.cpp and select.cpp: kCpu, or one
// instruction-set variant's table (csrc/cpu/isa/) that csrc/cpu/dispatch.cpp
// chooses from at load time.
#include <string>

#include "kernels.h"

#ifndef PYREG_CPU_TABLE
#define PYREG_CPU_TABLE kCpu
#endif

namespace pyreg::cpu {
namespace PYREG_ISA_NS {

// The instruction set this translation unit was compiled for.
std::string isa() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return "avx2+fma+f16c";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "generic";
#endif
}

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu

namespace pyreg {

namespace k = cpu::PYREG_ISA_NS;

extern const Kernels PYREG_CPU_TABLE = {
    true,
    k::isa,
    [] { return 1; },
    [] { return std::string(); },
    [](int) { return std::string(); },
    [](int64_t, int64_t) { return int64_t(0); },
    [] { return int64_t(0); },
    [] { return int64_t(0); },
    k::weight_stats,
    k::penalty,
    k::add_penalty_grad,
    k::prox,
    [](const TensorList&, const GroupList&) { return int64_t(0); },
    k::group_norms,
    k::group_prox,
    k::max_norm,
    k::group_penalty,
    k::add_group_penalty_grad,
    k::optim_step,
    k::l2_bound,
    k::kth_abs,
    [](int64_t) { return int64_t(0); },
    k::push_kth,
    k::metric_target,
};

}  // namespace pyreg
