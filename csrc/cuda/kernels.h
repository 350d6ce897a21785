// kernels.h: pyreg's fused CUDA kernels (csrc/cuda/kernels.cu): the contracts
// of csrc/common/kernels_api.h, on device pointers, launched on the caller's
// stream.
//
// kernels.cu is built up to twice, and each build exports its entry points as
// one Kernels table:
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
