// kernels_avx512.cpp: the CPU kernels built for x86-64-v4: AVX-512 F, BW, CD, DQ, VL
// (compile flags in CMakeLists.txt). csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#define PYREG_ISA_NS isa_avx512
#define PYREG_CPU_TABLE kCpuAvx512
#include "../kernels.cpp"
