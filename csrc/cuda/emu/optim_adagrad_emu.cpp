// optim_adagrad_emu.cpp: csrc/cuda/optim_adagrad.cu compiled as host C++
// against the CUDA emulator (build.h), for the backend cuda-emu.
#include "build.h"
#include "../optim_adagrad.cu"
