// table.cu: the Kernels table of pyreg's CUDA build (kernels_api.h), from
// the entry points of elementwise.cu, group.cu, optim.cu, select.cu and device.cu.
#include "kernels.h"

#ifndef PYREG_CUDA_TABLE
#define PYREG_CUDA_TABLE kCuda
#endif

namespace pyreg {

namespace k = PYREG_CUDA_NS;

extern const Kernels PYREG_CUDA_TABLE = {
    true,         k::archs,   k::device_count, k::runtime_error,    k::device_error, k::workspace_bytes,
    k::param_bytes, k::launch_count,
    k::weight_stats, k::penalty, k::add_penalty_grad, k::prox,
    k::group_workspace_bytes, k::group_norms, k::group_prox, k::max_norm, k::group_penalty,
    k::add_group_penalty_grad,
    k::optim_step,
    k::l2_bound,
    k::kth_abs,
    k::kth_abs_workspace_bytes,
    nullptr,  // push_kth: the CPU build's only
    nullptr,  // metric_target: the same
};

}  // namespace pyreg
