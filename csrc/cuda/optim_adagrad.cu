// optim_adagrad.cu: the fused optimizer step's kernel for Adagrad
// (optim_kernel.cuh), in a unit of its own so that the algorithms compile in
// parallel.
#include "optim_kernel.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {

void launch_optim_adagrad(const OptimBatch& b, const OptimSpec& s, dim3 grid, cudaStream_t st) {
  PYREG_LAUNCH(optim_kernel<kAdagrad>, grid, kThreads, 0, st, b, s);
}

KernelRef optim_adagrad_kernel() {
  return {reinterpret_cast<const void*>(&optim_kernel<kAdagrad>), "optim_kernel<adagrad>"};
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
