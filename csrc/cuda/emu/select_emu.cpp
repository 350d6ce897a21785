// select_emu.cpp: csrc/cuda/select.cu compiled as host C++ against the CUDA
// emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../select.cu"
