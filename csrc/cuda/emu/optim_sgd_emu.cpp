// optim_sgd_emu.cpp: csrc/cuda/optim_sgd.cu compiled as host C++
// against the CUDA emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../optim_sgd.cu"
