// group.cpp: pyreg's group ops on the CPU (group_norms, group_prox, max_norm,
// group_penalty, add_group_penalty_grad; csrc/common/kernels_api.h).
#include "sweep.h"

namespace pyreg::cpu {
namespace PYREG_ISA_NS {
namespace {

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
  double exact(int64_t i) const { return double((*this)(i)); }
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
    return kOp == kGProx ? soft_params<A>(coef_at(a.c.l1, t), coef_at(a.c.lr, t)) : soft_params<A>(0.0, 0.0);
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
        } else if constexpr (kOp == kGMaxNorm) {
          // Only the groups it scales are written: one inside the ball (factor
          // 1) keeps its bits without a store.
          if (step == 0) {
            const double f0 = fs[0];
            if (f0 == 1.0) return;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) xs[i] = group_scaled<T>(group_value<kOp, T, A>(xs[i], soft), f0);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i)
              if (fs[i] != 1.0) xs[i] = group_scaled<T>(group_value<kOp, T, A>(xs[i], soft), fs[i]);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) xs[i] = group_scaled<T>(group_value<kOp, T, A>(xs[i], soft), fs[i * step]);
        }
      };
      const int64_t width = g.sub == 1 ? g.inner : u.ncols;  // of each group's run
      if constexpr (kOp == kGMaxNorm) {  // a tile with no group to scale: nothing to do
        bool any = false;
        for (int64_t j = 0; j < u.ng && !any; ++j) any = f[j] != 1.0;
        if (!any) return;
      }
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

}  // namespace

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

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
