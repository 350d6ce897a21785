// kernels_emu.cpp: csrc/cuda/kernels.cu compiled as host C++ against the CUDA
// emulator (this directory's cuda_runtime.h comes first on the include path),
// exporting its entry points as pyreg::kCudaEmu. Built with PYREG_CUDA_EMU=ON.
#include "cuda_runtime.h"

#define PYREG_CUDA_TABLE kCudaEmu
#define PYREG_CUDA_ARCHS "emulated"
#include "../kernels.cu"
