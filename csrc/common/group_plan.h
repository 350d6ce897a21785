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
// Tiles: a tile is `rows` consecutive rows times a range of columns that
// never splits a group unless the group alone is wider than kGroupTileCols:
//   sub == 1: a tile holds gp whole groups (gp * inner <= kGroupTileCols columns);
//   sub  > 1: a group of inner > kGroupTileCols columns is cut into `sub`
//             column tiles of kGroupTileCols columns (the last one shorter).
// Pass 1 (every op) sums the squares of each column over the tile's rows, then
// each group's columns, into one float64 partial per (row tile, group,
// sub-tile). The fold of a group's partials, row tile by row tile and sub-tile
// by sub-tile, gives its squared norm. The order of every sum depends only on
// the tensor's shape: same input, same bits, whatever the thread count.
// Pass 2 (prox, max_norm, grad) scales each element by its group's factor.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pyreg {
inline namespace PYREG_ISA_NS {

constexpr int64_t kGroupTileCols = 2048;         // columns per tile at most
constexpr int64_t kGroupTileElems = int64_t(1) << 15;  // elements a tile aims for

struct GroupTiling {
  int64_t outer, groups, inner;
  int64_t sub;        // column tiles per group (1 unless inner > kGroupTileCols)
  int64_t gp;         // groups per tile when sub == 1 (1 when sub > 1)
  int64_t cols;       // columns per tile (the last tile of a row may hold fewer)
  int64_t rows;       // rows per tile (the last row tile may hold fewer)
  int64_t row_tiles;  // 0 when the tensor has no elements
  int64_t col_tiles;  // ceil(groups / gp) * sub

  int64_t tiles() const { return row_tiles * col_tiles; }
  // Partials of pass 1: one per (row tile, group, sub-tile).
  int64_t partials() const { return row_tiles * groups * sub; }
};

PYREG_HD GroupTiling group_tiling(int64_t outer, int64_t groups, int64_t inner) {
  GroupTiling t{outer, groups, inner, 1, 1, 0, 1, 0, 0};
  if (outer <= 0 || groups <= 0 || inner <= 0) return t;  // no elements: no tiles
  if (inner > kGroupTileCols) {
    t.sub = (inner + kGroupTileCols - 1) / kGroupTileCols;
    t.gp = 1;
    t.cols = kGroupTileCols;
  } else {
    t.gp = kGroupTileCols / inner;
    if (t.gp > groups) t.gp = groups;
    t.cols = t.gp * inner;
  }
  t.rows = kGroupTileElems / t.cols;
  if (t.rows < 1) t.rows = 1;
  if (t.rows > outer) t.rows = outer;
  t.row_tiles = (outer + t.rows - 1) / t.rows;
  t.col_tiles = (groups + t.gp - 1) / t.gp * t.sub;
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
  u.rt = k / t.col_tiles;
  const int64_t ct = k % t.col_tiles;
  u.row0 = u.rt * t.rows;
  u.nrows = t.outer - u.row0 < t.rows ? t.outer - u.row0 : t.rows;
  if (t.sub == 1) {
    u.g0 = ct * t.gp;
    u.ng = t.groups - u.g0 < t.gp ? t.groups - u.g0 : t.gp;
    u.s = 0;
    u.col0 = u.g0 * t.inner;
    u.ncols = u.ng * t.inner;
  } else {
    u.g0 = ct / t.sub;
    u.ng = 1;
    u.s = ct % t.sub;
    const int64_t c = u.s * kGroupTileCols;
    u.col0 = u.g0 * t.inner + c;
    u.ncols = t.inner - c < kGroupTileCols ? t.inner - c : kGroupTileCols;
  }
  return u;
}

// Index of the partial of (row tile rt, group g, sub-tile s).
PYREG_HD int64_t partial_index(const GroupTiling& t, int64_t rt, int64_t g, int64_t s) {
  return (rt * t.groups + g) * t.sub + s;
}

}  // inline namespace PYREG_ISA_NS
}  // namespace pyreg
