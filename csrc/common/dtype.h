// dtype.h: the dtype codes pyreg's compiled kernels understand, and exact
// conversions between the 16-bit float formats and float32.
//
// Torch-free on purpose: Python hands the kernels raw pointers plus one of
// these codes (see pyreg/backends/_marshal.py, which keeps the same table).
// The conversions round to nearest even, bit-for-bit like c10::Half and
// c10::BFloat16, so a kernel's 16-bit output equals torch's `.to(dtype)` of the
// same float32 value. They compile for the host and, under nvcc, the device.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#ifndef PYREG_ISA_NS
#define PYREG_ISA_NS generic  // the default build; csrc/cpu/isa/ variants define their own
#endif

#if defined(__CUDACC__)
#define PYREG_HD __host__ __device__ __forceinline__
#else
#define PYREG_HD inline __attribute__((always_inline))
#endif

namespace pyreg {
// Per build variant (csrc/cpu/isa/): each instruction-set variant of the CPU
// kernels gets its own copy of these inline functions, so the linker cannot
// hand one variant another's (e.g. AVX-512) code.
inline namespace PYREG_ISA_NS {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

PYREG_HD int dtype_size(int code) {
  return code == kFloat64 ? 8 : code == kFloat32 ? 4 : 2;
}

// Storage types for the 16-bit formats: plain bits, no arithmetic.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

PYREG_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
PYREG_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// IEEE binary16 -> float32, exact (subnormals, inf and NaN included).
PYREG_HD float half_to_float(half_t h) {
  const uint32_t sign = (uint32_t(h.bits) & 0x8000u) << 16;
  const uint32_t em = uint32_t(h.bits) & 0x7fffu;
  // Shift exponent+mantissa into float position and rescale by 2^112: exact
  // for normals and subnormals alike.
  float f = bits_f32(em << 13) * 5.192296858534828e+33f;
  const uint32_t special = (em << 13) | 0x7f800000u;  // inf / NaN keep payload
  const uint32_t u = em >= 0x7c00u ? special : f32_bits(f);
  return bits_f32(u | sign);
}

// float32 -> IEEE binary16, round to nearest even, overflow to inf, NaN kept.
// Branch-free (all three cases computed, one selected) so loops vectorize.
PYREG_HD half_t float_to_half(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = x & 0x80000000u;
  const uint32_t u = x ^ sign;
#if defined(__CUDA_ARCH__)
  // The GPU converts in one instruction, rounding the same way (to nearest
  // even, overflow to inf); only a NaN's bits are its own, so NaN keeps ours.
  const uint32_t hw = __half_as_ushort(__float2half_rn(f));
  return half_t{uint16_t(u > 0x7f800000u ? (0x7e00u | (sign >> 16)) : hw)};
#else
  // Too large for half, inf or NaN.
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Half subnormal or zero: adding 0.5f lets the FPU round at the right bit.
  const uint32_t sub = f32_bits(bits_f32(u) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent and round to nearest even by integer adds.
  const uint32_t nrm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;  // 0xc8000fff = ((15-127)<<23)+0xfff
  const uint32_t o = u >= 0x47800000u ? big : (u < 0x38800000u ? sub : nrm);
  return half_t{uint16_t(o | (sign >> 16))};
#endif
}

PYREG_HD float bf16_to_float(bf16_t b) { return bits_f32(uint32_t(b.bits) << 16); }

PYREG_HD bf16_t float_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t nan = (u >> 16) | 0x40u;  // quiet NaN
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // sm_80 and later convert in one instruction, rounding to nearest even like
  // the integer adds below; a NaN keeps the bits above.
  const uint32_t rne = __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#endif
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rne)};
}

// opmath: the type a kernel computes in. 16-bit inputs compute in float32.
template <typename T> struct OpMath { using type = T; };
template <> struct OpMath<half_t> { using type = float; };
template <> struct OpMath<bf16_t> { using type = float; };
template <typename T> using opmath_t = typename OpMath<T>::type;

// load: storage -> compute type A; store: compute type A -> storage.
template <typename A> PYREG_HD A load(float x) { return A(x); }
template <typename A> PYREG_HD A load(double x) { return A(x); }
template <typename A> PYREG_HD A load(half_t x) { return A(half_to_float(x)); }
template <typename A> PYREG_HD A load(bf16_t x) { return A(bf16_to_float(x)); }

template <typename T> struct Store;
template <> struct Store<float> { template <typename A> PYREG_HD static float to(A v) { return float(v); } };
template <> struct Store<double> { template <typename A> PYREG_HD static double to(A v) { return double(v); } };
template <> struct Store<half_t> { template <typename A> PYREG_HD static half_t to(A v) { return float_to_half(float(v)); } };
template <> struct Store<bf16_t> { template <typename A> PYREG_HD static bf16_t to(A v) { return float_to_bf16(float(v)); } };
template <typename T, typename A> PYREG_HD T store(A v) { return Store<T>::to(v); }

// dst <- v. A 16-bit value's bits are assigned as an integer: a loop that
// keeps the value in a local first (a simd loop privatizes it) then copies the
// struct does not vectorize.
template <typename T> PYREG_HD void put(T& dst, T v) { dst = v; }
PYREG_HD void put(half_t& dst, half_t v) { dst.bits = v.bits; }
PYREG_HD void put(bf16_t& dst, bf16_t v) { dst.bits = v.bits; }

}  // inline namespace PYREG_ISA_NS
}  // namespace pyreg
