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
#include "../common/group_plan.h"
#include "../common/op_math.h"
#include "../common/optim_math.h"
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
constexpr int kMaxTensors = 96;               // tensors per launch (by-value metadata)
constexpr int64_t kMaxGrid = INT_MAX;         // blocks per launch (grid.x limit)

enum Op : int { kStats = 0, kPenalty = 1, kGrad = 2, kProx = 3 };

// ---------------------------------------------------------------------------
// Kernel arguments
// ---------------------------------------------------------------------------
struct Batch {
  void* x[kMaxTensors];            // data pointers
  void* g[kMaxTensors];            // grad pointers (add_penalty_grad only)
  const void* r[kMaxTensors];      // reference pointers (ops toward a reference), or null
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
// kRef: toward the reference value rv (d = x - rv in place of x).
template <int kOp, bool kRef, typename T, typename A>
__device__ __forceinline__ void element(T& xv, T& gv, T rv, const Params<A>& p, Acc<A>& acc) {
  if constexpr (kOp == kProx) {
    if constexpr (kRef) {
      const T o = prox_toward<T>(load<A>(xv), load<A>(rv), p.prox);
      xv = o;
      acc.nnz += load<A>(o) != load<A>(rv) ? 1 : 0;  // elements left different from the reference
    } else {
      const T o = store<T>(prox_value(load<A>(xv), p.prox));
      xv = o;
      acc.nnz += load<A>(o) != A(0) ? 1 : 0;  // nonzeros of what was stored
    }
  } else {
    const A v = kRef ? A(load<A>(xv) - load<A>(rv)) : load<A>(xv);
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
  (void)rv;
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
template <int kOp, bool kRef, typename T>
__device__ __forceinline__ Partial run_chunk(void* xbase, void* gbase, const void* rbase,
                                             int64_t begin, int len, const Coefs& c, int t) {
  using A = opmath_t<T>;
  T* __restrict__ x = static_cast<T*>(xbase) + begin;
  T* __restrict__ g = kOp == kGrad ? static_cast<T*>(gbase) + begin : nullptr;
  const T* __restrict__ r = kRef ? static_cast<const T*>(rbase) + begin : nullptr;

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
                         (kOp == kGrad ? reinterpret_cast<uintptr_t>(g) : uintptr_t(0)) |
                         (kRef ? reinterpret_cast<uintptr_t>(r) : uintptr_t(0))) & 15u;
  const int nv = mis == 0 ? len / V : 0;
  for_my_elements(
      nv, V, len,
      [&](int i) {
        uint4 rx = reinterpret_cast<const uint4*>(x)[i];
        T vx[V];
        memcpy(vx, &rx, 16);
        T vr[V];
        if constexpr (kRef) {
          const uint4 rr = reinterpret_cast<const uint4*>(r)[i];
          memcpy(vr, &rr, 16);
        } else {
          memcpy(vr, &rx, 16);  // unused
        }
        if constexpr (kOp == kGrad) {
          uint4 rg = reinterpret_cast<const uint4*>(g)[i];
          T vg[V];
          memcpy(vg, &rg, 16);
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, kRef, T, A>(vx[k], vg[k], vr[k], p, acc);
          memcpy(&rg, vg, 16);
          reinterpret_cast<uint4*>(g)[i] = rg;
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, kRef, T, A>(vx[k], vx[k], vr[k], p, acc);
          if constexpr (kOp == kProx) {
            memcpy(&rx, vx, 16);
            reinterpret_cast<uint4*>(x)[i] = rx;
          }
        }
      },
      [&](int i) {
        T xv = x[i];
        const T rv = kRef ? r[i] : xv;
        if constexpr (kOp == kGrad) {
          T gv = g[i];
          element<kOp, kRef, T, A>(xv, gv, rv, p, acc);
          g[i] = gv;
        } else {
          element<kOp, kRef, T, A>(xv, xv, rv, p, acc);
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
        const double d = kRef ? double(A(load<A>(x[i]) - load<A>(r[i]))) : double(load<A>(x[i]));
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
  if (kOp != kStats && b.r[k] != nullptr) {
    switch (b.dtype[k]) {
      case kFloat64: p = run_chunk<kOp, true, double>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      case kFloat16: p = run_chunk<kOp, true, half_t>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      case kBFloat16: p = run_chunk<kOp, true, bf16_t>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      default: p = run_chunk<kOp, true, float>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
    }
  } else {
    switch (b.dtype[k]) {
      case kFloat64: p = run_chunk<kOp, false, double>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      case kFloat16: p = run_chunk<kOp, false, half_t>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      case kBFloat16: p = run_chunk<kOp, false, bf16_t>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      default: p = run_chunk<kOp, false, float>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
    }
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
// Group ops (csrc/common/group_plan.h). Per batch of tensors:
//   group_tile_kernel<1>: a block per tile sums each column's squares over the
//     tile's rows (a thread per column, kGroupCols columns per thread), then
//     each group's columns in shared memory (a thread per group when groups
//     are narrower than a warp, else a warp per group with a fixed shuffle
//     tree) into one float64 partial per (row tile, group, sub-tile);
//   group_finish_kernel: a thread per group folds its partials in order into
//     its norm, then its factor, and a Partial for the per-tensor fold (norm
//     in s1, a count in nnz);
//   group_tile_kernel<2> (prox, max_norm, grad): each element times its
//     group's factor;
// then finish_kernel folds the per-group Partials per tensor (counts, or the
// penalty with the ticket), as for the element-wise ops.
// ---------------------------------------------------------------------------
constexpr int kMaxGroupTensors = 48;
constexpr int kGroupCols = int(kGroupTileCols) / kThreads;  // columns per thread
static_assert(kGroupCols * kThreads == kGroupTileCols, "a tile's columns split evenly over threads");

struct GroupBatch {
  void* x[kMaxGroupTensors];
  void* g[kMaxGroupTensors];   // grads (kGGrad)
  int64_t outer[kMaxGroupTensors], groups[kMaxGroupTensors], inner[kMaxGroupTensors];
  int64_t poff[kMaxGroupTensors];       // first tile partial of each tensor (global)
  int64_t goff[kMaxGroupTensors + 1];   // first group of each tensor (global)
  int32_t tstart[kMaxGroupTensors + 1]; // first tile of each tensor, relative to the batch
  int8_t dtype[kMaxGroupTensors];
  int32_t t0, nt;
};

struct GroupWork {
  Work base;          // counter, first (= group offsets), terms, parts (one Partial per group)
  double* factor;     // one per group
  double* tiles;      // tile partials
  void* norms;        // kGNorms output (out_dtype)
  int out_dtype;
};

static_assert(sizeof(GroupBatch) + sizeof(GroupCoefs) + sizeof(GroupWork) <= 4000,
              "group kernel arguments must fit in 4 KB");

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// The value whose group norms an op takes (see csrc/cpu/kernels.cpp).
template <int kOp, typename T, typename A>
__device__ __forceinline__ A group_value(T x, const ProxParams<A>& soft) {
  if constexpr (kOp == kGProx) return load<A>(store<T>(prox_value(load<A>(x), soft)));
  else return load<A>(x);
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

// Wide groups go to teams of warps: min(gp, kWarps) teams of kWarps / teams
// warps each; a team takes the tile's groups in turn, its threads striding
// over each group's runs. Each warp leaves its own partial, so a wide group has
// team_warps(g) partials per (row tile, sub-tile): the tile partials of a
// tensor are g.partials() * team_warps(g).
PYREG_HD int64_t team_warps(const GroupTiling& g) {
  return g.wide ? kWarps / (g.gp < kWarps ? g.gp : kWarps) : 1;
}

struct Team {
  int64_t n;      // teams
  int64_t warps;  // warps per team
  int64_t id;     // this thread's team (>= n: idle)
  int64_t q, nq;  // this thread's index in its team, the team's threads
  int64_t slot;   // this warp's partial within its team
};

__device__ __forceinline__ Team team_of(const GroupTiling& g) {
  Team m;
  m.warps = team_warps(g);
  m.n = kWarps / m.warps;
  if (m.n > g.gp) m.n = g.gp;
  const int64_t warp = threadIdx.x >> 5;
  m.id = warp / m.warps;
  m.slot = warp % m.warps;
  m.q = m.slot * 32 + (threadIdx.x & 31);
  m.nq = m.warps * 32;
  return m;
}

// colsum: the kernel's shared buffer of kGroupTileCols doubles (declared once
// in the kernel: a GPU reserves every __shared__ declaration of every dtype's
// instance of this function, not just the one that runs).
template <int kPass, int kOp, typename T>
__device__ __forceinline__ void group_tile(const GroupBatch& b, int k, int64_t tile, const GroupCoefs& c,
                                           const GroupWork& w, double* colsum) {
  using A = opmath_t<T>;
  const int t = b.t0 + k;
  const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
  const GroupTile u = group_tile(g, tile);
  const ProxParams<A> soft = kOp == kGProx ? prox_params<A>(coef_at(c.l1, t), 0.0, coef_at(c.lr, t))
                                           : prox_params<A>(0.0, 0.0, 0.0);
  T* x = static_cast<T*>(b.x[k]);
  const int64_t L = g.groups * g.inner;
  T* gr = kOp == kGGrad ? static_cast<T*>(b.g[k]) : nullptr;
  // Pass 2's update of element i with its group's factor fg.
  auto apply = [&](int64_t i, double fg) {
    if constexpr (kOp == kGGrad) {
      gr[i] = group_grad<T>(load<A>(gr[i]), load<A>(x[i]), fg);
    } else {
      x[i] = group_scaled<T>(group_value<kOp, T, A>(x[i], soft), fg);
    }
  };
  if (g.wide) {  // tile-uniform
    const Team m = team_of(g);
    if (m.id >= m.n) return;  // an idle warp (no barrier below)
    const int64_t width = g.sub == 1 ? g.inner : u.ncols;  // of each group's run
    const int lane = threadIdx.x & 31;
    for (int64_t j = m.id; j < u.ng; j += m.n) {  // warp-uniform
      const int64_t first = u.col0 + j * g.inner;
      if constexpr (kPass == 1) {
        double sq = 0.0;
        for (int64_t r = 0; r < u.nrows; ++r) {
          const T* run = x + (u.row0 + r) * L + first;
          for (int64_t i = m.q; i < width; i += m.nq) {
            const double v = double(group_value<kOp, T, A>(run[i], soft));
            sq += v * v;
          }
        }
        sq = warp_sum(sq);
        if (lane == 0)
          w.tiles[b.poff[k] + partial_index(g, u.rt, u.g0 + j, u.s) * m.warps + m.slot] = sq;
      } else {
        const double fg = w.factor[b.goff[k] + u.g0 + j];
        for (int64_t r = 0; r < u.nrows; ++r) {
          const int64_t base = (u.row0 + r) * L + first;
          for (int64_t i = m.q; i < width; i += m.nq) apply(base + i, fg);
        }
      }
    }
    return;
  }
  // Narrow groups: a thread per column.
  if constexpr (kPass == 1) {
    double acc[kGroupCols];
#pragma unroll
    for (int j = 0; j < kGroupCols; ++j) acc[j] = 0.0;
    for (int64_t r = 0; r < u.nrows; ++r) {
      const T* row = x + (u.row0 + r) * L + u.col0;
#pragma unroll
      for (int j = 0; j < kGroupCols; ++j) {
        const int64_t col = int64_t(threadIdx.x) + j * kThreads;
        if (col < u.ncols) {
          const double v = double(group_value<kOp, T, A>(row[col], soft));
          acc[j] += v * v;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kGroupCols; ++j) {
      const int64_t col = int64_t(threadIdx.x) + j * kThreads;
      if (col < u.ncols) colsum[col] = acc[j];
    }
    __syncthreads();
    double* out = w.tiles + b.poff[k];
    for (int64_t j = threadIdx.x; j < u.ng; j += kThreads) {  // narrow groups are never split
      double sq = 0.0;
      for (int64_t i = 0; i < g.inner; ++i) sq += colsum[j * g.inner + i];
      out[partial_index(g, u.rt, u.g0 + j, 0)] = sq;
    }
  } else {
    double f[kGroupCols];
#pragma unroll
    for (int j = 0; j < kGroupCols; ++j) {
      const int64_t col = int64_t(threadIdx.x) + j * kThreads;
      f[j] = col < u.ncols ? w.factor[b.goff[k] + u.g0 + col / g.inner] : 0.0;
    }
    for (int64_t r = 0; r < u.nrows; ++r) {
      const int64_t base = (u.row0 + r) * L + u.col0;
#pragma unroll
      for (int j = 0; j < kGroupCols; ++j) {
        const int64_t col = int64_t(threadIdx.x) + j * kThreads;
        if (col < u.ncols) apply(base + col, f[j]);
      }
    }
  }
}

// Group j's norm: the fold of its tile partials in a fixed order (row tile,
// sub-tile, team warp).
__device__ __forceinline__ double group_norm(const GroupBatch& b, int k, const GroupTiling& g,
                                             const GroupWork& w, int64_t j) {
  const int64_t tw = team_warps(g);
  double sq = 0.0;
  for (int64_t rt = 0; rt < g.row_tiles; ++rt)
    for (int64_t s = 0; s < g.sub; ++s)
      for (int64_t q = 0; q < tw; ++q) sq += w.tiles[b.poff[k] + partial_index(g, rt, j, s) * tw + q];
  return sqrt(sq);
}

// True when a tile holds its groups whole (one row tile, no sub-tiles): pass
// 1 then also scales the tile, while it is in cache, and pass 2 skips it.
template <int kOp>
__device__ __forceinline__ bool fused_tiles(const GroupTiling& g) {
  return (kOp == kGProx || kOp == kGMaxNorm || kOp == kGGrad) && g.row_tiles == 1 && g.sub == 1;
}

template <int kPass, int kOp, typename T>
__device__ __forceinline__ void group_tile_run(const GroupBatch& b, int k, int64_t tile, const GroupCoefs& c,
                                               const GroupWork& w, double* colsum, bool fused) {
  group_tile<kPass, kOp, T>(b, k, tile, c, w, colsum);
  if constexpr (kPass == 1) {
    if (fused) {  // block-uniform
      __syncthreads();  // the tile's partials are written
      const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
      const GroupTile u = group_tile(g, tile);
      for (int64_t j = threadIdx.x; j < u.ng; j += kThreads)
        w.factor[b.goff[k] + u.g0 + j] = group_factor<kOp>(c, b.t0 + k, group_norm(b, k, g, w, u.g0 + j));
      __syncthreads();  // and its factors
      group_tile<2, kOp, T>(b, k, tile, c, w, colsum);
    }
  }
}

template <int kPass, int kOp>
__global__ void __launch_bounds__(kThreads)
    group_tile_kernel(const GroupBatch b, const GroupCoefs c, const GroupWork w) {
  const int64_t tile = int64_t(blockIdx.x);
  if (kPass == 1 && tile == 0) {
    // This batch's tensor -> group map, for finish_kernel.
    for (int k = int(threadIdx.x); k <= b.nt; k += kThreads) w.base.first[b.t0 + k] = b.goff[k];
    if (b.t0 == 0 && threadIdx.x == 0) *w.base.counter = 0u;
  }
  if (tile >= b.tstart[b.nt]) return;  // only for a batch without tiles (grid of 1)
  const int k = owner(b.tstart, b.nt, tile);  // tensors without tiles share the next one's start
  const int64_t rel = tile - b.tstart[k];
  const bool fused = fused_tiles<kOp>(group_tiling(b.outer[k], b.groups[k], b.inner[k]));
  if (kPass == 2 && fused) return;  // scaled in pass 1
  PYREG_SHARED(double[kPass == 1 ? kGroupTileCols : 1], colsum);
  switch (b.dtype[k]) {
    case kFloat64: group_tile_run<kPass, kOp, double>(b, k, rel, c, w, colsum, fused); break;
    case kFloat16: group_tile_run<kPass, kOp, half_t>(b, k, rel, c, w, colsum, fused); break;
    case kBFloat16: group_tile_run<kPass, kOp, bf16_t>(b, k, rel, c, w, colsum, fused); break;
    default: group_tile_run<kPass, kOp, float>(b, k, rel, c, w, colsum, fused); break;
  }
}

template <int kOp>
__global__ void __launch_bounds__(kThreads)
    group_finish_kernel(const GroupBatch b, const GroupCoefs c, const GroupWork w) {
  const int64_t gi = b.goff[0] + int64_t(blockIdx.x) * kThreads + threadIdx.x;  // global group
  if (gi >= b.goff[b.nt]) return;
  const int k = owner(b.goff, b.nt, gi);
  const int t = b.t0 + k;
  const int64_t j = gi - b.goff[k];
  const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
  const double n = group_norm(b, k, g, w, j);
  const double f = group_factor<kOp>(c, t, n);
  int64_t count = 0;
  if constexpr (kOp == kGNorms) write_out(w.norms, w.out_dtype, gi, n);
  if constexpr (kOp == kGProx) count = f != 0.0 ? 1 : 0;
  if constexpr (kOp == kGMaxNorm) count = n > coef_at(c.max_value, t) ? 1 : 0;
  w.factor[gi] = f;
  Partial p = zero_partial();
  p.s1 = n;
  p.nnz = count;
  w.base.parts[gi] = p;
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

// The checks every planner makes of a tensor list (and its grads and refs).
void check_list(const TensorList& w, void* const* grads, const void* const* refs) {
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

std::vector<Batch> plan(const TensorList& w, void* const* grads, const void* const* refs) {
  check_list(w, grads, refs);
  const int64_t n = w.size();
  std::vector<Batch> out;
  Batch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t chunk0 = 0, rel = 0;  // rel: chunks in `cur` so far
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = w.numels[t];
    const int code = w.dtypes[t];
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
    cur.r[k] = refs != nullptr ? refs[t] : nullptr;
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
void launch(const TensorList& w, void* const* grads, const void* const* refs, const Coefs& c,
            const Outs& o, const Launch& at, const char* name) {
  const std::vector<Batch> batches = plan(w, grads, refs);
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

// ---- group ops ----------------------------------------------------------------
struct GroupLayout {
  int64_t first, terms, parts, factor, tiles, total;
  GroupLayout(const TensorList& w, const GroupList& gl) {
    const int64_t n = w.size();
    int64_t groups = 0, partials = 0;
    for (int64_t t = 0; t < n; ++t) {
      groups += gl.groups[t];
      const GroupTiling g = group_tiling(gl.outer[t], gl.groups[t], gl.inner[t]);
      partials += g.partials() * team_warps(g);
    }
    first = 16;
    terms = first + align16(8 * (n + 1));
    parts = terms + align16(8 * n);
    factor = parts + align16(int64_t(sizeof(Partial)) * groups);
    tiles = factor + align16(8 * groups);
    total = tiles + 8 * (partials > 0 ? partials : 1);
  }
};

void check_groups(const TensorList& w, const GroupList& gl) {
  const int64_t n = w.size();
  if (int64_t(gl.outer.size()) != n || int64_t(gl.groups.size()) != n || int64_t(gl.inner.size()) != n)
    fail("group shapes differ in length from the tensor list");
  for (int64_t t = 0; t < n; ++t) {
    if (gl.outer[t] < 0 || gl.groups[t] < 0 || gl.inner[t] < 0 ||
        gl.outer[t] * gl.groups[t] * gl.inner[t] != w.numels[t])
      fail("group shape of tensor " + std::to_string(t) + " does not match its numel");
  }
}

std::vector<GroupBatch> group_plan(const TensorList& w, const GroupList& gl, void* const* grads) {
  check_groups(w, gl);
  check_list(w, grads, nullptr);
  const int64_t n = w.size();
  std::vector<GroupBatch> out;
  GroupBatch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t goff = 0, poff = 0, rel = 0;
  for (int64_t t = 0; t < n; ++t) {
    const GroupTiling g = group_tiling(gl.outer[t], gl.groups[t], gl.inner[t]);
    if (g.tiles() > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxGroupTensors || rel + g.tiles() > kMaxGrid) {  // close the batch
      cur.tstart[cur.nt] = int32_t(rel);
      cur.goff[cur.nt] = goff;
      out.push_back(cur);
      std::memset(&cur, 0, sizeof(cur));
      cur.t0 = int32_t(t);
      rel = 0;
    }
    const int k = cur.nt++;
    cur.x[k] = w.ptrs[t];
    cur.g[k] = grads != nullptr ? grads[t] : nullptr;
    cur.outer[k] = gl.outer[t];
    cur.groups[k] = gl.groups[t];
    cur.inner[k] = gl.inner[t];
    cur.poff[k] = poff;
    cur.goff[k] = goff;
    cur.tstart[k] = int32_t(rel);
    cur.dtype[k] = int8_t(w.dtypes[t]);
    rel += g.tiles();
    poff += g.partials() * team_warps(g);
    goff += gl.groups[t];
  }
  cur.tstart[cur.nt] = int32_t(rel);
  cur.goff[cur.nt] = goff;
  out.push_back(cur);  // always at least one batch
  return out;
}

template <int kOp>
void group_launch(const TensorList& w, const GroupList& gl, void* const* grads, const GroupCoefs& c,
                  void* norms, const Outs& o, const Launch& at, const char* name) {
  const std::vector<GroupBatch> batches = group_plan(w, gl, grads);
  if (at.workspace == nullptr) fail("null workspace");
  if (reinterpret_cast<uintptr_t>(at.workspace) % 16 != 0) fail("workspace is not 16-byte aligned");
  const GroupLayout lay(w, gl);
  char* base = static_cast<char*>(at.workspace);
  const GroupWork wk{Work{reinterpret_cast<unsigned*>(base), reinterpret_cast<int64_t*>(base + lay.first),
                          reinterpret_cast<double*>(base + lay.terms),
                          reinterpret_cast<Partial*>(base + lay.parts)},
                     reinterpret_cast<double*>(base + lay.factor), reinterpret_cast<double*>(base + lay.tiles),
                     norms, o.out_dtype};
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();
  cudaStream_t s = reinterpret_cast<cudaStream_t>(at.stream);
  const std::string nm(name);
  auto* const group_sums = &group_tile_kernel<1, kOp>;
  for (const GroupBatch& b : batches) {
    const int64_t blocks = b.tstart[b.nt] > 0 ? b.tstart[b.nt] : 1;
    PYREG_LAUNCH(group_sums, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
    check(cudaGetLastError(), (nm + " group norm kernel launch").c_str());
  }
  for (const GroupBatch& b : batches) {
    const int64_t ng = b.goff[b.nt] - b.goff[0];
    const int64_t blocks = ng > 0 ? (ng + kThreads - 1) / kThreads : 1;
    if (blocks > kMaxGrid) fail("too many groups");
    PYREG_LAUNCH(group_finish_kernel<kOp>, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
    check(cudaGetLastError(), (nm + " group factor kernel launch").c_str());
  }
  if constexpr (kOp == kGProx || kOp == kGMaxNorm || kOp == kGGrad) {
    auto* const group_scale = &group_tile_kernel<2, kOp>;
    for (const GroupBatch& b : batches) {
      const int64_t blocks = b.tstart[b.nt] > 0 ? b.tstart[b.nt] : 1;
      PYREG_LAUNCH(group_scale, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
      check(cudaGetLastError(), (nm + " group scale kernel launch").c_str());
    }
  }
  if constexpr (kOp != kGNorms) {
    const int64_t n = w.size();
    const int64_t fblocks = n > 0 ? (n + kWarps - 1) / kWarps : 1;
    // Per tensor: the groups' counts, or sum_g group_l1 * ||w_g|| (s2 is 0).
    const Coefs fc{c.group_l1, Coef{nullptr, 0.0}, Coef{nullptr, 0.0}};
    if constexpr (kOp == kGPenalty || kOp == kGGrad)
      PYREG_LAUNCH(finish_kernel<kPenalty>, dim3(unsigned(fblocks)), kThreads, 0, s, wk.base, n, fc, o);
    else
      PYREG_LAUNCH(finish_kernel<kProx>, dim3(unsigned(fblocks)), kThreads, 0, s, wk.base, n, fc, o);
    check(cudaGetLastError(), (nm + " finishing kernel launch").c_str());
  }
}

// ---- the fused optimizer step -----------------------------------------------------
#include "optim_step.cuh"

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
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGNorms>), "group_tile_kernel<1, norms>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGProx>), "group_tile_kernel<1, prox>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGMaxNorm>), "group_tile_kernel<1, max_norm>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGPenalty>), "group_tile_kernel<1, penalty>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGGrad>), "group_tile_kernel<1, grad>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGProx>), "group_tile_kernel<2, prox>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGMaxNorm>), "group_tile_kernel<2, max_norm>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGGrad>), "group_tile_kernel<2, grad>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGNorms>), "group_finish_kernel<norms>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGProx>), "group_finish_kernel<prox>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGMaxNorm>), "group_finish_kernel<max_norm>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGPenalty>), "group_finish_kernel<penalty>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGGrad>), "group_finish_kernel<grad>"},
      {reinterpret_cast<const void*>(&optim_kernel<kSgd>), "optim_kernel<sgd>"},
      {reinterpret_cast<const void*>(&optim_kernel<kAdam>), "optim_kernel<adam>"},
      {reinterpret_cast<const void*>(&optim_kernel<kAdagrad>), "optim_kernel<adagrad>"},
      {reinterpret_cast<const void*>(&optim_count_kernel), "optim_count_kernel"},
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
  launch<kStats, kStats>(w, nullptr, nullptr, Coefs{none, none, none}, o, at, "weight_stats");
}

void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out,
             int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kPenalty, kPenalty>(w, nullptr, refs, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at, "penalty");
}

void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1,
                      Coef l2, void* out, int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  if (grads == nullptr && w.size() > 0) fail("null grads");
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kGrad, kPenalty>(w, grads, refs, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at,
                          "add_penalty_grad");
}

void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at) {
  const Outs o{nullptr, nullptr, nullptr, nnz, nullptr, kFloat64};
  launch<kProx, kProx>(w, nullptr, refs, Coefs{l1, l2, lr}, o, at, "prox");
}

int64_t group_workspace_bytes(const TensorList& w, const GroupList& gl) {
  check_groups(w, gl);
  return GroupLayout(w, gl).total;
}

GroupCoefs no_group_coefs() {
  const Coef none{nullptr, 0.0};
  return GroupCoefs{none, none, none, none, none};
}

void group_norms(const TensorList& w, const GroupList& gl, void* norms, int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{nullptr, nullptr, nullptr, nullptr, nullptr, out_dtype};
  group_launch<kGNorms>(w, gl, nullptr, no_group_coefs(), norms, o, at, "group_norms");
}

void group_prox(const TensorList& w, const GroupList& gl, Coef l1, Coef group_l1, Coef l2, Coef lr,
                int64_t* nonzero, const Launch& at) {
  GroupCoefs c = no_group_coefs();
  c.l1 = l1, c.group_l1 = group_l1, c.l2 = l2, c.lr = lr;
  const Outs o{nullptr, nullptr, nullptr, nonzero, nullptr, kFloat64};
  group_launch<kGProx>(w, gl, nullptr, c, nullptr, o, at, "group_prox");
}

void max_norm(const TensorList& w, const GroupList& gl, Coef max_value, int64_t* clipped,
              const Launch& at) {
  GroupCoefs c = no_group_coefs();
  c.max_value = max_value;
  const Outs o{nullptr, nullptr, nullptr, clipped, nullptr, kFloat64};
  group_launch<kGMaxNorm>(w, gl, nullptr, c, nullptr, o, at, "max_norm");
}

void group_penalty(const TensorList& w, const GroupList& gl, Coef group_l1, void* out, int out_dtype,
                   const Launch& at) {
  check_out_dtype(out_dtype);
  GroupCoefs c = no_group_coefs();
  c.group_l1 = group_l1;
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  group_launch<kGPenalty>(w, gl, nullptr, c, nullptr, o, at, "group_penalty");
}

void add_group_penalty_grad(const TensorList& w, const GroupList& gl, void* const* grads,
                            Coef group_l1, void* out, int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  if (grads == nullptr && w.size() > 0) fail("null grads");
  GroupCoefs c = no_group_coefs();
  c.group_l1 = group_l1;
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  group_launch<kGGrad>(w, gl, grads, c, nullptr, o, at, "add_group_penalty_grad");
}

}  // namespace

extern const Kernels PYREG_CUDA_TABLE = {
    true,         archs,   device_count, runtime_error,    device_error, workspace_bytes,
    weight_stats, penalty, add_penalty_grad, prox,
    group_workspace_bytes, group_norms, group_prox, max_norm, group_penalty, add_group_penalty_grad,
    optim_step,
};

}  // namespace pyreg
