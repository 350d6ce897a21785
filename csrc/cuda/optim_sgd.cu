// optim_sgd.cu: the fused optimizer step's kernel for SGD
// (optim_kernel.cuh), in a unit of its own so that the algorithms compile in
// parallel.
#include "optim_kernel.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {

void launch_optim_sgd(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st) {
  PYREG_LAUNCH(optim_kernel<kSgd>, grid, kThreads, 0, st, b, s);
}

KernelRef optim_sgd_kernel() {
  return {reinterpret_cast<const void*>(&optim_kernel<kSgd>), "optim_kernel<sgd>"};
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
