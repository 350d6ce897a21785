// avx2.h: the CPU kernels' variant for x86-64-v3: AVX2, FMA, F16C
// (compile flags in CMakeLists.txt). CMake builds each family of csrc/cpu/
// (kernels.h) once per variant, from a generated file that includes this
// header, then the family's source. csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#pragma once
#define PYREG_ISA_NS isa_avx2
#define PYREG_CPU_TABLE kCpuAvx2
