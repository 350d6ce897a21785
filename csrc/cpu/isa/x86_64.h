// x86_64.h: the CPU kernels' variant for the x86-64 baseline (SSE2): any x86-64 CPU
// (compile flags in CMakeLists.txt). CMake builds each family of csrc/cpu/
// (kernels.h) once per variant, from a generated file that includes this
// header, then the family's source. csrc/cpu/dispatch.cpp chooses one
// variant at load time from the CPU's features.
#pragma once
#define PYREG_ISA_NS isa_x86_64
#define PYREG_CPU_TABLE kCpuX86_64
