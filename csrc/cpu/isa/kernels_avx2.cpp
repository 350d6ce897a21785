// kernels_avx2.cpp: the CPU kernels built for x86-64-v3: AVX2, FMA, F16C
// (compile flags in CMakeLists.txt). csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#define PYREG_ISA_NS isa_avx2
#define PYREG_CPU_TABLE kCpuAvx2
#include "../kernels.cpp"
