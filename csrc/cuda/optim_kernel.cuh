// optim_kernel.cuh: the fused optimizer step's kernel, optim_kernel<kAlgo>
// (see optim.cu for the design). Each algorithm's instance is compiled in a
// unit of its own (optim_sgd.cu, optim_adam.cu, optim_adagrad.cu,
// optim_rmsprop.cu), in parallel, which launches it for optim.cu's host side.
#pragma once
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {

// The batch of a launch: a plain struct, the same in every unit.
constexpr int kMaxOptimTensors = 48;  // tensors per launch (by-value metadata)

struct OptimBatch {
  void* p[kMaxOptimTensors];
  void* g[kMaxOptimTensors];
  void* s1[kMaxOptimTensors];
  void* s2[kMaxOptimTensors];
  void* s3[kMaxOptimTensors];
  void* step[kMaxOptimTensors];
  int64_t numel[kMaxOptimTensors];
  int32_t cstart[kMaxOptimTensors + 1];  // first chunk of each tensor in this launch
  int32_t group[kMaxOptimTensors];
  int8_t dtype[kMaxOptimTensors];
  int8_t shift[kMaxOptimTensors];
  uint8_t fresh[kMaxOptimTensors];
  int32_t nt;
};

static_assert(sizeof(OptimBatch) + sizeof(OptimSpec) <= 4000, "optimizer kernel arguments must fit in 4 KB");

// Each algorithm's unit: launches its optim_kernel on `grid` blocks, and names
// the kernel for device_error's probe.
void launch_optim_sgd(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st);
void launch_optim_adam(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st);
void launch_optim_adagrad(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st);
void launch_optim_rmsprop(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st);
KernelRef optim_sgd_kernel();
KernelRef optim_adam_kernel();
KernelRef optim_adagrad_kernel();
KernelRef optim_rmsprop_kernel();

namespace {

__device__ __forceinline__ bool step_skipped(const OptimSpec& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.0f;
}

// This thread's elements of one chunk (len elements from `begin`).
template <int kAlgo, int kProx, int kState, bool kUnscale, typename T>
__device__ __forceinline__ void optim_chunk(const OptimBatch& b, int k, int64_t begin, int len,
                                            const ElemScalars<opmath_t<T>>& e, float scale) {
  // Weight decay is a uniform branch on a GPU: kWdAny decides per element.
  using A = opmath_t<T>;
  T* __restrict__ p = static_cast<T*>(b.p[k]) + begin;
  T* __restrict__ g = static_cast<T*>(b.g[k]) + begin;
  T* __restrict__ s1 = b.s1[k] != nullptr ? static_cast<T*>(b.s1[k]) + begin : nullptr;
  T* __restrict__ s2 = b.s2[k] != nullptr ? static_cast<T*>(b.s2[k]) + begin : nullptr;
  T* __restrict__ s3 = b.s3[k] != nullptr ? static_cast<T*>(b.s3[k]) + begin : nullptr;
#pragma unroll 4
  for (int i = int(threadIdx.x); i < len; i += kThreads) {
    A gv = load<A>(g[i]);
    if constexpr (kUnscale) {
      gv = gv / A(scale);
      g[i] = store<T>(gv);
    }
    optim_element<kAlgo, kProx, kState, kWdAny>(p, gv, s1, s2, s3, i, e);
  }
}

template <int kAlgo, typename T>
__device__ __forceinline__ void optim_chunk_of(const OptimBatch& b, const OptimSpec& s, int k,
                                               int64_t begin, int len, const StepScalars& sc) {
  const ElemScalars<opmath_t<T>> e = elem_scalars<opmath_t<T>>(s, sc);
  const float scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;
  const int prox = kAlgo == kSgd && s.prox == kMetricProx ? int(kPlainProx) : s.prox;
  const int state = kAlgo == kSgd       ? (b.s1[k] == nullptr ? 0 : b.fresh[k] ? 1 : 2)
                    : kAlgo == kAdam    ? (s.amsgrad ? 1 : 0)
                    : kAlgo == kRmsprop ? (b.s2[k] != nullptr ? int(kRmsMomentum) : 0) |
                                              (s.centered ? int(kRmsCentered) : 0)
                                        : 0;
#define PYREG_OPTIM_CHUNK(P, S)                                                        \
  (s.grad_scale != nullptr ? optim_chunk<kAlgo, P, S, true, T>(b, k, begin, len, e, scale) \
                           : optim_chunk<kAlgo, P, S, false, T>(b, k, begin, len, e, scale))
  if (prox == kNoProx) {
    if (state == 0) PYREG_OPTIM_CHUNK(kNoProx, 0);
    else if (kAlgo != kAdagrad && state == 1) PYREG_OPTIM_CHUNK(kNoProx, 1);
    else if (kAlgo == kSgd) PYREG_OPTIM_CHUNK(kNoProx, 2);
    else if (kAlgo == kRmsprop && state == 2) PYREG_OPTIM_CHUNK(kNoProx, 2);
    else if (kAlgo == kRmsprop) PYREG_OPTIM_CHUNK(kNoProx, 3);
  } else if (prox == kPlainProx) {
    if (state == 0) PYREG_OPTIM_CHUNK(kPlainProx, 0);
    else if (kAlgo != kAdagrad && state == 1) PYREG_OPTIM_CHUNK(kPlainProx, 1);
    else if (kAlgo == kSgd) PYREG_OPTIM_CHUNK(kPlainProx, 2);
    else if (kAlgo == kRmsprop && state == 2) PYREG_OPTIM_CHUNK(kPlainProx, 2);
    else if (kAlgo == kRmsprop) PYREG_OPTIM_CHUNK(kPlainProx, 3);
  } else if (kAlgo != kSgd) {
    if (state == 0) PYREG_OPTIM_CHUNK(kMetricProx, 0);
    else if (kAlgo == kAdam || (kAlgo == kRmsprop && state == 1)) PYREG_OPTIM_CHUNK(kMetricProx, 1);
    else if (kAlgo == kRmsprop && state == 2) PYREG_OPTIM_CHUNK(kMetricProx, 2);
    else if (kAlgo == kRmsprop) PYREG_OPTIM_CHUNK(kMetricProx, 3);
  }
#undef PYREG_OPTIM_CHUNK
}

template <int kAlgo>
__global__ void __launch_bounds__(kThreads) optim_kernel(const OptimBatch b, const OptimSpec s) {
  if (step_skipped(s)) return;
  const int cidx = int(blockIdx.x);
  if (cidx >= b.cstart[b.nt]) return;
  const int k = owner(b.cstart, b.nt, cidx);  // empty tensors share the next one's start
  const int64_t chunk = int64_t(1) << b.shift[k];
  const int64_t begin = int64_t(cidx - b.cstart[k]) * chunk;
  const int64_t rest = b.numel[k] - begin;
  const int len = int(rest < chunk ? rest : chunk);
  const double step = kAlgo == kSgd ? 0.0 : next_step(b.step[k], s.step_dtype);
  const StepScalars sc = step_scalars(s, s.hyper + int64_t(kHyper) * b.group[k], step);
  switch (b.dtype[k]) {
    case kFloat64: optim_chunk_of<kAlgo, double>(b, s, k, begin, len, sc); break;
    case kFloat16: optim_chunk_of<kAlgo, half_t>(b, s, k, begin, len, sc); break;
    case kBFloat16: optim_chunk_of<kAlgo, bf16_t>(b, s, k, begin, len, sc); break;
    default: optim_chunk_of<kAlgo, float>(b, s, k, begin, len, sc); break;
  }
}

}  // namespace
}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
