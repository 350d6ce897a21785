// build.h: what every emulator translation unit (*_emu.cpp) defines before
// including a CUDA source as host C++: the emulator's cuda_runtime.h (this
// directory comes first), the build's namespace, table name and architectures.
// The sources are built with PYREG_CUDA_EMU=ON and export pyreg::kCudaEmu.
#pragma once
#include "cuda_runtime.h"

#define PYREG_CUDA_NS cuda_emu
#define PYREG_CUDA_TABLE kCudaEmu
#define PYREG_CUDA_ARCHS "emulated"
