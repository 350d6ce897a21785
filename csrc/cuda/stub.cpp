// stub.cpp: the CUDA entry points of a CPU-only build (no nvcc, or
// PYREG_CUDA=OFF). Python checks compiled() before using any of the others.
#include <stdexcept>

#include "kernels.h"

namespace pyreg::cuda {

bool compiled() { return false; }
std::string archs() { return ""; }
int device_count() { return 0; }
std::string runtime_error() { return "pyreg was built without CUDA"; }
std::string device_error(int) { return "pyreg was built without CUDA"; }
int64_t workspace_bytes(int64_t, int64_t) { return 0; }

namespace {
[[noreturn]] void unavailable() { throw std::runtime_error("pyreg was built without CUDA"); }
}  // namespace

void weight_stats(const TensorList&, void*, void*, void*, int64_t*, int, void*, int, uintptr_t) { unavailable(); }
void penalty(const TensorList&, Coef, Coef, void*, int, void*, int, uintptr_t) { unavailable(); }
void add_penalty_grad(const TensorList&, void* const*, Coef, Coef, void*, int, void*, int, uintptr_t) { unavailable(); }
void prox(const TensorList&, Coef, Coef, Coef, int64_t*, void*, int, uintptr_t) { unavailable(); }

}  // namespace pyreg::cuda
