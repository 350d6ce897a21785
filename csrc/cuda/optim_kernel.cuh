// optim_kernel.cuh: the fused optimizer step's kernel, optim_kernel<kAlgo>
// (see optim.cu for the design). Each algorithm's instance is compiled in a
// unit of its own (optim_sgd.cu, optim_adam.cu, optim_adagrad.cu,
// optim_rmsprop.cu), in parallel, which launches it for optim.cu's host side.
#pragma once
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {

// The batch of a launch: a plain struct, the same in every unit.
constexpr int kMaxOptimTensors = kParamBytes > 4096 ? 440 : 48;  // tensors per launch (by-value metadata)

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

static_assert(sizeof(OptimBatch) + sizeof(OptimSpec) <= kParamBytes - kParamSlack,
              "optimizer kernel arguments must fit in the kernel parameter space (launch.h)");

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

// Staging: every array of an element (param, grad, the state the algorithm
// reads) is loaded into registers for several elements before any arithmetic,
// so that a thread has all its loads in flight at once, then the elements are
// updated and stored. When every pointer of the chunk is 16-byte aligned (a
// chunk is a multiple of 16 bytes, so that is each tensor's alignment), a
// thread moves 16-byte vectors: kVec<T> elements per array per access
// (4 float, 8 half/bfloat16, 2 double). Otherwise, and for the tail of an
// aligned chunk (under kVec<T> elements), one element at a time: staging
// scalar accesses as well made ptxas spill around the division and square
// root's slow-path calls (sm_90, nvcc 13), for a path that only misaligned
// views take.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// Updates the N staged elements r* (in registers; optim_element indexes them).
template <int kAlgo, int kProx, int kState, bool kUnscale, int N, typename T, typename A>
__device__ __forceinline__ void optim_staged(T (&rp)[N], T (&rg)[N], T (&r1)[N], T (&r2)[N], T (&r3)[N],
                                             const ElemScalars<A>& e, float scale) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    A gv = load<A>(rg[j]);
    if constexpr (kUnscale) {
      gv = gv / A(scale);
      rg[j] = store<T>(gv);
    }
    optim_element<kAlgo, kProx, kState, kWdAny>(rp, gv, r1, r2, r3, j, e);
  }
}

// This thread's elements of one chunk (len elements from `begin`).
template <int kAlgo, int kProx, int kState, bool kUnscale, typename T>
__device__ __forceinline__ void optim_chunk(const OptimBatch& b, int k, int64_t begin, int len,
                                            const ElemScalars<opmath_t<T>>& e, float scale) {
  // Weight decay is a uniform branch on a GPU: kWdAny decides per element.
  constexpr bool kR1 = state_reads<kAlgo, kState>(1), kW1 = state_writes<kAlgo, kState>(1);
  constexpr bool kR2 = state_reads<kAlgo, kState>(2), kW2 = state_writes<kAlgo, kState>(2);
  constexpr bool kR3 = state_reads<kAlgo, kState>(3), kW3 = state_writes<kAlgo, kState>(3);
  T* __restrict__ p = static_cast<T*>(b.p[k]) + begin;
  T* __restrict__ g = static_cast<T*>(b.g[k]) + begin;
  T* __restrict__ s1 = kW1 ? static_cast<T*>(b.s1[k]) + begin : nullptr;
  T* __restrict__ s2 = kW2 ? static_cast<T*>(b.s2[k]) + begin : nullptr;
  T* __restrict__ s3 = kW3 ? static_cast<T*>(b.s3[k]) + begin : nullptr;
  const uintptr_t mis = (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                         reinterpret_cast<uintptr_t>(s1) | reinterpret_cast<uintptr_t>(s2) |
                         reinterpret_cast<uintptr_t>(s3)) & 15u;
  constexpr int V = kVec<T>;
  const int nv = mis == 0 ? len / V : 0;
  for (int i = int(threadIdx.x); i < nv; i += kThreads) {
    T rp[V], rg[V], r1[V], r2[V], r3[V];
    load_run(rp, p, i);
    load_run(rg, g, i);
    if constexpr (kR1) load_run(r1, s1, i);
    if constexpr (kR2) load_run(r2, s2, i);
    if constexpr (kR3) load_run(r3, s3, i);
    optim_staged<kAlgo, kProx, kState, kUnscale>(rp, rg, r1, r2, r3, e, scale);
    store_run(p, i, rp);
    if constexpr (kUnscale) store_run(g, i, rg);
    if constexpr (kW1) store_run(s1, i, r1);
    if constexpr (kW2) store_run(s2, i, r2);
    if constexpr (kW3) store_run(s3, i, r3);
  }
  // Scalar: the tail, or the whole chunk when a pointer is not aligned.
  for (int i = nv * V + int(threadIdx.x); i < len; i += kThreads) {
    T rp[1] = {p[i]}, rg[1] = {g[i]}, r1[1] = {}, r2[1] = {}, r3[1] = {};
    if constexpr (kR1) r1[0] = s1[i];
    if constexpr (kR2) r2[0] = s2[i];
    if constexpr (kR3) r3[0] = s3[i];
    optim_staged<kAlgo, kProx, kState, kUnscale>(rp, rg, r1, r2, r3, e, scale);
    p[i] = rp[0];
    if constexpr (kUnscale) g[i] = rg[0];
    if constexpr (kW1) s1[i] = r1[0];
    if constexpr (kW2) s2[i] = r2[0];
    if constexpr (kW3) s3[i] = r3[0];
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
__global__ void __launch_bounds__(kThreads) optim_kernel(PYREG_PARAM(OptimBatch) b, const OptimSpec s) {
  if (step_skipped(s)) return;  // every block: nothing changes, the ticket stays zero
  const int cidx = int(blockIdx.x);
  if (cidx < b.cstart[b.nt]) {  // else a batch without chunks (a grid of 1)
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
  if constexpr (kAlgo != kSgd) {
    // The step counters, +1 each, by the last block to finish: every block
    // read its tensor's counter before taking its ticket.
    PYREG_SHARED(bool, last);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      last = atomicAdd(s.ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int k = int(threadIdx.x); k < b.nt; k += kThreads)
      if (b.step[k] != nullptr) write_step(b.step[k], s.step_dtype, next_step(b.step[k], s.step_dtype));
    if (threadIdx.x == 0) *s.ticket = 0u;  // for the next launch
  }
}

}  // namespace
}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
