// kernels_x86_64.cpp: the CPU kernels built for the x86-64 baseline (SSE2): any x86-64 CPU
// (compile flags in CMakeLists.txt). csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#define PYREG_ISA_NS isa_x86_64
#define PYREG_CPU_TABLE kCpuX86_64
#include "../kernels.cpp"
