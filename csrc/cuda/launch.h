// launch.h: the one way pyreg's CUDA sources launch a kernel and declare
// static shared memory, so that the .cu sources compile unchanged with nvcc and
// as host C++ against the emulator (csrc/cuda/emu/cuda_runtime.h, which
// defines PYREG_CUDA_EMU).
//
//   PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, args...)
//       kernel<<<grid, block, shared_bytes, stream>>>(args...)
//   PYREG_SHARED(type, name);
//       __shared__ type name;  (type may be an array type: Partial[16])
#pragma once

namespace pyreg {
template <typename T> using shared_type = T;  // lets `type` be an array type
}  // namespace pyreg

#if defined(PYREG_CUDA_EMU)
#define PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::pyreg::emu::launch(#kernel, kernel, dim3(grid), dim3(block), shared_bytes, stream, __VA_ARGS__)
// Shared by the block's fibers on one host thread; the emulator counts its
// bytes against the static shared memory limit.
#define PYREG_SHARED(type, name)                               \
  static thread_local ::pyreg::shared_type<type> name;         \
  ::pyreg::emu::shared_use(#name, &name, sizeof(name))
#else
#define PYREG_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define PYREG_SHARED(type, name) __shared__ ::pyreg::shared_type<type> name
#endif
