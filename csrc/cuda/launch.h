// launch.h: the one way pyreg's CUDA sources launch a kernel, take a tensor
// list's metadata as a kernel argument and declare static shared memory, so
// that the .cu sources compile unchanged with nvcc and as host C++ against the
// emulator (csrc/cuda/emu/cuda_runtime.h, which defines PYREG_CUDA_EMU).
//
//   PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, args...)
//       kernel<<<grid, block, shared_bytes, stream>>>(args...), counted
//       (launch_count(): the tests check how many launches an op makes)
//   PYREG_PARAM(Type) name   in a kernel's parameter list
//       const Type name: a by-value argument in the parameter space (the
//       emulator passes a const reference to its one copy of the arguments:
//       with a block's 512 fibers, a copy each of 32 KB would cost more than
//       the kernel)
//   PYREG_SHARED(type, name);
//       __shared__ type name;  (type may be an array type: Partial[16])
//
// kParamBytes: the kernel parameter space the batches are sized for. CUDA
// 12.1 raised it from 4 KB to 32764 bytes on sm_70 and newer (with a driver
// of 12.1 or newer, R530+): a whole model's tensor list then goes to one
// launch per kernel. PYREG_CUDA_SMALL_PARAMS (the CMake option of that name;
// on by itself for an older toolkit or an architecture below sm_70) keeps the
// 4 KB batches: more launches for long lists.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(PYREG_CUDA_SMALL_PARAMS) && !defined(PYREG_CUDA_EMU) && \
    (!defined(CUDART_VERSION) || CUDART_VERSION < 12010)
#define PYREG_CUDA_SMALL_PARAMS 1
#endif

namespace pyreg {
template <typename T> using shared_type = T;  // lets `type` be an array type

#if defined(PYREG_CUDA_SMALL_PARAMS)
constexpr size_t kParamBytes = 4096;
#else
constexpr size_t kParamBytes = 32764;
#endif
// Room left in the parameter space for the small arguments beside a batch.
constexpr size_t kParamSlack = 96;
}  // namespace pyreg

#ifndef PYREG_CUDA_NS
#define PYREG_CUDA_NS cuda
#endif
namespace pyreg {
namespace PYREG_CUDA_NS {
void count_launch();  // device.cu; launch_count() reads the count
}  // namespace PYREG_CUDA_NS
}  // namespace pyreg

#if defined(PYREG_CUDA_EMU)
#define PYREG_PARAM(type) const type&
#else
#define PYREG_PARAM(type) const type
#endif

#if defined(PYREG_CUDA_EMU)
#define PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                                   \
  do {                                                                                                \
    ::pyreg::PYREG_CUDA_NS::count_launch();                                                           \
    ::pyreg::emu::launch(#kernel, kernel, dim3(grid), dim3(block), shared_bytes, stream, __VA_ARGS__); \
  } while (0)
// Shared by the block's fibers on one host thread; the emulator counts its
// bytes against the static shared memory limit.
#define PYREG_SHARED(type, name)                               \
  static thread_local ::pyreg::shared_type<type> name;         \
  ::pyreg::emu::shared_use(#name, &name, sizeof(name))
#else
#define PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  do {                                                               \
    ::pyreg::PYREG_CUDA_NS::count_launch();                          \
    kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__);      \
  } while (0)
#define PYREG_SHARED(type, name) __shared__ ::pyreg::shared_type<type> name
#endif
