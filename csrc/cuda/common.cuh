// common.cuh: what every family of pyreg's CUDA kernels shares (elementwise.cu,
// group.cu, optim.cu): the launch shape and chunking constants, the
// reduction types and block reductions, the finishing kernel that folds
// per-chunk (or per-group) partials per tensor, the batch owner search, and
// the host-side checks and device guard.
//
// Everything here lives in an unnamed namespace: each translation unit gets
// its own copy of the kernels it launches (no -rdc, no cross-unit kernels),
// inside the build's namespace (PYREG_CUDA_NS: nvcc's build or the
// emulator's, both linked into one module).
#pragma once
#include "kernels.h"

#if !defined(PYREG_CUDA_EMU)  // the emulator's stand-in is already included
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/dtype.h"
#include "../common/group_plan.h"
#include "../common/op_math.h"
#include "../common/optim_math.h"
#include "launch.h"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {

constexpr int kThreads = 512;                 // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kChunkShift = 16;                // chunks of large tensors: 65536 elements
constexpr int kSmallChunkShift = 14;           // chunks of the others: 16384 elements
constexpr int64_t kChunk = int64_t(1) << kChunkShift;
constexpr int64_t kSmallChunk = int64_t(1) << kSmallChunkShift;
constexpr int64_t kBigTensor = int64_t(1) << 22;  // elements from which a tensor uses kChunk
constexpr int64_t kMaxGrid = INT_MAX;         // blocks per launch (grid.x limit)

// kBound: l2_bound's sums (as kPenalty's) and its finishing step; kScale: its
// scaling pass (each tensor by its factor, read from Coefs::l1).
enum Op : int { kStats = 0, kPenalty = 1, kGrad = 2, kProx = 3, kBound = 4, kScale = 5 };

struct Coefs {
  Coef l1, l2, lr;
};

struct Work {
  unsigned* counter;
  int64_t* first;  // n+1 entries: tensor t owns global chunks [first[t], first[t+1])
  double* terms;   // n entries: l1[t]*s1 + l2[t]*s2 (penalty ops); l2_bound: numel, then the factor
  Partial* parts;  // one per global chunk
};

struct Outs {
  void* l1;
  void* l2;
  void* linf;
  int64_t* nnz;
  void* value;
  int out_dtype;
  double* lam = nullptr;     // l2_bound: the multipliers, bounds and step counts, updated in place
  double* kappa = nullptr;
  int64_t* steps = nullptr;
};

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------
// Fixed shuffle tree: the result (in lane 0) depends only on the lane values.
__device__ __forceinline__ Partial warp_reduce(Partial p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Partial q;
    q.s1 = __shfl_down_sync(0xffffffffu, p.s1, off);
    q.s2 = __shfl_down_sync(0xffffffffu, p.s2, off);
    q.mx = __shfl_down_sync(0xffffffffu, p.mx, off);
    q.nnz = __shfl_down_sync(0xffffffffu, (long long)p.nnz, off);
    combine(p, q);
  }
  return p;
}

// Whole-block reduction, result valid in thread 0. Call at most once per
// kernel invocation (it owns a static shared buffer) from all threads.
__device__ __forceinline__ Partial block_reduce(Partial p) {
  PYREG_SHARED(Partial[kWarps], sh);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_reduce(p);
  if (lane == 0) sh[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kWarps ? sh[lane] : zero_partial();
    p = warp_reduce(p);
  }
  return p;
}

// kFin: kStats (weight_stats), kPenalty (penalty and add_penalty_grad), kProx,
// kBound (l2_bound: each tensor's CPR update from its sum of squares, its
// factor into terms[t], where the chunk kernel left its numel; Coefs: bound,
// mu, warmup).
template <int kFin>
__global__ void __launch_bounds__(kThreads) finish_kernel(const Work w, int64_t n, const Coefs c,
                                                           const Outs o) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = int64_t(blockIdx.x) * kWarps + warp;
  if (t < n) {  // warp-uniform
    const int64_t b = w.first[t], e = w.first[t + 1];
    Partial p = zero_partial();
    for (int64_t j = b + lane; j < e; j += 32) combine(p, w.parts[j]);
    p = warp_reduce(p);
    if (lane == 0) {
      if constexpr (kFin == kStats) {
        write_out(o.l1, o.out_dtype, t, p.s1);
        write_out(o.l2, o.out_dtype, t, sqrt(p.s2));
        write_out(o.linf, o.out_dtype, t, finish_linf(p));
        o.nnz[t] = int64_t(p.nnz);
      } else if constexpr (kFin == kProx) {
        o.nnz[t] = int64_t(p.nnz);
      } else if constexpr (kFin == kBound) {
        const int64_t step = o.steps[t] + 1;
        o.steps[t] = step;
        w.terms[t] = cpr_update(o.lam[t], o.kappa[t], step, p.s2, w.terms[t], coef_at(c.l1, t),
                                coef_at(c.l2, t), coef_at(c.lr, t));
      } else {
        w.terms[t] = coef_at(c.l1, t) * p.s1 + coef_at(c.l2, t) * p.s2;
      }
    }
  }
  if constexpr (kFin == kPenalty) {
    // The last block to get here folds every tensor's term in a fixed order.
    PYREG_SHARED(bool, last);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(w.counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    double v = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) v += __ldcg(w.terms + i);
    Partial p = zero_partial();
    p.s1 = v;
    p = block_reduce(p);
    if (threadIdx.x == 0) {
      write_out(o.value, o.out_dtype, 0, p.s1);
      *w.counter = 0u;
    }
  }
}

// Run i of base (its elements [i * W, i * W + W)), moved as one 8- or
// 16-byte access (base aligned to it): the vector paths of the optimizer
// step and the group ops.
template <int W, typename T>
__device__ __forceinline__ void load_run(T (&r)[W], const T* base, int i) {
  if constexpr (W * sizeof(T) == 16) {
    const uint4 v = reinterpret_cast<const uint4*>(base)[i];
    memcpy(r, &v, 16);
  } else {
    static_assert(W * sizeof(T) == 8, "runs of 8 or 16 bytes");
    const uint2 v = reinterpret_cast<const uint2*>(base)[i];
    memcpy(r, &v, 8);
  }
}

template <int W, typename T>
__device__ __forceinline__ void store_run(T* base, int i, const T (&r)[W]) {
  if constexpr (W * sizeof(T) == 16) {
    uint4 v;
    memcpy(&v, r, 16);
    reinterpret_cast<uint4*>(base)[i] = v;
  } else {
    uint2 v;
    memcpy(&v, r, 8);
    reinterpret_cast<uint2*>(base)[i] = v;
  }
}

// The tensor of a batch that owns item i, given the batch's item starts.
template <typename I>
__device__ __forceinline__ int owner(const I* start, int nt, int64_t i) {
  int lo = 0, hi = nt - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (int64_t(start[mid]) <= i) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
inline int64_t align16(int64_t b) { return (b + 15) & ~int64_t(15); }

inline int chunk_shift(int64_t numel) { return numel >= kBigTensor ? kChunkShift : kSmallChunkShift; }

inline int64_t chunks_of(int64_t numel) {
  const int64_t chunk = int64_t(1) << chunk_shift(numel);
  return (numel + chunk - 1) / chunk;
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("pyreg CUDA: " + what); }

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    fail(std::string(what) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

// Makes `device` current for the scope, restoring the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// The checks every planner makes of a tensor list (and its grads and refs).
inline void check_list(const TensorList& w, void* const* grads, const void* const* refs) {
  const int64_t n = w.size();
  if (int64_t(w.numels.size()) != n || int64_t(w.dtypes.size()) != n)
    fail("tensor list pointers, numels and dtypes differ in length");
  if (n >= INT_MAX) fail("too many tensors");
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = w.numels[t];
    const int code = w.dtypes[t];
    if (numel < 0) fail("negative numel for tensor " + std::to_string(t));
    if (code < kFloat32 || code > kBFloat16)
      fail("unsupported dtype code " + std::to_string(code) + " for tensor " + std::to_string(t));
    if (numel > 0 && w.ptrs[t] == nullptr) fail("null data pointer for tensor " + std::to_string(t));
    if (numel > 0 && grads != nullptr && grads[t] == nullptr)
      fail("null grad pointer for tensor " + std::to_string(t));
    if (numel > 0 && refs != nullptr && refs[t] == nullptr)
      fail("null reference pointer for tensor " + std::to_string(t));
  }
}

inline void check_out_dtype(int out_dtype) {
  if (out_dtype != kFloat32 && out_dtype != kFloat64)
    fail("out_dtype must be 0 (float32) or 1 (float64), got " + std::to_string(out_dtype));
}

}  // namespace
}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
