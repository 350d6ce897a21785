// group.cu: pyreg's group ops on CUDA (group_norms, group_prox, max_norm,
// group_penalty, add_group_penalty_grad; csrc/common/group_plan.h). Per
// batch of tensors:
//   group_tile_kernel<1>: a block per tile sums each column's squares over the
//     tile's rows (a thread per column, kGroupCols columns per thread), then
//     each group's columns in shared memory (a thread per group when groups
//     are narrower than a warp, else a warp per group with a fixed shuffle
//     tree) into one float64 partial per (row tile, group, sub-tile);
//   group_finish_kernel: a thread per group (a warp per group when a group
//     has over kWarpFold partials) folds its partials in a fixed order into
//     its norm, then its factor, and a Partial for the per-tensor fold (norm
//     in s1, a count in nnz);
//   group_tile_kernel<2> (prox, max_norm, grad): each element times its
//     group's factor;
// then finish_kernel folds the per-group Partials per tensor (counts, or the
// penalty with the ticket), as for the element-wise ops.
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {

constexpr int kMaxGroupTensors = kParamBytes > 4096 ? 480 : 48;  // tensors per launch
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

static_assert(sizeof(GroupBatch) + sizeof(GroupCoefs) + sizeof(GroupWork) <= kParamBytes - kParamSlack,
              "group kernel arguments must fit in the kernel parameter space (launch.h)");

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}


// Wide groups go to teams of warps: min(gp, kWarps) teams of kWarps / teams
// warps each; a team takes the tile's groups in turn, its threads striding
// over each group's runs. Each warp leaves its own partial, so a wide group has
// team_warps(g) partials per (row tile, sub-tile): the tile partials of a
// tensor are g.partials() * team_warps(g).
PYREG_HD int64_t team_warps(const GroupTiling& g) {
  return g.wide ? kWarps / int(g.gp < kWarps ? g.gp : kWarps) : 1;
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
  const int warps = int(team_warps(g));  // 32-bit divisions: a GPU has no 64-bit divide
  m.warps = warps;
  m.n = kWarps / warps;
  if (m.n > g.gp) m.n = g.gp;
  const int warp = int(threadIdx.x >> 5);
  m.id = warp / warps;
  m.slot = warp % warps;
  m.q = m.slot * 32 + (threadIdx.x & 31);
  m.nq = m.warps * 32;
  return m;
}

// The second pass moves runs of kGroupVec<T> consecutive elements per access
// where the tile allows it (see group_tile): 4 float (16 bytes) or 4
// half/bfloat16 (8 bytes), 2 double (16 bytes).
template <typename T>
constexpr int kGroupVec = sizeof(T) == 8 ? 2 : 4;

// Wide groups: loads each thread has in flight in the loops over a group's
// run (one at a time left a warp waiting on every load: the loops' trip
// counts are only known at run time, so nvcc did not unroll them).
constexpr int kWideUnroll = 4;
static_assert(kGroupTileElems + kWideUnroll * kThreads < (int64_t(1) << 31),
              "a wide group's run (at most a tile) is indexed in 32 bits");

// Pass 2 of op kOp on U runs of W elements, at x + at + u * stride (and the
// grads at gr + ...), element e of each with factor f[e]: every run loaded
// before the first is updated. A run with every factor 1 is not stored by
// max_norm_ (it keeps its bits).
template <int kOp, int U, int W, typename T, typename A>
__device__ __forceinline__ void update_runs(T* x, T* gr, int64_t at, int64_t stride, const double (&f)[W],
                                            const ProxParams<A>& soft) {
  T v[U][W];
#pragma unroll
  for (int u = 0; u < U; ++u) load_run(v[u], x + at + u * stride, 0);
  if constexpr (kOp == kGGrad) {
    T gv[U][W];
#pragma unroll
    for (int u = 0; u < U; ++u) load_run(gv[u], gr + at + u * stride, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < W; ++e) gv[u][e] = group_grad<T>(load<A>(gv[u][e]), load<A>(v[u][e]), f[e]);
      store_run(gr + at + u * stride, 0, gv[u]);
    }
  } else if constexpr (kOp == kGMaxNorm) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      bool any = false;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        if (f[e] != 1.0) v[u][e] = group_scaled<T>(group_value<kOp, T, A>(v[u][e], soft), f[e]);
        any = any || f[e] != 1.0;
      }
      if (any) store_run(x + at + u * stride, 0, v[u]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < W; ++e) v[u][e] = group_scaled<T>(group_value<kOp, T, A>(v[u][e], soft), f[e]);
      store_run(x + at + u * stride, 0, v[u]);
    }
  }
}

template <int kOp, int W, typename T, typename A>
__device__ __forceinline__ void update_run(T* x, T* gr, int64_t at, const double (&f)[W],
                                           const ProxParams<A>& soft) {
  update_runs<kOp, 1, W, T, A>(x, gr, at, 0, f, soft);
}

// Pass 2 of op kOp on the U elements at x + at + u * stride of one group
// (factor fg; max_norm_'s callers skip a group whose factor is 1): all loaded
// before the first is updated.
template <int kOp, int U, typename T, typename A>
__device__ __forceinline__ void update_elems(T* x, T* gr, int64_t at, int64_t stride, double fg,
                                             const ProxParams<A>& soft) {
  T v[U];
#pragma unroll
  for (int u = 0; u < U; ++u) v[u] = x[at + u * stride];
  if constexpr (kOp == kGGrad) {
    T gv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) gv[u] = gr[at + u * stride];
#pragma unroll
    for (int u = 0; u < U; ++u) gr[at + u * stride] = group_grad<T>(load<A>(gv[u]), load<A>(v[u]), fg);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) x[at + u * stride] = group_scaled<T>(group_value<kOp, T, A>(v[u], soft), fg);
  }
}

// colsum: the kernel's shared buffer of kGroupTileCols doubles (declared once
// in the kernel: a GPU reserves every __shared__ declaration of every dtype's
// instance of this function, not just the one that runs).
// kRunsOk: whether the second pass may move runs (the second pass that a
// fused tile runs inside the first keeps single elements: fewer registers
// live across the factors' division).
template <int kPass, int kOp, typename T, bool kRunsOk = true>
__device__ __forceinline__ void group_tile(const GroupBatch& b, int k, const GroupTiling& g, const GroupTile& u,
                                           const GroupCoefs& c, const GroupWork& w, double* colsum) {
  using A = opmath_t<T>;
  const int t = b.t0 + k;
  const ProxParams<A> soft = kOp == kGProx ? soft_params<A>(coef_at(c.l1, t), coef_at(c.lr, t))
                                           : soft_params<A>(0.0, 0.0);
  T* x = static_cast<T*>(b.x[k]);
  const int64_t L = g.groups * g.inner;
  T* gr = kOp == kGGrad ? static_cast<T*>(b.g[k]) : nullptr;
  // Pass 2's update of element i with its group's factor fg.
  auto apply = [&](int64_t i, double fg) {
    if constexpr (kOp == kGGrad) {
      gr[i] = group_grad<T>(load<A>(gr[i]), load<A>(x[i]), fg);
    } else if constexpr (kOp == kGMaxNorm) {
      // Only the groups it scales are read and written: one inside the ball
      // (factor 1) keeps its bits without a store.
      if (fg != 1.0) x[i] = group_scaled<T>(group_value<kOp, T, A>(x[i], soft), fg);
    } else {
      x[i] = group_scaled<T>(group_value<kOp, T, A>(x[i], soft), fg);
    }
  };
  // The second pass moves runs of W elements when the tile's rows, and its
  // groups' runs (wide) or the tile's columns (narrow), start W-aligned
  // (tile-uniform). The first pass, which only reads, keeps single elements:
  // runs there made ptxas spill more around the fused tiles' factors.
  constexpr int W = kGroupVec<T>;
  const uintptr_t first0 = reinterpret_cast<uintptr_t>(x + u.row0 * L + u.col0) |
                           (kOp == kGGrad ? reinterpret_cast<uintptr_t>(gr + u.row0 * L + u.col0) : uintptr_t(0));
  const bool runs = kPass == 2 && kRunsOk && L % W == 0 && u.ncols % W == 0 && first0 % (W * sizeof(T)) == 0 &&
                    (!g.wide || (g.inner % W == 0 && (g.sub == 1 ? g.inner : u.ncols) % W == 0));
  if (g.wide) {  // tile-uniform
    const Team m = team_of(g);
    if (m.id >= m.n) return;  // an idle warp (no barrier below)
    const int64_t width = g.sub == 1 ? g.inner : u.ncols;  // of each group's run
    const int lane = threadIdx.x & 31;
    for (int64_t j = m.id; j < u.ng; j += m.n) {  // warp-uniform
      const int64_t first = u.col0 + j * g.inner;
      if constexpr (kPass == 1) {
        // The squares are added in the order of i (kWideUnroll loads ahead):
        // the bits do not depend on the unroll. A run is at most a tile
        // (kGroupTileElems) wide: 32-bit indices.
        const int nq = int(m.nq), wd = int(width);
        double sq = 0.0;
        for (int64_t r = 0; r < u.nrows; ++r) {
          const T* run = x + (u.row0 + r) * L + first;
          int i = int(m.q);
          for (; i + (kWideUnroll - 1) * nq < wd; i += kWideUnroll * nq) {
            T v[kWideUnroll];
#pragma unroll
            for (int e = 0; e < kWideUnroll; ++e) v[e] = run[i + e * nq];
#pragma unroll
            for (int e = 0; e < kWideUnroll; ++e) {
              const double d = double(group_value<kOp, T, A>(v[e], soft));
              sq += d * d;
            }
          }
          for (; i < wd; i += nq) {
            const double v = double(group_value<kOp, T, A>(run[i], soft));
            sq += v * v;
          }
        }
        sq = warp_sum(sq);
        if (lane == 0)
          w.tiles[b.poff[k] + partial_index(g, u.rt, u.g0 + j, u.s) * m.warps + m.slot] = sq;
      } else if (runs) {
        double f[W];
        for (int e = 0; e < W; ++e) f[e] = w.factor[b.goff[k] + u.g0 + j];
        if (kOp == kGMaxNorm && f[0] == 1.0) continue;  // inside the ball: no store
        const int nq = int(m.nq), nruns = int(width / W);  // 32-bit indices (as pass 1)
        for (int64_t r = 0; r < u.nrows; ++r) {
          const int64_t base = (u.row0 + r) * L + first;
          int i = int(m.q);
          if constexpr (kOp == kGProx)  // (max_norm_'s and the grad's spilled)
            for (; i + nq < nruns; i += 2 * nq) update_runs<kOp, 2, W, T, A>(x, gr, base + i * W, nq * W, f, soft);
          for (; i < nruns; i += nq) update_run<kOp, W, T, A>(x, gr, base + i * W, f, soft);
        }
      } else {
        const double fg = w.factor[b.goff[k] + u.g0 + j];
        if (kOp == kGMaxNorm && fg == 1.0) continue;  // inside the ball: no load, no store
        const int nq = int(m.nq), wd = int(width);
        for (int64_t r = 0; r < u.nrows; ++r) {
          const int64_t base = (u.row0 + r) * L + first;
          int i = int(m.q);
          constexpr int U = kOp == kGGrad ? 2 : kWideUnroll;  // (the grad: twice the loads)
          for (; i + (U - 1) * nq < wd; i += U * nq) update_elems<kOp, U, T, A>(x, gr, base + i, nq, fg, soft);
          for (; i < wd; i += nq) apply(base + i, fg);
        }
      }
    }
    return;
  }
  // Narrow groups: a thread per column; in the second pass, per run of W
  // columns when every row of the tile starts W-aligned (tile-uniform).
  constexpr int kRuns = kGroupCols / W;
  static_assert(kRuns * W == kGroupCols, "a thread's columns split into runs");
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
  } else if (runs) {
    double f[kRuns][W];
#pragma unroll
    for (int q = 0; q < kRuns; ++q) {
      const int64_t c0 = (int64_t(threadIdx.x) + q * kThreads) * W;
#pragma unroll
      for (int e = 0; e < W; ++e) f[q][e] = c0 < u.ncols ? w.factor[b.goff[k] + u.g0 + div32(c0 + e, g.inner)] : 1.0;
    }
    for (int64_t r = 0; r < u.nrows; ++r) {
      const int64_t base = (u.row0 + r) * L + u.col0;
#pragma unroll
      for (int q = 0; q < kRuns; ++q) {
        const int64_t c0 = (int64_t(threadIdx.x) + q * kThreads) * W;
        if (c0 < u.ncols) update_run<kOp, W, T, A>(x, gr, base + c0, f[q], soft);
      }
    }
  } else {
    double f[kGroupCols];
#pragma unroll
    for (int j = 0; j < kGroupCols; ++j) {
      const int64_t col = int64_t(threadIdx.x) + j * kThreads;
      f[j] = col < u.ncols ? w.factor[b.goff[k] + u.g0 + div32(col, g.inner)] : 0.0;
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

// Group j's sum of squares: the fold of its tile partials in a fixed order
// (row tile, sub-tile, team warp); its norm is the square root.
__device__ __forceinline__ double group_sq(const GroupBatch& b, int k, const GroupTiling& g,
                                           const GroupWork& w, int64_t j) {
  const int64_t tw = team_warps(g);
  double sq = 0.0;
  for (int64_t rt = 0; rt < g.row_tiles; ++rt)
    for (int64_t s = 0; s < g.sub; ++s)
      for (int64_t q = 0; q < tw; ++q) sq += w.tiles[b.poff[k] + partial_index(g, rt, j, s) * tw + q];
  return sq;
}

__device__ __forceinline__ double group_norm(const GroupBatch& b, int k, const GroupTiling& g,
                                             const GroupWork& w, int64_t j) {
  return sqrt(group_sq(b, k, g, w, j));
}

// The same sum by a warp (lane = this thread's lane; every lane calls it):
// lane l sums partials l, l + 32, ... in that order, then a fixed shuffle
// tree; the result is lane 0's. For groups with many partials (a tall
// tensor's columns: one per row tile), which one thread would fold with as
// many dependent loads.
__device__ __forceinline__ double group_sq_warp(const GroupBatch& b, int k, const GroupTiling& g,
                                                const GroupWork& w, int64_t j, int lane) {
  const int64_t tw = team_warps(g);
  const int64_t per_rt = g.sub * tw;
  const int64_t total = g.row_tiles * per_rt;
  double sq = 0.0;
  for (int64_t m = lane; m < total; m += 32) {
    const int64_t rt = div32(m, per_rt), r = m - rt * per_rt, s = div32(r, tw), q = r - s * tw;
    sq += w.tiles[b.poff[k] + partial_index(g, rt, j, s) * tw + q];
  }
  return warp_sum(sq);
}

// Partials per group from which group_finish_kernel folds with a warp per
// group instead of a thread.
constexpr int64_t kWarpFold = 16;

// True when a tile holds its groups whole (one row tile, no sub-tiles): pass
// 1 then also scales the tile, while it is in cache, and pass 2 skips it.
template <int kOp>
__device__ __forceinline__ bool fused_tiles(const GroupTiling& g) {
  return (kOp == kGProx || kOp == kGMaxNorm || kOp == kGGrad) && g.row_tiles == 1 && g.sub == 1;
}

// Pass kPass of tile u of tensor k, in its dtype.
template <int kPass, int kOp, bool kRunsOk = true>
__device__ __forceinline__ void group_tile_any(const GroupBatch& b, int k, const GroupTiling& g, const GroupTile& u,
                                               const GroupCoefs& c, const GroupWork& w, double* colsum) {
  switch (b.dtype[k]) {
    case kFloat64: group_tile<kPass, kOp, double, kRunsOk>(b, k, g, u, c, w, colsum); break;
    case kFloat16: group_tile<kPass, kOp, half_t, kRunsOk>(b, k, g, u, c, w, colsum); break;
    case kBFloat16: group_tile<kPass, kOp, bf16_t, kRunsOk>(b, k, g, u, c, w, colsum); break;
    default: group_tile<kPass, kOp, float, kRunsOk>(b, k, g, u, c, w, colsum); break;
  }
}

template <int kPass, int kOp>
__global__ void __launch_bounds__(kThreads)
    group_tile_kernel(PYREG_PARAM(GroupBatch) b, const GroupCoefs c, const GroupWork w) {
  const int64_t tile = int64_t(blockIdx.x);
  if (kPass == 1 && tile == 0) {
    // This batch's tensor -> group map, for finish_kernel.
    for (int k = int(threadIdx.x); k <= b.nt; k += kThreads) w.base.first[b.t0 + k] = b.goff[k];
    if (b.t0 == 0 && threadIdx.x == 0) *w.base.counter = 0u;
  }
  if (tile >= b.tstart[b.nt]) return;  // only for a batch without tiles (grid of 1)
  const int k = owner(b.tstart, b.nt, tile);  // tensors without tiles share the next one's start
  const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
  const GroupTile u = group_tile(g, tile - b.tstart[k]);
  const bool fused = fused_tiles<kOp>(g);
  if (kPass == 2 && fused) return;  // scaled in pass 1
  PYREG_SHARED(double[kPass == 1 ? kGroupTileCols : 1], colsum);
  group_tile_any<kPass, kOp>(b, k, g, u, c, w, colsum);
  if constexpr (kPass == 1) {
    if (fused) {  // block-uniform: the factors, then pass 2, while the tile is in cache
      __syncthreads();  // the tile's partials are written
      for (int64_t j = threadIdx.x; j < u.ng; j += kThreads)
        w.factor[b.goff[k] + u.g0 + j] = group_factor<kOp>(c, b.t0 + k, group_norm(b, k, g, w, u.g0 + j));
      __syncthreads();  // and its factors
      group_tile_any<2, kOp, false>(b, k, g, u, c, w, colsum);
    }
  }
}

template <int kOp, int kLanes>
__global__ void __launch_bounds__(kThreads)
    group_finish_kernel(PYREG_PARAM(GroupBatch) b, const GroupCoefs c, const GroupWork w) {
  // kLanes: threads per group, 1 or a warp (32; the host's choice for the batch).
  const int lane = int(threadIdx.x) % kLanes;
  const int64_t gi = b.goff[0] + int64_t(blockIdx.x) * (kThreads / kLanes) + threadIdx.x / kLanes;  // global group
  if (gi >= b.goff[b.nt]) return;  // warp-uniform when kLanes is 32
  const int k = owner(b.goff, b.nt, gi);
  const int t = b.t0 + k;
  const int64_t j = gi - b.goff[k];
  const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
  const double n = sqrt(kLanes == 1 ? group_sq(b, k, g, w, j) : group_sq_warp(b, k, g, w, j, lane));
  if (lane != 0) return;
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
    // A warp per group when some group of the batch has many partials.
    int lanes = 1;
    for (int k = 0; k < b.nt; ++k) {
      const GroupTiling g = group_tiling(b.outer[k], b.groups[k], b.inner[k]);
      if (g.row_tiles * g.sub * team_warps(g) > kWarpFold) lanes = 32;
    }
    const int64_t per_block = kThreads / lanes;
    const int64_t ng = b.goff[b.nt] - b.goff[0];
    const int64_t blocks = ng > 0 ? (ng + per_block - 1) / per_block : 1;
    if (blocks > kMaxGrid) fail("too many groups");
    auto* const group_factors = lanes == 1 ? &group_finish_kernel<kOp, 1> : &group_finish_kernel<kOp, 32>;
    PYREG_LAUNCH(group_factors, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
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

GroupCoefs no_group_coefs() {
  const Coef none{nullptr, 0.0};
  return GroupCoefs{none, none, none, none, none};
}

}  // namespace

std::vector<KernelRef> group_kernels() {
  return {
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGNorms>), "group_tile_kernel<1, norms>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGProx>), "group_tile_kernel<1, prox>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGMaxNorm>), "group_tile_kernel<1, max_norm>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGPenalty>), "group_tile_kernel<1, penalty>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<1, kGGrad>), "group_tile_kernel<1, grad>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGProx>), "group_tile_kernel<2, prox>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGMaxNorm>), "group_tile_kernel<2, max_norm>"},
      {reinterpret_cast<const void*>(&group_tile_kernel<2, kGGrad>), "group_tile_kernel<2, grad>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGNorms, 1>), "group_finish_kernel<norms>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGNorms, 32>), "group_finish_kernel<norms, warp>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGProx, 1>), "group_finish_kernel<prox>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGProx, 32>), "group_finish_kernel<prox, warp>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGMaxNorm, 1>), "group_finish_kernel<max_norm>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGMaxNorm, 32>), "group_finish_kernel<max_norm, warp>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGPenalty, 1>), "group_finish_kernel<penalty>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGPenalty, 32>), "group_finish_kernel<penalty, warp>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGGrad, 1>), "group_finish_kernel<grad>"},
      {reinterpret_cast<const void*>(&group_finish_kernel<kGGrad, 32>), "group_finish_kernel<grad, warp>"},
      // This unit's own instances of the finishing kernel (common.cuh).
      {reinterpret_cast<const void*>(&finish_kernel<kPenalty>), "finish_kernel<penalty> (group ops)"},
      {reinterpret_cast<const void*>(&finish_kernel<kProx>), "finish_kernel<prox> (group ops)"},
  };
}

int64_t group_workspace_bytes(const TensorList& w, const GroupList& gl) {
  check_groups(w, gl);
  return GroupLayout(w, gl).total;
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

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
