// optim_rmsprop_emu.cpp: csrc/cuda/optim_rmsprop.cu compiled as host C++
// against the CUDA emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../optim_rmsprop.cu"
