// kernels.h: pyreg's fused CUDA kernels: the contracts of
// csrc/common/kernels_api.h, on device pointers, launched on the caller's
// stream. One translation unit per family of ops, compiled in parallel:
//   elementwise.cu  weight_stats, penalty, add_penalty_grad, prox, l2_bound
//   group.cu        group_norms, group_prox, max_norm, the group penalty
//   optim.cu        the fused optimizer step (host side), its kernel for each
//                   algorithm in optim_sgd.cu, optim_adam.cu, optim_adagrad.cu,
//                   optim_rmsprop.cu (optim_kernel.cuh)
//   device.cu       archs, device count and probes
//   table.cu        the Kernels table of the build
// with what the kernels share in common.cuh.
//
// The sources are built up to twice, and each build exports its entry points
// as one Kernels table:
//   kCuda     nvcc's build, for GPUs (csrc/cuda/stub.cpp without nvcc);
//   kCudaEmu  the same source as host C++ against the CUDA emulator
//             (csrc/cuda/emu/), which runs every kernel on the CPU; built with
//             the CMake option PYREG_CUDA_EMU=ON (a stub otherwise).
//
// Coefficients (l1, l2, lr) are Coefs: a device pointer to one double per
// tensor, or one value for all, passed in the kernel arguments. Outputs are
// device pointers. `Launch::workspace` is device scratch of at least
// workspace_bytes(n, total_numel) bytes, allocated by the caller (Python,
// through torch's caching allocator). No call synchronizes the host or copies
// from host memory, so a step that uses them can be captured in a CUDA graph.
#pragma once
#include "../common/kernels_api.h"

#include <cstdint>
#include <string>
#include <vector>

// The namespace of this build's entry points: nvcc's build and the emulator's
// are linked into one module.
#ifndef PYREG_CUDA_NS
#define PYREG_CUDA_NS cuda
#endif

namespace pyreg {
namespace PYREG_CUDA_NS {

// A kernel, for device_error's probe of every kernel (each family lists its own).
struct KernelRef {
  const void* fn;
  const char* name;
};

// elementwise.cu
int64_t workspace_bytes(int64_t n, int64_t total_numel);
void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz, int out_dtype,
                  const Launch& at);
void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out, int out_dtype,
             const Launch& at);
void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1, Coef l2,
                      void* out, int out_dtype, const Launch& at);
void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at);
void l2_bound(const TensorList& w, double* lam, double* kappa, int64_t* steps, Coef bound, Coef mu, Coef warmup,
              const Launch& at);
std::vector<KernelRef> elementwise_kernels();

// group.cu
int64_t group_workspace_bytes(const TensorList& w, const GroupList& gl);
void group_norms(const TensorList& w, const GroupList& gl, void* norms, int out_dtype, const Launch& at);
void group_prox(const TensorList& w, const GroupList& gl, Coef l1, Coef group_l1, Coef l2, Coef lr,
                int64_t* nonzero, const Launch& at);
void max_norm(const TensorList& w, const GroupList& gl, Coef max_value, int64_t* clipped, const Launch& at);
void group_penalty(const TensorList& w, const GroupList& gl, Coef group_l1, void* out, int out_dtype,
                   const Launch& at);
void add_group_penalty_grad(const TensorList& w, const GroupList& gl, void* const* grads, Coef group_l1,
                            void* out, int out_dtype, const Launch& at);
std::vector<KernelRef> group_kernels();

// optim.cu
void optim_step(const OptimList& l, const OptimSpec& spec, const Launch& at);
std::vector<KernelRef> optim_kernels();

// select.cu
void kth_abs(const TensorList& w, const int64_t* k, bool closest, double* out, const Launch& at);
int64_t kth_abs_workspace_bytes(int64_t n);
std::vector<KernelRef> select_kernels();

// device.cu
std::string archs();
int device_count();
std::string runtime_error();
std::string device_error(int device);
int64_t param_bytes();   // the kernel parameter space the batches fill (launch.h)
int64_t launch_count();  // kernel launches by this build so far

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
