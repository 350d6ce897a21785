// optim.cpp: the fused optimizer step on the CPU (kernels_api.h: optim_step),
// on the chunking of sweep.h; each instruction-set variant (csrc/cpu/isa/)
// gets its own copy.
//
// Each tensor is cut into the items of plan() (kCpuChunk elements); one
// parallel_for runs them all. An item reads its param, grad and state once,
// computes the update and the prox in registers (csrc/common/optim_math.h)
// and writes them once. Per-tensor scalars (bias corrections, the prox
// threshold) are computed before, in double; the step counters are written
// after every item is done. Element-wise only: the same bits for any thread
// count.
#include "sweep.h"

namespace pyreg::cpu {
namespace PYREG_ISA_NS {
namespace {

// The loop over one item's elements; every branch inside is a select, so the
// compiler vectorizes it (each flag that would need a branch is a template
// parameter).
template <int kAlgo, int kProx, int kState, int kWd, typename T, typename A>
void optim_loop(T* __restrict p, const T* __restrict g, T* __restrict s1, T* __restrict s2,
                T* __restrict s3, int64_t n, const ElemScalars<A> e) {
  // e by value: a local copy that the stores cannot alias, so its fields stay
  // in registers.
  for (int64_t i = 0; i < n; ++i)
    optim_element<kAlgo, kProx, kState, kWd>(p, load<A>(g[i]), s1, s2, s3, i, e);
}

// Calls f(std::integral_constant<int, v>) for v = the runtime value x in [0, kN).
template <int kN, typename F>
inline void with_int(int x, F&& f) {
  if constexpr (kN > 0) {
    if (x == kN - 1) return f(std::integral_constant<int, kN - 1>{});
    return with_int<kN - 1>(x, std::forward<F>(f));
  }
}

template <int kAlgo, typename T>
void optim_item(const OptimList& l, const OptimSpec& s, const StepScalars& sc, int64_t t,
                int64_t begin, int64_t end) {
  using A = opmath_t<T>;
  const ElemScalars<A> e = elem_scalars<A>(s, sc);
  auto at = [&](const std::vector<void*>& v) {
    return v.empty() || v[t] == nullptr ? nullptr : static_cast<T*>(v[t]) + begin;
  };
  T* p = static_cast<T*>(l.w.ptrs[t]) + begin;
  T* g = at(l.grads);
  T *s1 = at(l.s1), *s2 = at(l.s2), *s3 = at(l.s3);
  const int64_t n = end - begin;
  if (s.grad_scale != nullptr) {  // GradScaler: the grads unscaled first (the item stays in cache)
    const A scale = A(*s.grad_scale);
    for (int64_t i = 0; i < n; ++i) g[i] = store<T>(load<A>(g[i]) / scale);
  }
  // The SGD prox has no metric of its own: its lr is the metric.
  const int prox = kAlgo == kSgd && s.prox == kMetricProx ? int(kPlainProx) : s.prox;
  const int state = kAlgo == kSgd       ? (s1 == nullptr ? 0 : l.fresh[t] ? 1 : 2)
                    : kAlgo == kAdam    ? (s.amsgrad ? 1 : 0)
                    : kAlgo == kRmsprop ? (s2 != nullptr ? int(kRmsMomentum) : 0) | (s.centered ? int(kRmsCentered) : 0)
                                        : 0;
  constexpr int kStates = kAlgo == kSgd ? 3 : kAlgo == kAdam ? 2 : kAlgo == kRmsprop ? 4 : 1;
  constexpr int kProxes = kAlgo == kSgd ? 2 : 3;
  with_int<kProxes>(prox, [&](auto kp) {
    with_int<kStates>(state, [&](auto ks) {
      with_int<3>(wd_mode(e.use_wd, e.decoupled), [&](auto kw) {
        optim_loop<kAlgo, decltype(kp)::value, decltype(ks)::value, decltype(kw)::value>(p, g, s1, s2, s3,
                                                                                      n, e);
      });
    });
  });
}

}  // namespace

void optim_step(const OptimList& l, const OptimSpec& s, const Launch& at) {
  if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;  // GradScaler: skip the step
  const int64_t n = l.w.size();
  const bool counts = s.algo != kSgd;
  std::vector<double> next(n, 0.0);
  std::vector<StepScalars> sc(n);
  for (int64_t t = 0; t < n; ++t) {
    if (counts) next[t] = next_step(l.steps[t], s.step_dtype);
    sc[t] = step_scalars(s, s.hyper + int64_t(kHyper) * l.group[t], next[t]);
  }
  const std::vector<Item> items = plan(l.w);
  // Arrays per element: param and grad, plus the state buffers.
  const int arrays = 2 + !l.s1.empty() + !l.s2.empty() + !l.s3.empty();
  parallel_for(int64_t(items.size()), threads_for(l.w, at.nthreads, arrays), [&](int64_t k) {
    const Item& it = items[k];
    with_dtype(l.w.dtypes[it.tensor], l.w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      switch (s.algo) {
        case kSgd: optim_item<kSgd, T>(l, s, sc[it.tensor], it.tensor, it.begin, it.end); break;
        case kAdam: optim_item<kAdam, T>(l, s, sc[it.tensor], it.tensor, it.begin, it.end); break;
        case kRmsprop: optim_item<kRmsprop, T>(l, s, sc[it.tensor], it.tensor, it.begin, it.end); break;
        default: optim_item<kAdagrad, T>(l, s, sc[it.tensor], it.tensor, it.begin, it.end); break;
      }
    });
  });
  if (counts)
    for (int64_t t = 0; t < n; ++t) write_step(l.steps[t], s.step_dtype, next[t]);
}

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
