// optim_adam_emu.cpp: csrc/cuda/optim_adam.cu compiled as host C++
// against the CUDA emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../optim_adam.cu"
