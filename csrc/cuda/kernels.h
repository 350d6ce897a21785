// kernels.h: pyreg's fused CUDA kernels: the same contracts as
// csrc/cpu/kernels.h, on device pointers, launched on the caller's stream.
//
// csrc/cuda/kernels.cu is built up to twice, and each build exports its entry
// points as one table (CudaKernels):
//   kCuda     nvcc's build, for GPUs (csrc/cuda/stub.cpp without nvcc);
//   kCudaEmu  the same source as host C++ against the CUDA emulator
//             (csrc/cuda/emu/), which runs every kernel on the CPU; built with
//             the CMake option PYREG_CUDA_EMU=ON (a stub otherwise).
//
// Coefficients (l1, l2, lr) are Coefs: a device pointer to one double per
// tensor, or one value for all, passed in the kernel arguments.
// Outputs are device pointers. `Launch::workspace` is device scratch of at
// least workspace_bytes(n, total_numel) bytes, allocated by the caller
// (Python, through torch's caching allocator). No call synchronizes the host
// or copies from host memory, so a step that uses them can be captured in a
// CUDA graph.
#pragma once
#include <cstdint>
#include <string>

#include "../common/tensor_list.h"

namespace pyreg {

// Where one call runs: device scratch, device index and stream handle.
struct Launch {
  void* workspace;
  int device;
  uintptr_t stream;
};

struct CudaKernels {
  bool compiled;                // false: a stub (not built)
  std::string (*archs)();       // e.g. "sm_80 sm_90 compute_90"
  int (*device_count)();        // 0 when no driver / no GPU (never throws)
  std::string (*runtime_error)();  // why device_count() is 0, if it is
  // Why the kernels cannot run on `device` (no kernel image for its compute
  // capability...), or "" when they can. Also loads every kernel's module, so
  // a first launch inside CUDA graph capture loads nothing.
  std::string (*device_error)(int device);
  // Workspace bytes for any list of n tensors with `total_numel` elements in
  // all (an upper bound, so the caller needs no per-tensor sizes).
  int64_t (*workspace_bytes)(int64_t n, int64_t total_numel);

  void (*weight_stats)(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                       int out_dtype, const Launch& at);
  void (*penalty)(const TensorList& w, Coef l1, Coef l2, void* out, int out_dtype,
                  const Launch& at);
  void (*add_penalty_grad)(const TensorList& w, void* const* grads, Coef l1, Coef l2, void* out,
                           int out_dtype, const Launch& at);
  void (*prox)(const TensorList& w, Coef l1, Coef l2, Coef lr, int64_t* nnz, const Launch& at);
};

extern const CudaKernels kCuda;
extern const CudaKernels kCudaEmu;

}  // namespace pyreg
