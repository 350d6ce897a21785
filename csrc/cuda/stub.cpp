// stub.cpp: the table of a CUDA build that was not made: kCuda without nvcc
// (or PYREG_CUDA=OFF), kCudaEmu without PYREG_CUDA_EMU=ON. CMake defines
// PYREG_STUB_CUDA and/or PYREG_STUB_CUDA_EMU. Python reads `compiled` before
// using any of the others.
#include <stdexcept>

#include "kernels.h"

namespace pyreg {
namespace {

[[noreturn]] void unavailable() { throw std::runtime_error("these CUDA kernels were not built"); }

Kernels stub(std::string (*why)()) {
  return Kernels{
      false,
      [] { return std::string(); },
      [] { return 0; },
      why,
      [](int) { return std::string("not built"); },
      [](int64_t, int64_t) { return int64_t(0); },
      [] { return int64_t(0); },
      [] { return int64_t(0); },
      [](const TensorList&, void*, void*, void*, int64_t*, int, const Launch&) { unavailable(); },
      [](const TensorList&, const void* const*, Coef, Coef, void*, int, const Launch&) { unavailable(); },
      [](const TensorList&, const void* const*, void* const*, Coef, Coef, void*, int, const Launch&) {
        unavailable();
      },
      [](const TensorList&, const void* const*, Coef, Coef, Coef, int64_t*, const Launch&) { unavailable(); },
      [](const TensorList&, const GroupList&) { return int64_t(0); },
      [](const TensorList&, const GroupList&, void*, int, const Launch&) { unavailable(); },
      [](const TensorList&, const GroupList&, Coef, Coef, Coef, Coef, int64_t*, const Launch&) { unavailable(); },
      [](const TensorList&, const GroupList&, Coef, int64_t*, const Launch&) { unavailable(); },
      [](const TensorList&, const GroupList&, Coef, void*, int, const Launch&) { unavailable(); },
      [](const TensorList&, const GroupList&, void* const*, Coef, void*, int, const Launch&) { unavailable(); },
      [](const OptimList&, const OptimSpec&, const Launch&) { unavailable(); },
      nullptr,
      nullptr,
      [](int64_t) { return int64_t(0); },
      nullptr,
      nullptr,
  };
}

}  // namespace

#if defined(PYREG_STUB_CUDA)
extern const Kernels kCuda = stub([] { return std::string("pyreg was built without CUDA"); });
#endif
#if defined(PYREG_STUB_CUDA_EMU)
extern const Kernels kCudaEmu = stub(
    [] { return std::string("pyreg was built without the CUDA emulator (PYREG_CUDA_EMU=OFF)"); });
#endif

}  // namespace pyreg
