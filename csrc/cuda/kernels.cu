// kernels.cu: pyreg's fused CUDA kernels (see kernels.h for the contracts and
// csrc/cpu/kernels.cpp for the exact semantics they reproduce).
//
// Multi-tensor, chunked design (like PyTorch's MultiTensorApply / apex):
//   * Every tensor is cut into chunks (kSmallChunk elements for tensors under
//     kBigTensor elements, kChunk for larger ones: a model of a few million
//     parameters still gives several blocks per SM, and the last wave of
//     blocks is short; the chunk size depends only on the tensor's own size,
//     so its results do not depend on the rest of the list); the chunks of all
//     tensors, in tensor order, are numbered 0..C-1 ("global chunk index").
//   * The host groups consecutive tensors into batches of at most kMaxTensors
//     and describes each batch BY VALUE in a kernel argument (struct Batch,
//     well under the classic 4 KB parameter limit): data pointers, grad
//     pointers, numels, dtype codes and each tensor's first chunk relative to
//     the batch. One launch per batch (a single launch for lists of up to
//     kMaxTensors tensors); block b of a launch processes the batch's chunk b
//     and finds its tensor by binary search over the chunk starts.
//   * Each thread sums its share of a chunk (at most 128 elements) in the
//     compute type (float32 for 32- and 16-bit data: GPUs without fast FP64
//     stay memory-bound) and folds it into float64; a share whose float32
//     sums left float32's range is summed again in float64, as on the CPU.
//   * Each block reduces its chunk to one Partial (sum|w|, sum w^2, max|w|,
//     nnz) with a fixed-order tree and writes it to the workspace at its global
//     chunk index. Block 0 of each launch also writes the batch's per-tensor
//     chunk ranges (first[t]) into the workspace, so the finishing kernel needs
//     no host->device copy.
//   * ONE finishing launch: a warp per tensor folds that tensor's chunk
//     partials (lane-strided in chunk order, then a fixed shuffle tree) and
//     writes the per-tensor results. For the penalty, each tensor's term
//     l1*s1 + l2*s2 goes to the workspace and the last block to finish (an
//     integer ticket; no floating-point atomics) folds the terms in a fixed
//     order and writes the value.
// Every reduction order depends only on the tensor sizes: same input, same bits.
//
// Nothing here synchronizes with the host, copies host memory or allocates:
// the ops can be captured in a CUDA graph.
//
// The per-element math lives in csrc/common/op_math.h, shared with the CPU
// kernels; this file keeps iteration, chunking and reductions. Every launch
// goes through PYREG_LAUNCH and every shared variable through PYREG_SHARED
// (launch.h), so the file also compiles as host C++ against the CUDA emulator
// (csrc/cuda/emu/), which runs these kernels in CI without a GPU.
//
// Workspace layout (see Layout): [counter: 16 B][first: int64 x (n+1)]
// [terms: double x n][parts: Partial x (an upper bound of C)], each piece
// 16-byte aligned.
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
#include "../common/op_math.h"
#include "launch.h"

#ifndef PYREG_CUDA_ARCHS
#define PYREG_CUDA_ARCHS ""
#endif
#ifndef PYREG_CUDA_TABLE
#define PYREG_CUDA_TABLE kCuda
#endif

namespace pyreg {
namespace {

constexpr int kThreads = 512;                 // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kChunkShift = 16;                // chunks of large tensors: 65536 elements
constexpr int kSmallChunkShift = 14;           // chunks of the others: 16384 elements
constexpr int64_t kChunk = int64_t(1) << kChunkShift;
constexpr int64_t kSmallChunk = int64_t(1) << kSmallChunkShift;
constexpr int64_t kBigTensor = int64_t(1) << 22;  // elements from which a tensor uses kChunk
constexpr int kMaxTensors = 120;              // tensors per launch (by-value metadata)
constexpr int64_t kMaxGrid = INT_MAX;         // blocks per launch (grid.x limit)

enum Op : int { kStats = 0, kPenalty = 1, kGrad = 2, kProx = 3 };

// ---------------------------------------------------------------------------
// Kernel arguments
// ---------------------------------------------------------------------------
struct Batch {
  void* x[kMaxTensors];            // data pointers
  void* g[kMaxTensors];            // grad pointers (add_penalty_grad only)
  int64_t numel[kMaxTensors];
  int32_t cstart[kMaxTensors + 1];  // first chunk of each tensor, relative to chunk0
  int8_t dtype[kMaxTensors];
  int8_t shift[kMaxTensors];       // log2 of the tensor's chunk size
  int64_t chunk0;                  // global index of the batch's first chunk
  int32_t t0;                      // global index of the batch's first tensor
  int32_t nt;                      // tensors in this batch (0 only for an empty list)
};

struct Coefs {
  Coef l1, l2, lr;
};

struct Work {
  unsigned* counter;
  int64_t* first;  // n+1 entries: tensor t owns global chunks [first[t], first[t+1])
  double* terms;   // n entries: l1[t]*s1 + l2[t]*s2 (penalty ops)
  Partial* parts;  // one per global chunk
};

struct Outs {
  void* l1;
  void* l2;
  void* linf;
  int64_t* nnz;
  void* value;
  int out_dtype;
};

// Kernel parameter space: 4 KB on every toolkit/driver pyreg supports.
static_assert(sizeof(Batch) + sizeof(Coefs) + sizeof(Work) <= 4000,
              "chunk kernel arguments must fit in 4 KB");
static_assert(kChunk * 8 < INT_MAX, "chunk lengths are int");
static_assert(kChunk / kThreads <= 128, "a thread's float32 run is at most 128 elements");

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

// Per-tensor constants of an op, in the compute type.
template <typename A>
struct Params {
  A c1, c2;            // add_penalty_grad: l1, 2*l2
  ProxParams<A> prox;  // prox
};

// Thread accumulators, in the compute type A: a thread's share of a chunk is
// at most 128 elements, a short run that float32 sums as accurately as the
// CPU kernels' lanes; run_chunk folds it into float64 (again in float64 when
// out of float32's range).
template <typename A>
struct Acc {
  A s1 = A(0), s2 = A(0), mx = A(0);
  int nnz = 0;
};

// The per-element work of each op, reading (and for grad/prox writing) storage.
template <int kOp, typename T, typename A>
__device__ __forceinline__ void element(T& xv, T& gv, const Params<A>& p, Acc<A>& acc) {
  const A v = load<A>(xv);
  if constexpr (kOp == kProx) {
    const T o = store<T>(prox_value(v, p.prox));
    xv = o;
    acc.nnz += load<A>(o) != A(0) ? 1 : 0;  // nonzeros of what was stored
  } else {
    const A a = abs_of(v);
    acc.s1 += a;
    acc.s2 += v * v;
    if constexpr (kOp == kStats) {
      acc.mx = a > acc.mx ? a : acc.mx;
      acc.nnz += v != A(0) ? 1 : 0;
    }
    if constexpr (kOp == kGrad) gv = store<T>(load<A>(gv) + grad_term(v, p.c1, p.c2));
  }
  (void)gv;
}

// Visits this thread's elements of a chunk of len elements in a fixed order:
// vec(i) for its 16-byte vectors i (nv of them in all), then one(i) for its
// elements of the scalar tail.
template <typename V, typename S>
__device__ __forceinline__ void for_my_elements(int nv, int vw, int len, V&& vec, S&& one) {
#pragma unroll 4
  for (int i = threadIdx.x; i < nv; i += kThreads) vec(i);
  for (int i = nv * vw + int(threadIdx.x); i < len; i += kThreads) one(i);
}

// One chunk (len elements at x, and g for grads) by the whole block; returns
// this thread's share as a Partial (before the block reduction).
template <int kOp, typename T>
__device__ __forceinline__ Partial run_chunk(void* xbase, void* gbase, int64_t begin, int len,
                                             const Coefs& c, int t) {
  using A = opmath_t<T>;
  T* __restrict__ x = static_cast<T*>(xbase) + begin;
  T* __restrict__ g = kOp == kGrad ? static_cast<T*>(gbase) + begin : nullptr;

  Params<A> p{};
  if constexpr (kOp == kGrad) {
    p.c1 = A(coef_at(c.l1, t));
    p.c2 = A(2.0 * coef_at(c.l2, t));
  }
  if constexpr (kOp == kProx) p.prox = prox_params<A>(coef_at(c.l1, t), coef_at(c.l2, t), coef_at(c.lr, t));

  Acc<A> acc;
  // 16-byte vectors when the chunk start is 16-byte aligned (chunks are a
  // multiple of 16 bytes, so that is the tensor's alignment), scalar tails.
  constexpr int V = 16 / int(sizeof(T));
  const uintptr_t mis = (reinterpret_cast<uintptr_t>(x) |
                         (kOp == kGrad ? reinterpret_cast<uintptr_t>(g) : uintptr_t(0))) & 15u;
  const int nv = mis == 0 ? len / V : 0;
  for_my_elements(
      nv, V, len,
      [&](int i) {
        uint4 rx = reinterpret_cast<const uint4*>(x)[i];
        T vx[V];
        memcpy(vx, &rx, 16);
        if constexpr (kOp == kGrad) {
          uint4 rg = reinterpret_cast<const uint4*>(g)[i];
          T vg[V];
          memcpy(vg, &rg, 16);
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, T, A>(vx[k], vg[k], p, acc);
          memcpy(&rg, vg, 16);
          reinterpret_cast<uint4*>(g)[i] = rg;
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, T, A>(vx[k], vx[k], p, acc);
          if constexpr (kOp == kProx) {
            memcpy(&rx, vx, 16);
            reinterpret_cast<uint4*>(x)[i] = rx;
          }
        }
      },
      [&](int i) {
        T xv = x[i];
        if constexpr (kOp == kGrad) {
          T gv = g[i];
          element<kOp, T, A>(xv, gv, p, acc);
          g[i] = gv;
        } else {
          element<kOp, T, A>(xv, xv, p, acc);
          if constexpr (kOp == kProx) x[i] = xv;
        }
      });
  Partial out{double(acc.s1), double(acc.s2), double(acc.mx), int64_t(acc.nnz)};
  if constexpr (kOp != kProx && sizeof(A) < sizeof(double)) {
    if (out_of_float_range(acc.s1, acc.s2)) {
      // Rare: this thread's elements again, in float64 (the spec). The weights
      // were only read (grads are written, weights never), so they are intact.
      double d1 = 0.0, d2 = 0.0;
      auto add = [&](int i) {
        const double d = double(load<A>(x[i]));
        d1 += fabs(d);
        d2 += d * d;
      };
      for_my_elements(
          nv, V, len,
          [&](int i) {
            for (int k = 0; k < V; ++k) add(i * V + k);
          },
          add);
      out.s1 = d1;
      out.s2 = d2;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------
template <int kOp>
__global__ void __launch_bounds__(kThreads) chunk_kernel(const Batch b, const Coefs c, const Work w) {
  const int cidx = int(blockIdx.x);
  if (cidx == 0) {
    // This batch's tensor -> chunk map, for the finishing kernel. Entry t0+nt
    // is also written by the next batch, with the same value.
    for (int k = int(threadIdx.x); k <= b.nt; k += kThreads)
      w.first[b.t0 + k] = b.chunk0 + b.cstart[k];
    if (b.t0 == 0 && threadIdx.x == 0) *w.counter = 0u;
  }
  if (cidx >= b.cstart[b.nt]) return;  // only for a batch without chunks (grid of 1)

  // The tensor owning this chunk: the largest k with cstart[k] <= cidx (empty
  // tensors share their cstart with the next tensor, so they are never picked).
  int lo = 0, hi = b.nt - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (b.cstart[mid] <= cidx) lo = mid;
    else hi = mid - 1;
  }
  const int k = lo;
  const int64_t chunk = int64_t(1) << b.shift[k];
  const int64_t begin = int64_t(cidx - b.cstart[k]) * chunk;
  const int64_t rest = b.numel[k] - begin;
  const int len = int(rest < chunk ? rest : chunk);
  const int t = b.t0 + k;

  Partial p;
  switch (b.dtype[k]) {
    case kFloat64: p = run_chunk<kOp, double>(b.x[k], b.g[k], begin, len, c, t); break;
    case kFloat16: p = run_chunk<kOp, half_t>(b.x[k], b.g[k], begin, len, c, t); break;
    case kBFloat16: p = run_chunk<kOp, bf16_t>(b.x[k], b.g[k], begin, len, c, t); break;
    default: p = run_chunk<kOp, float>(b.x[k], b.g[k], begin, len, c, t); break;
  }
  p = block_reduce(p);
  if (threadIdx.x == 0) w.parts[b.chunk0 + cidx] = p;
}

// kFin: kStats (weight_stats), kPenalty (penalty and add_penalty_grad), kProx.
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

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
int64_t align16(int64_t b) { return (b + 15) & ~int64_t(15); }

int chunk_shift(int64_t numel) { return numel >= kBigTensor ? kChunkShift : kSmallChunkShift; }

int64_t chunks_of(int64_t numel) {
  const int64_t chunk = int64_t(1) << chunk_shift(numel);
  return (numel + chunk - 1) / chunk;
}

// Sized for the most chunks n tensors of `total` elements can have:
// sum ceil(numel_i / chunk_i) <= total / kSmallChunk + n.
struct Layout {
  int64_t first, terms, parts, total;
  Layout(int64_t n, int64_t numel) {
    const int64_t chunks = numel / kSmallChunk + n;
    first = 16;
    terms = first + align16(8 * (n + 1));
    parts = terms + align16(8 * n);
    total = parts + int64_t(sizeof(Partial)) * (chunks > 0 ? chunks : 1);
  }
  explicit Layout(const TensorList& w) : Layout(w.size(), total_numel(w)) {}
  static int64_t total_numel(const TensorList& w) {
    int64_t s = 0;
    for (int64_t k : w.numels) s += k > 0 ? k : 0;
    return s;
  }
};

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("pyreg CUDA: " + what); }

void check(cudaError_t e, const char* what) {
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

std::vector<Batch> plan(const TensorList& w, void* const* grads) {
  const int64_t n = w.size();
  if (int64_t(w.numels.size()) != n || int64_t(w.dtypes.size()) != n)
    fail("tensor list pointers, numels and dtypes differ in length");
  if (n >= INT_MAX) fail("too many tensors");
  std::vector<Batch> out;
  Batch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t chunk0 = 0, rel = 0;  // rel: chunks in `cur` so far
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = w.numels[t];
    const int code = w.dtypes[t];
    if (numel < 0) fail("negative numel for tensor " + std::to_string(t));
    if (code < kFloat32 || code > kBFloat16)
      fail("unsupported dtype code " + std::to_string(code) + " for tensor " + std::to_string(t));
    if (numel > 0 && w.ptrs[t] == nullptr) fail("null data pointer for tensor " + std::to_string(t));
    if (numel > 0 && grads != nullptr && grads[t] == nullptr)
      fail("null grad pointer for tensor " + std::to_string(t));
    const int64_t ch = chunks_of(numel);
    if (ch > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxTensors || rel + ch > kMaxGrid) {  // close the batch
      cur.cstart[cur.nt] = int32_t(rel);
      out.push_back(cur);
      chunk0 += rel;
      std::memset(&cur, 0, sizeof(cur));
      cur.t0 = int32_t(t);
      rel = 0;
    }
    cur.chunk0 = chunk0;
    const int k = cur.nt++;
    cur.x[k] = w.ptrs[t];
    cur.g[k] = grads != nullptr ? grads[t] : nullptr;
    cur.numel[k] = numel;
    cur.dtype[k] = int8_t(code);
    cur.shift[k] = int8_t(chunk_shift(numel));
    cur.cstart[k] = int32_t(rel);
    rel += ch;
  }
  cur.chunk0 = chunk0;
  cur.cstart[cur.nt] = int32_t(rel);
  out.push_back(cur);  // always at least one batch (n == 0: nt == 0, no chunks)
  return out;
}

Work work_of(const TensorList& w, void* workspace) {
  if (workspace == nullptr) fail("null workspace");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) fail("workspace is not 16-byte aligned");
  const Layout lay(w);
  char* base = static_cast<char*>(workspace);
  return Work{reinterpret_cast<unsigned*>(base), reinterpret_cast<int64_t*>(base + lay.first),
              reinterpret_cast<double*>(base + lay.terms),
              reinterpret_cast<Partial*>(base + lay.parts)};
}

void check_out_dtype(int out_dtype) {
  if (out_dtype != kFloat32 && out_dtype != kFloat64)
    fail("out_dtype must be 0 (float32) or 1 (float64), got " + std::to_string(out_dtype));
}

template <int kOp, int kFin>
void launch(const TensorList& w, void* const* grads, const Coefs& c, const Outs& o,
            const Launch& at, const char* name) {
  const std::vector<Batch> batches = plan(w, grads);
  const Work wk = work_of(w, at.workspace);
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();  // do not blame this launch for an earlier, non-sticky error
  cudaStream_t s = reinterpret_cast<cudaStream_t>(at.stream);
  for (const Batch& b : batches) {
    const int64_t blocks = b.cstart[b.nt] > 0 ? b.cstart[b.nt] : 1;
    PYREG_LAUNCH(chunk_kernel<kOp>, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
    check(cudaGetLastError(), (std::string(name) + " chunk kernel launch").c_str());
  }
  const int64_t n = w.size();
  const int64_t fblocks = n > 0 ? (n + kWarps - 1) / kWarps : 1;
  PYREG_LAUNCH(finish_kernel<kFin>, dim3(unsigned(fblocks)), kThreads, 0, s, wk, n, c, o);
  check(cudaGetLastError(), (std::string(name) + " finishing kernel launch").c_str());
}


// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------
std::string archs() {
  // CMake's list ("80-real,90-real,90-virtual", ',' for ';') -> "sm_80 sm_90 compute_90".
  const std::string spec = PYREG_CUDA_ARCHS;
  std::string out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t end = spec.find_first_of(",; ", pos);
    if (end == std::string::npos) end = spec.size();
    const std::string a = spec.substr(pos, end - pos);
    pos = end + 1;
    if (a.empty()) continue;
    auto add = [&](const std::string& s) { out += (out.empty() ? "" : " ") + s; };
    const size_t dash = a.find('-');
    const std::string num = a.substr(0, dash);
    const bool numeric = !num.empty() && num[0] >= '0' && num[0] <= '9';
    if (!numeric) add(a);
    else if (dash == std::string::npos) { add("sm_" + num); add("compute_" + num); }
    else if (a.substr(dash + 1) == "real") add("sm_" + num);
    else if (a.substr(dash + 1) == "virtual") add("compute_" + num);
    else add(a);
  }
  return out;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string runtime_error() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  if (n == 0) return "no CUDA device found";
  return "";
}

std::string device_error(int device) {
  const std::string rt = runtime_error();
  if (!rt.empty()) return rt;
  int n = 0;
  (void)cudaGetDeviceCount(&n);
  if (device < 0 || device >= n)
    return "no CUDA device " + std::to_string(device) + " (" + std::to_string(n) + " found)";
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();
    return std::string("cannot use device ") + std::to_string(device) + ": " + cudaGetErrorName(e);
  }
  struct K { const void* fn; const char* name; };
  const K kernels[] = {
      {reinterpret_cast<const void*>(&chunk_kernel<kStats>), "chunk_kernel<stats>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kPenalty>), "chunk_kernel<penalty>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kGrad>), "chunk_kernel<grad>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kProx>), "chunk_kernel<prox>"},
      {reinterpret_cast<const void*>(&finish_kernel<kStats>), "finish_kernel<stats>"},
      {reinterpret_cast<const void*>(&finish_kernel<kPenalty>), "finish_kernel<penalty>"},
      {reinterpret_cast<const void*>(&finish_kernel<kProx>), "finish_kernel<prox>"},
  };
  std::string err;
  for (const K& k : kernels) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, k.fn);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      cudaDeviceProp prop;
      const bool have = cudaGetDeviceProperties(&prop, device) == cudaSuccess;
      (void)cudaGetLastError();
      err = std::string(k.name) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") on " +
            (have ? std::string(prop.name) + ", compute capability " + std::to_string(prop.major) +
                        "." + std::to_string(prop.minor)
                  : "device " + std::to_string(device)) +
            "; pyreg's kernels are built for " + archs() + " (set the CMake option PYREG_CUDA_ARCHS when building)";
      break;
    }
  }
  (void)cudaSetDevice(prev);
  return err;
}

int64_t workspace_bytes(int64_t n, int64_t total_numel) {
  if (n < 0 || total_numel < 0) fail("workspace_bytes: negative size");
  return Layout(n, total_numel).total;
}

void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                  int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{l1, l2, linf, nnz, nullptr, out_dtype};
  const Coef none{nullptr, 0.0};
  launch<kStats, kStats>(w, nullptr, Coefs{none, none, none}, o, at, "weight_stats");
}

void penalty(const TensorList& w, Coef l1, Coef l2, void* out, int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kPenalty, kPenalty>(w, nullptr, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at, "penalty");
}

void add_penalty_grad(const TensorList& w, void* const* grads, Coef l1, Coef l2, void* out,
                      int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  if (grads == nullptr && w.size() > 0) fail("null grads");
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kGrad, kPenalty>(w, grads, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at,
                          "add_penalty_grad");
}

void prox(const TensorList& w, Coef l1, Coef l2, Coef lr, int64_t* nnz, const Launch& at) {
  const Outs o{nullptr, nullptr, nullptr, nnz, nullptr, kFloat64};
  launch<kProx, kProx>(w, nullptr, Coefs{l1, l2, lr}, o, at, "prox");
}

}  // namespace

extern const Kernels PYREG_CUDA_TABLE = {
    true,         archs,   device_count, runtime_error,    device_error, workspace_bytes,
    weight_stats, penalty, add_penalty_grad, prox,
};

}  // namespace pyreg
