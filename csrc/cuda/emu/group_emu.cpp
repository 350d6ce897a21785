// group_emu.cpp: csrc/cuda/group.cu compiled as host C++ against the CUDA
// emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../group.cu"
