// sweep.h: what every family of pyreg's CPU kernels shares (elementwise.cpp,
// group.cpp, optim.cpp; kernels.h lists them): the chunking, the sweeps and
// the parallel run, in an unnamed namespace (each translation unit, and each
// instruction-set variant, gets its own copy).
//
// Structure, shared by every op:
//   1. plan():   cut every tensor into chunks of kCpuChunk elements -> items.
//   2. run():    one parallel_for over all items of all tensors; each item
//                writes its own Partial (no shared accumulators, no atomics).
//   3. finish(): per tensor, fold its items' partials in chunk order.
// The fold order depends only on tensor sizes, so results are bitwise identical
// for any thread count.
//
// The inner loop (sweep) streams blocks of kBlock elements: the op's
// element-wise work, then a multi-lane SIMD reduction of the block while it is
// in L1, folded into double accumulators: fp32 and 16-bit data get float32
// SIMD speed with nearly float64 accuracy.
//
// The per-element math (grad term, prox threshold and shrink, Partial and its
// fold, range check, write-out) lives in csrc/common/op_math.h, shared with
// the CUDA kernels; this file keeps iteration, chunking and reductions.
#pragma once
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/dtype.h"
#include "../common/group_plan.h"
#include "../common/op_math.h"
#include "../common/optim_math.h"
#include "thread_pool.h"

namespace pyreg::cpu {
namespace PYREG_ISA_NS {
namespace {

constexpr int64_t kBlock = 2048;
// Default of inline_bytes(): jobs under 4 MB of tensor data run inline.
constexpr int64_t kCpuInlineBytes = int64_t(4) << 20;
// Software prefetch distance, in elements. With the hardware prefetcher alone
// the reductions and prox_ stayed ~10% further from a.sum() / a.mul_(c) on an
// AMD EPYC (AVX2); add_penalty_grad_ (two streams) did not gain, so it does
// not prefetch.
constexpr int64_t kAhead = 4096;

// Where a pass over n elements that reads two streams (the halves of the
// range, a step of `step` elements of each in turn) starts its second one:
// half the range rounded up to whole steps (n itself, no second stream, for
// n of at most one step). On an Intel Xeon (AVX-512, one core) two streams
// read a 500 MB list 10-30% faster than one: the hardware keeps more lines in
// flight from two places in memory.
inline int64_t stream_split(int64_t n, int64_t step) {
  const int64_t half = (n + 1) / 2;
  return std::min(n, (half + step - 1) / step * step);
}

// For blocks of kBlock elements covering [0, n), in two streams (the halves
// of the range, see stream_split): first update(begin, len) does the
// element-wise work of the op on a block of each (it may write the tensors;
// a plain `omp simd` loop), then the blocks' values value(i), read back while
// still in L1, are reduced, each stream in its own lanes.
//
// Speed: the reduction keeps kLanes independent accumulators per statistic
// (two SIMD registers each), so the add/FMA latency chains overlap and a pass
// runs at memory speed. `omp simd` (with -fopenmp-simd: a vectorization hint,
// no OpenMP runtime) vectorizes the loops.
// Accuracy: each block's lanes are folded in a fixed order into double
// accumulators: float32 SIMD speed with nearly float64 accuracy. A block
// whose float32 sums left float32's range is summed again in float64.
// Determinism: the summation order is fixed by this source, whatever the ISA
// or thread count.
template <typename A, bool kSums, bool kMax, bool kNnz, typename U, typename V>
inline Partial sweep(int64_t n, U&& update, V&& value) {
  constexpr int kLanes = 64 / sizeof(A);
  struct Lanes {  // one stream's accumulators
    A s1[kLanes] = {}, s2[kLanes] = {}, m[kLanes] = {};
    int32_t c[kLanes] = {};
  };
  Partial p = zero_partial();
  A mx = A(0);
  auto lane = [&](Lanes& a, int l, int64_t k) {
    const A v = value(k);
    const A av = std::fabs(v);
    if (kSums) { a.s1[l] += av; a.s2[l] += v * v; }
    if (kMax) a.m[l] = av > a.m[l] ? av : a.m[l];
    if (kNnz) a.c[l] += (v != A(0)) ? 1 : 0;
  };
  auto fold = [&](const Lanes& a, int64_t begin, int len) {  // one stream's block into p
    A t1 = A(0), t2 = A(0);
    for (int l = 0; l < kLanes; ++l) {
      t1 += a.s1[l];
      t2 += a.s2[l];
      mx = a.m[l] > mx ? a.m[l] : mx;
      p.nnz += a.c[l];
    }
    if (kSums && sizeof(A) < sizeof(double) && out_of_float_range(t1, t2)) {
      double d1 = 0, d2 = 0;  // rare: this block again, in float64 (the spec)
      for (int k = 0; k < len; ++k) {
        const double v = value.exact(begin + k);
        d1 += std::fabs(v);
        d2 += v * v;
      }
      p.s1 += d1;
      p.s2 += d2;
    } else {
      p.s1 += double(t1);
      p.s2 += double(t2);
    }
  };
  // Two streams (stream_split): block b of the first half, then block b of
  // the second, their lines read in lockstep.
  const int64_t half = stream_split(n, kBlock);
  for (int64_t i = 0; i < half; i += kBlock) {
    const int len0 = int(std::min(kBlock, half - i));
    const int64_t i1 = half + i;
    const int len1 = i1 < n ? int(std::min(kBlock, n - i1)) : 0;  // <= len0
    update(i, len0);
    if (len1 > 0) update(i1, len1);
    Lanes a0, a1;
    int j = 0;
    for (; j + kLanes <= len1; j += kLanes) {
      value.prefetch(i + j + kAhead);  // one cache line per kLanes elements and stream
      value.prefetch(i1 + j + kAhead);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lane(a0, l, i + j + l);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lane(a1, l, i1 + j + l);
    }
    for (int k = j, l = 0; k < len1; ++k, ++l) lane(a1, l, i1 + k);  // the second stream's tail
    for (; j + kLanes <= len0; j += kLanes) {
      value.prefetch(i + j + kAhead);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lane(a0, l, i + j + l);
    }
    for (int l = 0; j < len0; ++j, ++l) lane(a0, l, i + j);  // tail
    fold(a0, i, len0);
    if (len1 > 0) fold(a1, i1, len1);
  }
  p.mx = double(mx);
  return p;
}

// add_penalty_grad's pass without a reference, in one sweep over each block:
// g += grad_term(w), and the sums of |w| and w^2 in sweep's lanes, order and
// fold (the same bits as sweep<A, true, false, false> over w after the update).
template <typename A, typename T>
inline Partial grad_sweep(int64_t n, const T* x, T* g, A c1, A c2) {
  constexpr int kLanes = 64 / sizeof(A);
  Partial p = zero_partial();
  for (int64_t i = 0; i < n; i += kBlock) {
    const int len = int(std::min(kBlock, n - i));
    const T* __restrict xs = x + i;
    T* __restrict gs = g + i;
    A s1[kLanes] = {}, s2[kLanes] = {};
    int j = 0;
    for (; j + kLanes <= len; j += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const A v = load<A>(xs[j + l]);
        gs[j + l] = store<T>(load<A>(gs[j + l]) + grad_term(v, c1, c2));
        s1[l] += std::fabs(v);
        s2[l] += v * v;
      }
    }
    for (int l = 0; j < len; ++j, ++l) {  // tail
      const A v = load<A>(xs[j]);
      gs[j] = store<T>(load<A>(gs[j]) + grad_term(v, c1, c2));
      s1[l] += std::fabs(v);
      s2[l] += v * v;
    }
    A t1 = A(0), t2 = A(0);
    for (int l = 0; l < kLanes; ++l) {
      t1 += s1[l];
      t2 += s2[l];
    }
    if (sizeof(A) < sizeof(double) && out_of_float_range(t1, t2)) {
      double d1 = 0, d2 = 0;  // rare: this block again, in float64 (the spec)
      for (int k = 0; k < len; ++k) {
        const double v = double(load<A>(xs[k]));
        d1 += std::fabs(v);
        d2 += v * v;
      }
      p.s1 += d1;
      p.s2 += d2;
    } else {
      p.s1 += double(t1);
      p.s2 += double(t2);
    }
  }
  return p;
}

// Asks for the cache line holding element i of p. A prefetch never faults, and
// the address is formed as an integer, so i may lie past the end of p.
template <typename T>
inline void prefetch_at(const T* p, int64_t i) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(i) * sizeof(T)));
}

// value() reading x in the compute type A; prefetch(i) asks for element i.
template <typename A, typename T>
struct Loader {
  const T* x;
  A operator()(int64_t i) const { return load<A>(x[i]); }
  double exact(int64_t i) const { return double(load<A>(x[i])); }  // the value in float64 (the spec's)
  void prefetch(int64_t i) const { prefetch_at(x, i); }
};
template <typename A, typename T>
inline Loader<A, T> loader(const T* x) { return Loader<A, T>{x}; }

// value() reading d = x - r (toward a reference) in the compute type A; exact(), in float64
// (where d leaves A's range, as the spec computes it).
template <typename A, typename T>
struct DiffLoader {
  const T* x;
  const T* r;
  A operator()(int64_t i) const { return load<A>(x[i]) - load<A>(r[i]); }
  double exact(int64_t i) const { return double(load<A>(x[i])) - double(load<A>(r[i])); }
  void prefetch(int64_t i) const { prefetch_at(x, i), prefetch_at(r, i); }
};

// value() that is 1 where x != r and 0 where x == r: counts what a prox
// toward r left different from r.
template <typename A, typename T>
struct NeLoader {
  const T* x;
  const T* r;
  A operator()(int64_t i) const { return load<A>(x[i]) != load<A>(r[i]) ? A(1) : A(0); }
  double exact(int64_t i) const { return double((*this)(i)); }
  void prefetch(int64_t i) const { prefetch_at(x, i), prefetch_at(r, i); }
};

// prox_'s pass without a reference: x = prox(x) in place, returning the
// count of nonzeros stored. It runs in steps of kProxStep elements, each
// first asking for its cache lines kAhead elements on, so that the
// prefetches, the threshold and the count overlap the memory stream. (A whole
// block's prefetches issued at once, before the block, stalled on the
// line-fill buffers: about 25% slower on one core.) The steps alternate
// between the two halves of x (two streams: a core keeps more lines in
// flight from two places in memory than from one; see kStreams). Each
// element's value depends on it alone, and the count is an integer, so the
// result does not depend on the order.
constexpr int kProxStep = 256;
template <typename T, typename A>
inline int32_t prox_step(T* __restrict xs, int len, const ProxParams<A>& pp) {
  for (int k = 0; k < len; k += int(64 / sizeof(T))) prefetch_at(xs, kAhead + k);
  int32_t nz = 0;
#pragma omp simd reduction(+ : nz)
  for (int k = 0; k < len; ++k) {
    const T y = store<T>(prox_value(load<A>(xs[k]), pp));
    put(xs[k], y);
    nz += load<A>(y) != A(0) ? 1 : 0;
  }
  return nz;
}

template <typename T, typename A>
inline int64_t prox_count(int64_t n, T* __restrict x, const ProxParams<A>& pp) {
  const int64_t half = stream_split(n, kProxStep);
  int64_t nnz = 0;
  for (int64_t i = 0; i < half; i += kProxStep) {
    nnz += prox_step(x + i, int(std::min(int64_t(kProxStep), half - i)), pp);
    if (half + i < n) nnz += prox_step(x + half + i, int(std::min(int64_t(kProxStep), n - half - i)), pp);
  }
  return nnz;
}

// update() of the read-only ops.
inline void no_update(int64_t, int) {}

// Calls f(T*) with the data pointer cast to the storage type of `code`.
template <typename F>
inline auto with_dtype(int code, void* p, F&& f) {
  switch (code) {
    case kFloat64: return f(static_cast<double*>(p));
    case kFloat16: return f(static_cast<half_t*>(p));
    case kBFloat16: return f(static_cast<bf16_t*>(p));
    default: return f(static_cast<float*>(p));
  }
}

struct Item { int64_t tensor, begin, end; };

inline std::vector<Item> plan(const TensorList& w) {
  std::vector<Item> items;
  for (int64_t t = 0; t < w.size(); ++t)
    for (int64_t b = 0; b < w.numels[t]; b += kCpuChunk)
      items.push_back({t, b, std::min(b + kCpuChunk, w.numels[t])});
  return items;
}

// Bytes below which a call runs inline on the calling thread, with no pool
// hand-off. A job this small takes a few hundred microseconds on one core;
// waking a worker costs tens of microseconds, and on a machine whose other
// cores are busy (e.g. torch's OpenMP threads still spinning after a torch op)
// the woken worker competes with the caller for a core, which costs far more.
// PYREG_CPU_INLINE_BYTES overrides it (read once; for measurements).
inline int64_t inline_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYREG_CPU_INLINE_BYTES");
    return e != nullptr ? int64_t(std::strtoll(e, nullptr, 10)) : kCpuInlineBytes;
  }();
  return v;
}

// Threads for a job over `w`: 1 (inline) for a small job, else nthreads.
// `arrays`: how many arrays like w the job reads or writes (the optimizer
// step: param, grad and state). Results never depend on it (see parallel_for).
inline int threads_for(const TensorList& w, int nthreads, int arrays = 1) {
  int64_t bytes = 0;
  for (int64_t t = 0; t < w.size(); ++t) bytes += w.numels[t] * dtype_size(w.dtypes[t]);
  return bytes * arrays < inline_bytes() ? 1 : nthreads;
}

// Runs body(item) -> Partial on every item; returns the per-tensor folds.
template <typename Body>
std::vector<Partial> run(const TensorList& w, int nthreads, Body&& body) {
  const std::vector<Item> items = plan(w);
  std::vector<Partial> parts(items.size());
  parallel_for(int64_t(items.size()), threads_for(w, nthreads),
               [&](int64_t k) { parts[k] = body(items[k]); });
  std::vector<Partial> out(w.size(), zero_partial());
  for (size_t k = 0; k < items.size(); ++k)  // chunk order: deterministic
    combine(out[items[k].tensor], parts[k]);
  return out;
}

inline double penalty_of(const std::vector<Partial>& s, Coef l1, Coef l2) {
  double v = 0;
  for (size_t i = 0; i < s.size(); ++i) v += coef_at(l1, i) * s[i].s1 + coef_at(l2, i) * s[i].s2;
  return v;
}

// The ref of an item's tensor at the item's start (refs may be null: no ref).
template <typename T>
inline const T* ref_of(const void* const* refs, const Item& it) {
  return refs != nullptr ? static_cast<const T*>(refs[it.tensor]) + it.begin : nullptr;
}

}  // namespace
}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
