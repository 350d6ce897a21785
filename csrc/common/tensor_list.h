// tensor_list.h: how Python describes "all weight tensors of a model" to the
// compiled kernels: raw data pointers, 64-bit element counts and dtype codes.
// No torch types cross this boundary, so the module never links libtorch.
#pragma once
#include <cstdint>
#include <vector>

#include "hyper.h"

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

// The tensors of a fused optimizer step: the params (w) and, per param, its
// grad and optimizer state, each like the param (same dtype, numel and
// layout). State buffers by optimizer (s1, s2, s3; an unused list is empty):
// SGD momentum_buffer; Adam exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad);
// Adagrad sum; RMSprop square_avg, momentum_buffer (momentum > 0), grad_avg
// (centered). `steps`: each param's step counter (a scalar of
// OptimSpec::step_dtype; Adam, Adagrad and RMSprop). `group`: each param's row of the
// hyperparameter table. `fresh`: SGD, 1 where the momentum buffer starts at
// this step (buf = grad).
struct OptimList {
  TensorList w;
  std::vector<void*> grads, s1, s2, s3, steps;
  std::vector<int32_t> group;
  std::vector<uint8_t> fresh;
  int64_t n_groups = 0;
};

enum OptimAlgo : int { kSgd = 0, kAdam = 1, kAdagrad = 2, kRmsprop = 3 };

// The prox after the update: none (l1 = l2 = 0), with the group's lr (as
// pyreg.prox_), or in the optimizer's metric (each element's own step size:
// Adam lr / (sqrt(v_hat) + eps), Adagrad clr / (sqrt(G) + eps), RMSprop
// lr / (sqrt(square_avg [- grad_avg^2]) + eps).
enum OptimProx : int { kNoProx = 0, kPlainProx = 1, kMetricProx = 2 };

// One param group's numbers, kHyper doubles in the order of hyper.h (Python
// builds the rows by name: pyreg/optim/functional.py).

// What a whole step has in common (the bucket's flags and the GradScaler's
// scalars). grad_scale/found_inf: float32 scalars in the tensors' memory, or
// null. A step with *found_inf != 0 changes nothing.
struct OptimSpec {
  int algo;
  int step_dtype;        // kFloat32 or kFloat64: the `step` counters' dtype
  bool decoupled;        // AdamW: weight decay multiplies the param
  bool amsgrad;          // Adam: max_exp_avg_sq
  bool maximize;
  bool nesterov;         // SGD
  bool centered;         // RMSprop: grad_avg
  int prox;              // OptimProx
  const double* hyper;   // kHyper doubles per group (host for the CPU, device for CUDA)
  const float* grad_scale;
  const float* found_inf;
  // CUDA only (the CPU ignores it): an unsigned in device memory, zero before
  // a launch and left zero after it. The launch's blocks take a ticket from it
  // as they finish; the last one increments the step counters, which every
  // block has read by then (no second kernel). One per optimizer and device.
  unsigned* ticket;
};

// Per-tensor results of a reduction sweep (finalized, in tensor order).
//   l1 = sum |w|, l2 = sqrt(sum w^2), linf = max |w| (NaN if any w is NaN),
//   nnz = count of w != 0.
// out_dtype (kFloat32 or kFloat64) is the dtype of the l1/l2/linf/penalty
// outputs; nnz is always int64.

// Elements per work item (1 MB of float32: on a 2-core Xeon, weight_stats over
// GPT-2's tensors took about 3% less time than with items of 65,536). The
// chunking, and with it the order of every floating-point reduction, depends
// only on the tensor sizes: results are bitwise identical whatever the thread
// count.
constexpr int64_t kCpuChunk = int64_t(1) << 18;

}  // namespace pyreg
