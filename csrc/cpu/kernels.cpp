// kernels.cpp: pyreg's fused CPU kernels, exported as the table kCpu (see
// csrc/common/kernels_api.h for the contracts).
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
#include "../common/kernels_api.h"

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

// The name of the table this build exports: kCpu, or one variant's table
// (csrc/cpu/isa/) that csrc/cpu/dispatch.cpp chooses from at load time.
#ifndef PYREG_CPU_TABLE
#define PYREG_CPU_TABLE kCpu
#endif

namespace pyreg::cpu {
namespace {

constexpr int64_t kBlock = 2048;
// Default of inline_bytes(): jobs under 4 MB of tensor data run inline.
constexpr int64_t kCpuInlineBytes = int64_t(4) << 20;
// Software prefetch distance, in elements. With the hardware prefetcher alone
// the reductions and prox_ stayed ~10% further from a.sum() / a.mul_(c) on the
// development CPU (AMD EPYC, AVX2); add_penalty_grad_ (two streams) did not
// gain, so it does not prefetch.
constexpr int64_t kAhead = 4096;

// For consecutive blocks of kBlock elements covering [0, n): first
// update(begin, len) does the element-wise work of the op on the block (it may
// write the tensors; a plain `omp simd` loop), then the block's values
// value(i), read back while still in L1, are reduced.
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
  Partial p = zero_partial();
  A mx = A(0);
  for (int64_t i = 0; i < n; i += kBlock) {
    const int len = int(std::min(kBlock, n - i));
    update(i, len);
    A s1[kLanes] = {}, s2[kLanes] = {}, m[kLanes] = {};
    int32_t c[kLanes] = {};
    auto lane = [&](int l, int64_t k) {
      const A v = value(k);
      const A a = std::fabs(v);
      if (kSums) { s1[l] += a; s2[l] += v * v; }
      if (kMax) m[l] = a > m[l] ? a : m[l];
      if (kNnz) c[l] += (v != A(0)) ? 1 : 0;
    };
    int j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      value.prefetch(i + j + kAhead);  // one cache line per kLanes elements
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lane(l, i + j + l);
    }
    for (int l = 0; j < len; ++j, ++l) lane(l, i + j);  // tail
    A t1 = A(0), t2 = A(0);
    for (int l = 0; l < kLanes; ++l) {
      t1 += s1[l];
      t2 += s2[l];
      mx = m[l] > mx ? m[l] : mx;
      p.nnz += c[l];
    }
    if (kSums && sizeof(A) < sizeof(double) && out_of_float_range(t1, t2)) {
      double d1 = 0, d2 = 0;  // rare: this block again, in float64 (the spec)
      for (int k = 0; k < len; ++k) {
        const double v = double(value(i + k));
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
  void prefetch(int64_t i) const { prefetch_at(x, i); }
};
template <typename A, typename T>
inline Loader<A, T> loader(const T* x) { return Loader<A, T>{x}; }

// value() reading d = x - r (toward a reference) in the compute type A.
template <typename A, typename T>
struct DiffLoader {
  const T* x;
  const T* r;
  A operator()(int64_t i) const { return load<A>(x[i]) - load<A>(r[i]); }
  void prefetch(int64_t i) const { prefetch_at(x, i), prefetch_at(r, i); }
};

// value() that is 1 where x != r and 0 where x == r: counts what a prox
// toward r left different from r.
template <typename A, typename T>
struct NeLoader {
  const T* x;
  const T* r;
  A operator()(int64_t i) const { return load<A>(x[i]) != load<A>(r[i]) ? A(1) : A(0); }
  void prefetch(int64_t i) const { prefetch_at(x, i), prefetch_at(r, i); }
};

// Asks for the cache lines of elements [kAhead, kAhead + len) of p: the block
// after next, while this one is computed.
template <typename T>
inline void prefetch_ahead(const T* p, int len) {
  for (int k = 0; k < len; k += int(64 / sizeof(T))) prefetch_at(p, kAhead + k);
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

std::vector<Item> plan(const TensorList& w) {
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
int64_t inline_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYREG_CPU_INLINE_BYTES");
    return e != nullptr ? int64_t(std::strtoll(e, nullptr, 10)) : kCpuInlineBytes;
  }();
  return v;
}

// Threads for a job over `w`: 1 (inline) for a small job, else nthreads.
// `arrays`: how many arrays like w the job reads or writes (the optimizer
// step: param, grad and state). Results never depend on it (see parallel_for).
int threads_for(const TensorList& w, int nthreads, int arrays = 1) {
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

double penalty_of(const std::vector<Partial>& s, Coef l1, Coef l2) {
  double v = 0;
  for (size_t i = 0; i < s.size(); ++i) v += coef_at(l1, i) * s[i].s1 + coef_at(l2, i) * s[i].s2;
  return v;
}

// The ref of an item's tensor at the item's start (refs may be null: no ref).
template <typename T>
inline const T* ref_of(const void* const* refs, const Item& it) {
  return refs != nullptr ? static_cast<const T*>(refs[it.tensor]) + it.begin : nullptr;
}

void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                  int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      return sweep<A, true, true, true>(it.end - it.begin, no_update, loader<A>(x));
    });
  });
  for (int64_t i = 0; i < w.size(); ++i) {
    write_out(l1, out_dtype, i, s[i].s1);
    write_out(l2, out_dtype, i, std::sqrt(s[i].s2));
    write_out(linf, out_dtype, i, finish_linf(s[i]));
    nnz[i] = s[i].nnz;
  }
}

void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out,
             int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it))
        return sweep<A, true, false, false>(n, no_update, DiffLoader<A, T>{x, r});
      return sweep<A, true, false, false>(n, no_update, loader<A>(x));
    });
  });
  write_out(out, out_dtype, 0, penalty_of(s, l1, l2));
}

void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1,
                      Coef l2, void* out, int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      T* g = static_cast<T*>(grads[it.tensor]) + it.begin;
      const A c1 = A(coef_at(l1, it.tensor));
      const A c2 = A(2.0 * coef_at(l2, it.tensor));
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it)) {
        auto update = [=](int64_t b, int len) {
          const T* __restrict xs = x + b;
          const T* __restrict rs = r + b;
          T* __restrict gs = g + b;
#pragma omp simd
          for (int k = 0; k < len; ++k)
            gs[k] = store<T>(load<A>(gs[k]) + grad_term(A(load<A>(xs[k]) - load<A>(rs[k])), c1, c2));
        };
        return sweep<A, true, false, false>(n, update, DiffLoader<A, T>{x, r});
      }
      return grad_sweep(n, x, g, c1, c2);
    });
  });
  write_out(out, out_dtype, 0, penalty_of(s, l1, l2));
}

void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      T* x = p + it.begin;
      using A = opmath_t<T>;
      const ProxParams<A> pp =
          prox_params<A>(coef_at(l1, it.tensor), coef_at(l2, it.tensor), coef_at(lr, it.tensor));
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it)) {
        auto update = [=](int64_t b, int len) {
          T* __restrict xs = x + b;
          const T* __restrict rs = r + b;
#pragma omp simd
          for (int k = 0; k < len; ++k) xs[k] = prox_toward<T>(load<A>(xs[k]), load<A>(rs[k]), pp);
        };
        // Counts the elements left different from the reference.
        return sweep<A, false, false, true>(n, update, NeLoader<A, T>{x, r});
      }
      // One pass: each block's prox, counting the nonzeros of what is stored
      // as it is stored (an exact count: no reduction order to keep).
      Partial part = zero_partial();
      for (int64_t b = 0; b < n; b += kBlock) {
        const int len = int(std::min(kBlock, n - b));
        T* __restrict xs = x + b;
        prefetch_ahead(xs, len);
        int32_t nz = 0;
#pragma omp simd reduction(+ : nz)
        for (int k = 0; k < len; ++k) {
          const T y = store<T>(prox_value(load<A>(xs[k]), pp));
          xs[k] = y;
          nz += load<A>(y) != A(0) ? 1 : 0;
        }
        part.nnz += nz;
      }
      return part;
    });
  });
  for (int64_t i = 0; i < w.size(); ++i) nnz[i] = s[i].nnz;
}

// ---------------------------------------------------------------------------
// Group ops (csrc/common/group_plan.h): pass 1 sums each group's squares per
// tile, a fold per group gives its norm and factor, pass 2 scales.
// ---------------------------------------------------------------------------
struct GroupArgs {
  GroupCoefs c;                            // the ones an op uses
  void* const* grads;                      // kGGrad
  void* norms;                             // kGNorms (out_dtype)
  int64_t* counts;                         // kGProx: nonzero groups; kGMaxNorm: clipped groups
  void* value;                             // kGPenalty, kGGrad (out_dtype)
  int out_dtype;
};

struct GroupItem { int64_t tensor, tile; };

constexpr int64_t kGroupWaveBytes = int64_t(8) << 20;  // a wave of tensors for the group ops
constexpr int64_t kCpuNarrowTile = int64_t(1) << 17;   // elements of a tile of narrow groups
constexpr int kShortLanes = 16;  // lanes for the runs of wide groups shorter than a block

// value() of sweep over a wide group's run: group_value of each element.
template <int kOp, typename T, typename A>
struct GroupLoader {
  const T* x;
  ProxParams<A> soft;
  A operator()(int64_t i) const { return group_value<kOp, T, A>(x[i], soft); }
  void prefetch(int64_t i) const { prefetch_at(x, i); }
};

template <int kOp>
void group_run(const TensorList& w, const GroupList& gl, const GroupArgs& a, int nthreads) {
  constexpr bool kScales = kOp == kGProx || kOp == kGMaxNorm || kOp == kGGrad;  // has pass 2
  const int64_t n = w.size();
  std::vector<GroupTiling> til(n);
  std::vector<int64_t> poff(n + 1, 0), goff(n + 1, 0);  // partial and group offsets
  for (int64_t t = 0; t < n; ++t) {
    til[t] = group_tiling(gl.outer[t], gl.groups[t], gl.inner[t], kCpuNarrowTile);
    poff[t + 1] = poff[t] + til[t].partials();
    goff[t + 1] = goff[t] + gl.groups[t];
  }
  const int threads = threads_for(w, nthreads);
  // The element soft-threshold of group_prox (scale 1: the L2 scale is in the factor).
  auto soft_of = [&](int64_t t, auto zero) {
    using A = decltype(zero);
    return kOp == kGProx ? prox_params<A>(coef_at(a.c.l1, t), 0.0, coef_at(a.c.lr, t))
                         : prox_params<A>(0.0, 0.0, 0.0);
  };
  auto factor_of = [&](int64_t t, double nrm) { return group_factor<kOp>(a.c, t, nrm); };
  std::vector<double> parts(poff[n]);
  auto parts_at = [&](int64_t t, int64_t rt, int64_t j, int64_t s) {
    return parts[poff[t] + partial_index(til[t], rt, j, s)];
  };
  auto norm_of = [&](int64_t t, int64_t j) {  // the fold of group j's partials, in order
    const GroupTiling& g = til[t];
    double sq = 0.0;
    for (int64_t rt = 0; rt < g.row_tiles; ++rt)
      for (int64_t s = 0; s < g.sub; ++s) sq += parts_at(t, rt, j, s);
    return std::sqrt(sq);
  };
  std::vector<double> factor(goff[n]);

  // Pass 1: partial sums of squares.
  auto sums = [&](const GroupItem& item) {
    const GroupTiling& g = til[item.tensor];
    const GroupTile u = group_tile(g, item.tile);
    with_dtype(w.dtypes[item.tensor], w.ptrs[item.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const ProxParams<A> soft = soft_of(item.tensor, A(0));
      const int64_t L = g.groups * g.inner;
      double* out = parts.data() + poff[item.tensor];
      if (g.wide) {
        // Each group's contiguous runs (one per row), row by row, each summed
        // as the element-wise ops sum (sweep: SIMD lanes in the compute type,
        // folded into float64 per block, a block again in float64 when it
        // leaves float32's range).
        // Runs shorter than a sweep block: kShortLanes lanes, without
        // sweep's fixed cost per call.
        const int64_t width = g.sub == 1 ? g.inner : u.ncols;
        for (int64_t j = 0; j < u.ng; ++j) {
          double sum = 0.0;
          for (int64_t r = 0; r < u.nrows; ++r) {
            const T* run = p + (u.row0 + r) * L + u.col0 + j * g.inner;
            if (width >= kBlock) {
              sum += sweep<A, true, false, false>(width, no_update, GroupLoader<kOp, T, A>{run, soft}).s2;
              continue;
            }
            // SIMD lanes in the compute type, as sweep sums a block; the
            // run again in float64 when its sums leave float32's range.
            A l1[kShortLanes] = {}, l2[kShortLanes] = {};
            int64_t i = 0;
            for (; i + kShortLanes <= width; i += kShortLanes) {
#pragma omp simd
              for (int l = 0; l < kShortLanes; ++l) {
                const A v = group_value<kOp, T, A>(run[i + l], soft);
                l1[l] += std::fabs(v);
                l2[l] += v * v;
              }
            }
            for (int l = 0; i < width; ++i, ++l) {
              const A v = group_value<kOp, T, A>(run[i], soft);
              l1[l] += std::fabs(v);
              l2[l] += v * v;
            }
            A t1 = A(0), t2 = A(0);
            for (int l = 0; l < kShortLanes; ++l) {
              t1 += l1[l];
              t2 += l2[l];
            }
            if (sizeof(A) < sizeof(double) && out_of_float_range(t1, t2)) {
              double d2 = 0.0;
              for (int64_t k = 0; k < width; ++k) {
                const double v = double(group_value<kOp, T, A>(run[k], soft));
                d2 += v * v;
              }
              sum += d2;
            } else {
              sum += double(t2);
            }
          }
          out[partial_index(g, u.rt, u.g0 + j, u.s)] = sum;
        }
        return;
      }
      // Narrow groups: each column's squares over the rows, four rows at a
      // time (fewer passes over col), then each group's columns.
      double col[kGroupTileCols];
      for (int64_t c = 0; c < u.ncols; ++c) col[c] = 0.0;
      auto sq = [&](const T* q, int64_t c) {
        const double v = double(group_value<kOp, T, A>(q[c], soft));
        return v * v;
      };
      int64_t r = 0;
      for (; r + 4 <= u.nrows; r += 4) {
        const T* __restrict r0 = p + (u.row0 + r) * L + u.col0;
        const T* __restrict r1 = r0 + L;
        const T* __restrict r2 = r1 + L;
        const T* __restrict r3 = r2 + L;
#pragma omp simd
        for (int64_t c = 0; c < u.ncols; ++c) col[c] += (sq(r0, c) + sq(r1, c)) + (sq(r2, c) + sq(r3, c));
      }
      for (; r < u.nrows; ++r) {
        const T* __restrict row = p + (u.row0 + r) * L + u.col0;
#pragma omp simd
        for (int64_t c = 0; c < u.ncols; ++c) col[c] += sq(row, c);
      }
      double* __restrict dst = out + partial_index(g, u.rt, u.g0, 0);  // narrow: sub == 1
      if (g.inner == 1) {
        for (int64_t j = 0; j < u.ng; ++j) dst[j] = col[j];
      } else {
        for (int64_t j = 0; j < u.ng; ++j) {
          double sum = 0.0;
          for (int64_t i = 0; i < g.inner; ++i) sum += col[j * g.inner + i];
          dst[j] = sum;
        }
      }
    });
  };

  // Pass 2: every element times its group's factor.
  auto scale = [&](const GroupItem& item) {
    const GroupTiling& g = til[item.tensor];
    const GroupTile u = group_tile(g, item.tile);
    const double* f = factor.data() + goff[item.tensor] + u.g0;
    with_dtype(w.dtypes[item.tensor], w.ptrs[item.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const ProxParams<A> soft = soft_of(item.tensor, A(0));
      T* const gp = kOp == kGGrad ? static_cast<T*>(a.grads[item.tensor]) : nullptr;
      const int64_t L = g.groups * g.inner;
      // A run of n elements from idx, factors fs[i] (step 1) or fs[0] (step 0).
      auto run = [&](int64_t idx, int64_t n, const double* __restrict fs, int64_t step) {
        T* __restrict xs = p + idx;
        if constexpr (kOp == kGGrad) {
          T* __restrict gs = gp + idx;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) gs[i] = group_grad<T>(load<A>(gs[i]), load<A>(xs[i]), fs[i * step]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) xs[i] = group_scaled<T>(group_value<kOp, T, A>(xs[i], soft), fs[i * step]);
        }
      };
      const int64_t width = g.sub == 1 ? g.inner : u.ncols;  // of each group's run
      for (int64_t r = 0; r < u.nrows; ++r) {
        const int64_t base = (u.row0 + r) * L + u.col0;
        if (g.inner == 1) {
          run(base, u.ncols, f, 1);
        } else {
          for (int64_t j = 0; j < u.ng; ++j) run(base + j * g.inner, width, f + j, 0);
        }
      }
    });
  };

  // A tile that holds its groups whole (one row tile, no sub-tiles) runs both
  // passes at once, while its data is in cache: the same partials, factors
  // and results as two passes.
  auto whole = [&](int64_t t) { return kScales && til[t].row_tiles == 1 && til[t].sub == 1; };
  auto fused = [&](const GroupItem& item) {
    sums(item);
    const GroupTile u = group_tile(til[item.tensor], item.tile);
    for (int64_t j = u.g0; j < u.g0 + u.ng; ++j)
      factor[goff[item.tensor] + j] = factor_of(item.tensor, norm_of(item.tensor, j));
    scale(item);
  };

  // Waves of tensors of about kGroupWaveBytes (a larger tensor alone), so that
  // pass 2 finds a wave's weights still in the last-level cache.
  double value = 0.0;
  std::vector<GroupItem> items, rest;
  std::vector<double> sqs;
  for (int64_t t0 = 0; t0 < n;) {
    int64_t t1 = t0, bytes = 0;
    do {
      bytes += w.numels[t1] * dtype_size(w.dtypes[t1]);
      ++t1;
    } while (t1 < n && bytes + w.numels[t1] * dtype_size(w.dtypes[t1]) <= kGroupWaveBytes);
    items.clear();
    rest.clear();
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < til[t].tiles(); ++k) {
        items.push_back({t, k});
        if (kScales && !whole(t)) rest.push_back({t, k});
      }
    parallel_for(int64_t(items.size()), threads, [&](int64_t k) {
      if (whole(items[k].tensor)) fused(items[k]);
      else sums(items[k]);
    });
    // Per group: norm and factor; per tensor: counts and penalty terms.
    for (int64_t t = t0; t < t1; ++t) {
      int64_t count = 0;
      double norm_sum = 0.0;
      const GroupTiling& g = til[t];
      // Each group's partials in norm_of's order (row tile, then sub-tile),
      // walked row tile by row tile: contiguous reads.
      sqs.assign(size_t(g.groups), 0.0);
      double* __restrict acc = sqs.data();
      for (int64_t rt = 0; rt < g.row_tiles; ++rt) {
        const double* __restrict row = parts.data() + poff[t] + partial_index(g, rt, 0, 0);
        if (g.sub == 1) {
#pragma omp simd
          for (int64_t j = 0; j < g.groups; ++j) acc[j] += row[j];
        } else {
          for (int64_t j = 0; j < g.groups; ++j)
            for (int64_t s = 0; s < g.sub; ++s) acc[j] += row[j * g.sub + s];
        }
      }
      for (int64_t j = 0; j < g.groups; ++j) {
        const double nrm = std::sqrt(sqs[j]);
        const double f = factor_of(t, nrm);
        if constexpr (kOp == kGNorms) write_out(a.norms, a.out_dtype, goff[t] + j, nrm);
        if constexpr (kOp == kGProx) count += f != 0.0 ? 1 : 0;
        if constexpr (kOp == kGMaxNorm) count += nrm > coef_at(a.c.max_value, t) ? 1 : 0;
        norm_sum += nrm;
        factor[goff[t] + j] = f;
      }
      if (a.counts != nullptr) a.counts[t] = count;
      if constexpr (kOp == kGPenalty || kOp == kGGrad) value += coef_at(a.c.group_l1, t) * norm_sum;
    }
    if (!rest.empty())
      parallel_for(int64_t(rest.size()), threads, [&](int64_t k) { scale(rest[k]); });
    t0 = t1;
  }
  if constexpr (kOp == kGPenalty || kOp == kGGrad) write_out(a.value, a.out_dtype, 0, value);
}

GroupArgs no_group_args() {
  const Coef none{nullptr, 0.0};
  return GroupArgs{GroupCoefs{none, none, none, none, none}, nullptr, nullptr, nullptr, nullptr, kFloat64};
}

void group_norms(const TensorList& w, const GroupList& gl, void* norms, int out_dtype, const Launch& at) {
  GroupArgs a = no_group_args();
  a.norms = norms;
  a.out_dtype = out_dtype;
  group_run<kGNorms>(w, gl, a, at.nthreads);
}

void group_prox(const TensorList& w, const GroupList& gl, Coef l1, Coef group_l1, Coef l2, Coef lr,
                int64_t* nonzero, const Launch& at) {
  GroupArgs a = no_group_args();
  a.c.l1 = l1, a.c.group_l1 = group_l1, a.c.l2 = l2, a.c.lr = lr, a.counts = nonzero;
  group_run<kGProx>(w, gl, a, at.nthreads);
}

void max_norm(const TensorList& w, const GroupList& gl, Coef max_value, int64_t* clipped,
              const Launch& at) {
  GroupArgs a = no_group_args();
  a.c.max_value = max_value, a.counts = clipped;
  group_run<kGMaxNorm>(w, gl, a, at.nthreads);
}

void group_penalty(const TensorList& w, const GroupList& gl, Coef group_l1, void* out, int out_dtype,
                   const Launch& at) {
  GroupArgs a = no_group_args();
  a.c.group_l1 = group_l1, a.value = out, a.out_dtype = out_dtype;
  group_run<kGPenalty>(w, gl, a, at.nthreads);
}

void add_group_penalty_grad(const TensorList& w, const GroupList& gl, void* const* grads,
                            Coef group_l1, void* out, int out_dtype, const Launch& at) {
  GroupArgs a = no_group_args();
  a.c.group_l1 = group_l1, a.grads = grads, a.value = out, a.out_dtype = out_dtype;
  group_run<kGGrad>(w, gl, a, at.nthreads);
}

// ---- the fused optimizer step ----------------------------------------------
#include "optim_step.h"

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

}  // namespace
}  // namespace pyreg::cpu

namespace pyreg {

extern const Kernels PYREG_CPU_TABLE = {
    true,
    cpu::isa,
    [] { return 1; },
    [] { return std::string(); },
    [](int) { return std::string(); },
    [](int64_t, int64_t) { return int64_t(0); },
    cpu::weight_stats,
    cpu::penalty,
    cpu::add_penalty_grad,
    cpu::prox,
    [](const TensorList&, const GroupList&) { return int64_t(0); },
    cpu::group_norms,
    cpu::group_prox,
    cpu::max_norm,
    cpu::group_penalty,
    cpu::add_group_penalty_grad,
    cpu::optim_step,
};

}  // namespace pyreg
