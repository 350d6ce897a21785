// kernels_api.h: what every build of pyreg's kernels exports, as one table
// (Kernels), so that one binding template (csrc/bindings.cpp) and one Python
// class (pyreg/backends/compiled.py) serve them all:
//
//   kCpu      the C++ kernels (csrc/cpu/kernels.cpp);
//   kCuda     the CUDA kernels built by nvcc (csrc/cuda/kernels.cu), or a stub;
//   kCudaEmu  the CUDA kernels built against the CUDA emulator
//             (csrc/cuda/emu/, PYREG_CUDA_EMU=ON), or a stub.
//
// Every op takes a TensorList (pointers, numels, dtype codes: no torch types),
// its coefficients as Coefs, its outputs as pointers, and a Launch: where it
// runs. Each build reads the fields it needs: the CPU kernels `nthreads`, the
// CUDA ones `workspace`, `device` and `stream`.
#pragma once
#include <cstdint>
#include <string>

#include "tensor_list.h"

namespace pyreg {

struct Launch {
  void* workspace;   // device scratch of workspace_bytes(n, total_numel) bytes (CUDA)
  int device;        // device index (CUDA)
  uintptr_t stream;  // cudaStream_t (CUDA; the emulator ignores it)
  int nthreads;      // threads of pyreg's pool (CPU)
};

struct Kernels {
  bool compiled;                   // false: a stub (this build was not made)
  std::string (*archs)();          // what the code was built for: "avx2+fma+f16c", "sm_80 sm_90"...
  int (*device_count)();           // 0 when no driver / no GPU (never throws)
  std::string (*runtime_error)();  // why device_count() is 0, if it is
  // Why the kernels cannot run on `device` (no kernel image for its compute
  // capability...), or "" when they can. On CUDA this also loads every
  // kernel's module, so a first launch inside CUDA graph capture loads nothing.
  std::string (*device_error)(int device);
  // Workspace bytes for any list of n tensors with `total_numel` elements in
  // all (an upper bound, so the caller needs no per-tensor sizes); 0 on the CPU.
  int64_t (*workspace_bytes)(int64_t n, int64_t total_numel);

  // Per tensor: l1 = sum|w|, l2 = sqrt(sum w^2), linf = max|w| (NaN if any w
  // is NaN), nnz = #(w != 0). Outputs in out_dtype (kFloat32/kFloat64), nnz int64.
  void (*weight_stats)(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                       int out_dtype, const Launch& at);
  // out[0] = sum_i l1_i * sum|w_i| + l2_i * sum w_i^2.
  void (*penalty)(const TensorList& w, Coef l1, Coef l2, void* out, int out_dtype,
                  const Launch& at);
  // g_i += l1_i * sign(w_i) + 2 * l2_i * w_i (g_i has w_i's dtype and layout);
  // out[0] = the penalty of w, from the same pass.
  void (*add_penalty_grad)(const TensorList& w, void* const* grads, Coef l1, Coef l2, void* out,
                           int out_dtype, const Launch& at);
  // w_i <- sign(w_i) * max(|w_i| - lr_i * l1_i, 0) / (1 + 2 * lr_i * l2_i);
  // nnz[i] = count of nonzeros of w_i after the step.
  void (*prox)(const TensorList& w, Coef l1, Coef l2, Coef lr, int64_t* nnz, const Launch& at);
};

extern const Kernels kCpu;
extern const Kernels kCuda;
extern const Kernels kCudaEmu;

}  // namespace pyreg
