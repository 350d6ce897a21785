// group_plan.h: how the group ops (group_norms, group_prox, max_norm, the
// group penalty and its gradient) cut a tensor into work, shared by the CPU
// kernels and the CUDA kernels.
//
// A tensor is seen, in memory order, as [outer, groups, inner]: `outer` rows
// of L = groups * inner contiguous elements ("columns"); group g is the
// columns [g*inner, (g+1)*inner) of every row. For an nn.Linear weight
// [out, in], dim=1 gives outer=out, groups=in, inner=1 (columns are groups);
// dim=0 gives outer=1, groups=out, inner=in (rows are groups).
//
// Two kinds of groups, by width (inner):
//   narrow (inner < kWideInner, e.g. the columns of a Linear weight): a tile
//     is `rows` rows times gp whole groups (at most kGroupTileCols columns);
//     pass 1 sums each column's squares over the rows, then each group's
//     columns;
//   wide (inner >= kWideInner, e.g. the rows of a Linear weight): a tile is
//     `rows` rows times gp whole groups (about kGroupTileElems elements), or,
//     for a group wider than that, one of its `sub` segments of `width`
//     columns (the last one shorter); pass 1 sums each group's contiguous
//     runs directly.
// Pass 1 (every op) gives float64 partial sums of squares per (row tile,
// group, sub-tile); the fold of a group's partials, row tile by row tile and
// sub-tile by sub-tile, gives its squared norm. The order of every sum depends
// only on the tensor's shape: same input, same bits, whatever the thread count.
// Pass 2 (prox, max_norm, grad) scales each element by its group's factor.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pyreg {
inline namespace PYREG_ISA_NS {

constexpr int64_t kGroupTileCols = 2048;         // columns per tile of narrow groups at most
constexpr int64_t kGroupTileElems = int64_t(1) << 15;  // elements a tile aims for
constexpr int64_t kWideInner = 32;               // groups at least this wide are "wide"

struct GroupTiling {
  int64_t outer, groups, inner;
  bool wide;          // inner >= kWideInner
  int64_t sub;        // column tiles per group (1 unless a wide group is wider than a tile)
  int64_t width;      // columns of a sub-tile (sub > 1)
  int64_t gp;         // groups per tile when sub == 1 (1 when sub > 1)
  int64_t cols;       // columns per tile (the last tile of a row may hold fewer)
  int64_t rows;       // rows per tile (the last row tile may hold fewer)
  int64_t row_tiles;  // 0 when the tensor has no elements
  int64_t col_tiles;  // ceil(groups / gp) * sub

  int64_t tiles() const { return row_tiles * col_tiles; }
  // Partials of pass 1: one per (row tile, group, sub-tile).
  int64_t partials() const { return row_tiles * groups * sub; }
};

// The tiling's divisions, without 64-bit divides: a GPU has none (nvcc calls
// a subroutine, and the registers saved around each call spill to local
// memory). The divisors are small, and tile indices are under 2^31 (each
// planner refuses a tensor with more tiles).
//
// a / b for 0 <= a < 2^63 and 0 < b <= kMaxSmallDivisor: long division in
// base-2^15 digits, each step a 32-bit division ((r << 15) | digit < 2^32).
constexpr int64_t kMaxSmallDivisor = int64_t(1) << 17;
PYREG_HD int64_t div_small(int64_t a, int64_t b) {
  const uint32_t d = uint32_t(b);
  uint64_t q = 0;
  uint32_t r = 0;
  for (int s = 60; s >= 0; s -= 15) {
    const uint32_t cur = (r << 15) | uint32_t((uint64_t(a) >> s) & 0x7fffu);
    q = (q << 15) | (cur / d);
    r = cur % d;
  }
  return int64_t(q);
}
// a / b and a % b for 0 <= a, b < 2^31.
PYREG_HD int64_t div32(int64_t a, int64_t b) { return int64_t(uint32_t(a) / uint32_t(b)); }
PYREG_HD int64_t mod32(int64_t a, int64_t b) { return int64_t(uint32_t(a) % uint32_t(b)); }

// narrow_elems: the elements a tile of narrow groups aims for (more rows per
// tile, fewer partials; the CPU takes larger tiles than a GPU block), at most
// kMaxSmallDivisor.
PYREG_HD GroupTiling group_tiling(int64_t outer, int64_t groups, int64_t inner,
                                  int64_t narrow_elems = kGroupTileElems) {
  GroupTiling t{outer, groups, inner, inner >= kWideInner, 1, 0, 1, 0, 1, 0, 0};
  if (outer <= 0 || groups <= 0 || inner <= 0) return t;  // no elements: no tiles
  const int64_t span = t.wide ? kGroupTileElems : kGroupTileCols;
  if (inner > span) {
    // ceil(inner / span), span a power of two: shifts
    t.sub = t.wide ? (inner + kGroupTileElems - 1) / kGroupTileElems : (inner + kGroupTileCols - 1) / kGroupTileCols;
    t.width = span;
    t.gp = 1;
    t.cols = span;
  } else {
    t.gp = div32(span, inner);
    if (t.gp > groups) t.gp = groups;
    t.cols = t.gp * inner;
  }
  t.rows = div32(t.wide ? kGroupTileElems : narrow_elems, t.cols);  // <= kMaxSmallDivisor
  if (t.rows < 1) t.rows = 1;
  if (t.rows > outer) t.rows = outer;
  t.row_tiles = div_small(outer + t.rows - 1, t.rows);
  t.col_tiles = div_small(groups + t.gp - 1, t.gp) * t.sub;  // gp <= span
  return t;
}

// Tile k (row-major over (row tile, column tile)) of a tiling.
struct GroupTile {
  int64_t row0, nrows;  // rows [row0, row0 + nrows)
  int64_t col0, ncols;  // columns [col0, col0 + ncols) of each row
  int64_t g0, ng;       // its groups [g0, g0 + ng)
  int64_t s;            // its sub-tile within group g0 (sub > 1), else 0
  int64_t rt;           // its row tile
};

PYREG_HD GroupTile group_tile(const GroupTiling& t, int64_t k) {
  GroupTile u;
  u.rt = div32(k, t.col_tiles);  // tile indices are under 2^31
  const int64_t ct = mod32(k, t.col_tiles);
  u.row0 = u.rt * t.rows;
  u.nrows = t.outer - u.row0 < t.rows ? t.outer - u.row0 : t.rows;
  if (t.sub == 1) {
    u.g0 = ct * t.gp;
    u.ng = t.groups - u.g0 < t.gp ? t.groups - u.g0 : t.gp;
    u.s = 0;
    u.col0 = u.g0 * t.inner;
    u.ncols = u.ng * t.inner;
  } else {
    u.g0 = div32(ct, t.sub);
    u.ng = 1;
    u.s = mod32(ct, t.sub);
    const int64_t c = u.s * t.width;
    u.col0 = u.g0 * t.inner + c;
    u.ncols = t.inner - c < t.width ? t.inner - c : t.width;
  }
  return u;
}

// Index of the partial of (row tile rt, group g, sub-tile s).
PYREG_HD int64_t partial_index(const GroupTiling& t, int64_t rt, int64_t g, int64_t s) {
  return (rt * t.groups + g) * t.sub + s;
}

}  // inline namespace PYREG_ISA_NS
}  // namespace pyreg
