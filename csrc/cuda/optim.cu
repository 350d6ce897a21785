// optim.cu: the fused optimizer step on CUDA (kernels_api.h: optim_step),
// on a GPU or against the CUDA emulator. The chunking, checks and device
// guard are common.cuh's.
//
// Chunked like the element-wise ops: tensors are cut into chunks (chunk_shift),
// tensors are grouped into batches of kMaxOptimTensors described by value in
// the kernel arguments (OptimBatch), one block per chunk. Each block reads its
// tensor's group row of the hyperparameter table and its step counter (device
// memory, so a captured CUDA graph replays with the current values), computes
// the per-tensor scalars in double, then each thread updates its elements
// (csrc/common/optim_math.h): param, grad and state read once, written once.
// After each batch, optim_count_kernel increments the batch's step counters
// (the main kernel read them as they were: no block races another's write).
// With found_inf nonzero both kernels return at once: nothing changes.
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {


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

// The batch's step counters, +1 each (after optim_kernel read them).
__global__ void __launch_bounds__(kMaxOptimTensors) optim_count_kernel(const OptimBatch b, const OptimSpec s) {
  if (step_skipped(s)) return;
  const int k = int(threadIdx.x);
  if (k < b.nt && b.step[k] != nullptr) write_step(b.step[k], s.step_dtype, next_step(b.step[k], s.step_dtype));
}

// ---- host side ------------------------------------------------------------------
std::vector<OptimBatch> optim_plan(const OptimList& l, const OptimSpec& s) {
  check_list(l.w, nullptr, nullptr);
  const int64_t n = l.w.size();
  auto sized = [&](const std::vector<void*>& v, const char* what, bool required) {
    if ((required || !v.empty()) && int64_t(v.size()) != n)
      fail(std::string("optim_step: ") + what + " differ in length from the params");
  };
  sized(l.grads, "grads", true);
  sized(l.s1, "state buffers", false);
  sized(l.s2, "state buffers", false);
  sized(l.s3, "state buffers", false);
  sized(l.steps, "step counters", s.algo != kSgd);
  if (int64_t(l.group.size()) != n) fail("optim_step: group indices differ in length from the params");
  if (s.algo == kSgd && !l.s1.empty() && int64_t(l.fresh.size()) != n)
    fail("optim_step: fresh flags differ in length from the params");
  if (s.algo < kSgd || s.algo > kRmsprop) fail("optim_step: unknown algorithm");
  if (s.step_dtype != kFloat32 && s.step_dtype != kFloat64) fail("optim_step: step counters must be float32 or float64");
  if (s.hyper == nullptr && n > 0) fail("optim_step: null hyperparameter table");
  auto need = [&](const std::vector<void*>& v, int64_t t, const char* what) {
    if (v.empty() || v[t] == nullptr) fail(std::string("optim_step: null ") + what + " for tensor " + std::to_string(t));
  };
  std::vector<OptimBatch> out;
  OptimBatch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t rel = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (l.group[t] < 0 || l.group[t] >= l.n_groups) fail("optim_step: group index out of range");
    if (s.algo != kSgd) need(l.steps, t, "step counter");
    const int64_t numel = l.w.numels[t];
    if (numel > 0) {
      need(l.grads, t, "grad");
      if (s.algo != kSgd) need(l.s1, t, "state buffer"); 
      if (s.algo == kAdam) need(l.s2, t, "state buffer");
      if (s.algo == kAdam && s.amsgrad) need(l.s3, t, "state buffer");
      if (s.algo == kRmsprop && s.centered) need(l.s3, t, "state buffer");
    }
    const int64_t ch = chunks_of(numel);
    if (ch > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxOptimTensors || rel + ch > kMaxGrid) {
      cur.cstart[cur.nt] = int32_t(rel);
      out.push_back(cur);
      std::memset(&cur, 0, sizeof(cur));
      rel = 0;
    }
    const int k = cur.nt++;
    auto get = [&](const std::vector<void*>& v) { return v.empty() ? nullptr : v[t]; };
    cur.p[k] = l.w.ptrs[t];
    cur.g[k] = get(l.grads);
    cur.s1[k] = get(l.s1);
    cur.s2[k] = get(l.s2);
    cur.s3[k] = get(l.s3);
    cur.step[k] = get(l.steps);
    cur.numel[k] = numel;
    cur.group[k] = l.group[t];
    cur.dtype[k] = int8_t(l.w.dtypes[t]);
    cur.shift[k] = int8_t(chunk_shift(numel));
    cur.fresh[k] = l.fresh.empty() ? 0 : l.fresh[t];
    cur.cstart[k] = int32_t(rel);
    rel += ch;
  }
  cur.cstart[cur.nt] = int32_t(rel);
  if (cur.nt > 0) out.push_back(cur);
  return out;
}

}  // namespace

std::vector<KernelRef> optim_kernels() {
  return {
      {reinterpret_cast<const void*>(&optim_kernel<kSgd>), "optim_kernel<sgd>"},
      {reinterpret_cast<const void*>(&optim_kernel<kAdam>), "optim_kernel<adam>"},
      {reinterpret_cast<const void*>(&optim_kernel<kAdagrad>), "optim_kernel<adagrad>"},
      {reinterpret_cast<const void*>(&optim_kernel<kRmsprop>), "optim_kernel<rmsprop>"},
      {reinterpret_cast<const void*>(&optim_count_kernel), "optim_count_kernel"},
  };
}

void optim_step(const OptimList& l, const OptimSpec& s, const Launch& at) {
  const std::vector<OptimBatch> batches = optim_plan(l, s);
  if (batches.empty()) return;
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();
  cudaStream_t st = reinterpret_cast<cudaStream_t>(at.stream);
  for (const OptimBatch& b : batches) {
    if (b.cstart[b.nt] > 0) {
      const dim3 grid(unsigned(b.cstart[b.nt]));
      switch (s.algo) {
        case kSgd: PYREG_LAUNCH(optim_kernel<kSgd>, grid, kThreads, 0, st, b, s); break;
        case kAdam: PYREG_LAUNCH(optim_kernel<kAdam>, grid, kThreads, 0, st, b, s); break;
        case kRmsprop: PYREG_LAUNCH(optim_kernel<kRmsprop>, grid, kThreads, 0, st, b, s); break;
        default: PYREG_LAUNCH(optim_kernel<kAdagrad>, grid, kThreads, 0, st, b, s); break;
      }
      check(cudaGetLastError(), "optim_step kernel launch");
    }
    if (s.algo != kSgd) {
      PYREG_LAUNCH(optim_count_kernel, dim3(1), kMaxOptimTensors, 0, st, b, s);
      check(cudaGetLastError(), "optim_step count kernel launch");
    }
  }
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
