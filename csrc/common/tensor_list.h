// tensor_list.h: how Python describes "all weight tensors of a model" to the
// compiled kernels: raw data pointers, 64-bit element counts and dtype codes.
// No torch types cross this boundary, so the module never links libtorch.
#pragma once
#include <cstdint>
#include <vector>

namespace pyreg {

struct TensorList {
  std::vector<void*> ptrs;      // data pointer of each tensor (dense, any layout)
  std::vector<int64_t> numels;  // element count of each tensor (0 allowed)
  std::vector<int> dtypes;      // DType code of each tensor
  int64_t size() const { return int64_t(ptrs.size()); }
};

// A coefficient of an op (l1, l2, lr): one double per tensor at `per_tensor`
// (host memory for the CPU kernels, device memory for the CUDA ones), or, when
// that is null, `value` for every tensor. A value travels in the call itself
// (on CUDA: in the kernel arguments), so a number costs no memory and no copy.
struct Coef {
  const double* per_tensor;
  double value;
};

// How the group ops (group_norms, group_prox, max_norm, the group penalty)
// see each tensor: in memory order, [outer, groups, inner]. Python derives it
// from the tensor's shape, strides and the group dimension.
struct GroupList {
  std::vector<int64_t> outer, groups, inner;
  int64_t size() const { return int64_t(groups.size()); }
};

// Per-tensor results of a reduction sweep (finalized, in tensor order).
//   l1 = sum |w|, l2 = sqrt(sum w^2), linf = max |w| (NaN if any w is NaN),
//   nnz = count of w != 0.
// out_dtype (kFloat32 or kFloat64) is the dtype of the l1/l2/linf/penalty
// outputs; nnz is always int64.

// Elements per work item. The chunking, and with it the order of every
// floating-point reduction, depends only on the tensor sizes: results are
// bitwise identical whatever the thread count.
constexpr int64_t kCpuChunk = int64_t(1) << 16;

}  // namespace pyreg
