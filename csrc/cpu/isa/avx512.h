// avx512.h: the CPU kernels' variant for x86-64-v4: AVX-512 F, BW, CD, DQ, VL
// (compile flags in CMakeLists.txt). CMake builds each family of csrc/cpu/
// (kernels.h) once per variant, from a generated file that includes this
// header, then the family's source. csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#pragma once
#define PYREG_ISA_NS isa_avx512
#define PYREG_CPU_TABLE kCpuAvx512
