// cuda_runtime.h (emulated): a host stand-in for exactly the part of CUDA that
// pyreg's kernels (csrc/cuda/*.cu) use, so that the same source compiles
// as plain C++ and its kernels run on the CPU, in CI, without a GPU.
//
// Built with the CMake option PYREG_CUDA_EMU=ON, which compiles the CUDA
// sources a second time (csrc/cuda/emu/*_emu.cpp, through build.h) with this
// directory first on the include path. What it provides:
//   * threadIdx / blockIdx / blockDim / gridDim, __syncthreads, the
//     __shfl_*_sync family, atomicAdd, atomicMax, __threadfence, __ldcg, the few device
//     intrinsics the kernels call, and the runtime calls the launchers make
//     (streams are accepted and ignored: a launch runs to completion before it
//     returns);
//   * launches through PYREG_LAUNCH (csrc/cuda/launch.h): every CUDA thread of
//     a block is a fiber on one host thread (emu.cpp), switched at each
//     barrier and shuffle; blocks run one after another.
// It enforces what a GPU enforces, so that a launch that would fail on a GPU
// fails here too:
//   * grid.x <= 2^31-1, grid.y, grid.z <= 65535, at most 1024 threads per
//     block (x, y <= 1024, z <= 64), no zero dimension: else the launch does
//     not run and cudaGetLastError() returns cudaErrorInvalidConfiguration;
//   * kernel arguments at most kMaxParamBytes (laid out as the CUDA ABI lays
//     them out; 32764 bytes, or 4096 with PYREG_CUDA_SMALL_PARAMS): a compile
//     error, as with nvcc;
//   * static shared memory (PYREG_SHARED) at most 48 KB per block: abort;
//   * a vector access (uint4, float4, double2, ... and __ldg/__ldcg of them)
//     at an address not aligned to the vector's size: abort, naming the
//     kernel, thread and address (a GPU faults: "misaligned address"). The
//     vector types check every copy from or to them inside a kernel, so
//     `reinterpret_cast<const uint4*>(p)[i]` is checked as it stands;
//   * __syncthreads reached by some threads of a block while others exited or
//     wait elsewhere, and shuffles whose mask leaves out the calling lane,
//     names a lane that has exited or does not exist, differs between the
//     lanes of one call, or reads a lane outside the mask: abort, with a
//     message naming the kernel, block and thread. (On a GPU these hang or
//     give undefined values.) One shuffle at a time per warp: lanes of one
//     warp in two different shuffles at once also count as diverged.
#pragma once
#define PYREG_CUDA_EMU 1

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
namespace pyreg::emu {
// Called by the vector types below on a copy from or to an address not aligned
// to `align`: inside a kernel it aborts with a message; on the host it returns.
void misaligned_vector(const void* p, size_t align, const char* type, bool store);
inline void check_vector(const void* p, size_t align, const char* type, bool store) {
  if ((reinterpret_cast<uintptr_t>(p) & (align - 1)) != 0) misaligned_vector(p, align, type, store);
}
}  // namespace pyreg::emu

// CUDA's vector types with their alignment. A copy from or to one checks the
// alignment of both sides (loads: the source; stores: the destination), as a
// GPU's vector load/store instruction requires; locals are always aligned.
#define PYREG_EMU_VEC2(V, T, A)                                                              \
  struct alignas(A) V {                                                                      \
    T x, y;                                                                                  \
    V() = default;                                                                           \
    constexpr V(T x_, T y_) : x(x_), y(y_) {}                                                \
    V(const V& o) : x(), y() {                                                               \
      ::pyreg::emu::check_vector(&o, A, #V, false);                                          \
      x = o.x; y = o.y;                                                                      \
    }                                                                                        \
    V& operator=(const V& o) {                                                               \
      ::pyreg::emu::check_vector(&o, A, #V, false);                                          \
      ::pyreg::emu::check_vector(this, A, #V, true);                                         \
      x = o.x; y = o.y;                                                                      \
      return *this;                                                                          \
    }                                                                                        \
  };                                                                                         \
  inline V make_##V(T x, T y) { return V(x, y); }
#define PYREG_EMU_VEC4(V, T, A)                                                              \
  struct alignas(A) V {                                                                      \
    T x, y, z, w;                                                                            \
    V() = default;                                                                           \
    constexpr V(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}                      \
    V(const V& o) : x(), y(), z(), w() {                                                     \
      ::pyreg::emu::check_vector(&o, A, #V, false);                                          \
      x = o.x; y = o.y; z = o.z; w = o.w;                                                    \
    }                                                                                        \
    V& operator=(const V& o) {                                                               \
      ::pyreg::emu::check_vector(&o, A, #V, false);                                          \
      ::pyreg::emu::check_vector(this, A, #V, true);                                         \
      x = o.x; y = o.y; z = o.z; w = o.w;                                                    \
      return *this;                                                                          \
    }                                                                                        \
  };                                                                                         \
  inline V make_##V(T x, T y, T z, T w) { return V(x, y, z, w); }
PYREG_EMU_VEC2(int2, int, 8)
PYREG_EMU_VEC2(uint2, unsigned, 8)
PYREG_EMU_VEC2(float2, float, 8)
PYREG_EMU_VEC2(double2, double, 16)
PYREG_EMU_VEC2(longlong2, long long, 16)
PYREG_EMU_VEC2(ulonglong2, unsigned long long, 16)
PYREG_EMU_VEC4(int4, int, 16)
PYREG_EMU_VEC4(uint4, unsigned, 16)
PYREG_EMU_VEC4(float4, float, 16)
#undef PYREG_EMU_VEC2
#undef PYREG_EMU_VEC4

using cudaStream_t = struct CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
};

struct cudaDeviceProp {
  char name[256];
  int major, minor;
};

namespace pyreg::emu {

// Kernel parameter space: 32764 bytes, as CUDA 12.1 and newer on sm_70 and
// newer allow; 4096 (older toolkits and GPUs) in a PYREG_CUDA_SMALL_PARAMS build.
#if defined(PYREG_CUDA_SMALL_PARAMS)
constexpr size_t kMaxParamBytes = 4096;
#else
constexpr size_t kMaxParamBytes = 32764;
#endif
constexpr size_t kMaxStaticShared = 48 * 1024;    // static shared memory per block
constexpr unsigned kMaxGridX = 0x7fffffffu, kMaxGridYZ = 65535u;
constexpr unsigned kMaxBlockThreads = 1024u, kMaxBlockZ = 64u;

template <typename T> using ident = T;

// The running CUDA thread's coordinates (valid inside a kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();

enum class Shfl : int { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };
// One warp shuffle of a 64-bit payload; returns the source lane's payload.
uint64_t shfl(Shfl kind, unsigned mask, uint64_t bits, int arg, int width);

// Records a static shared variable of the running block (PYREG_SHARED).
void shared_use(const char* name, const void* p, size_t bytes);

// Runs body(ctx) as every thread of every block of the grid; returns the
// launch error (cudaSuccess, or cudaErrorInvalidConfiguration without running).
cudaError_t launch_raw(const char* name, dim3 grid, dim3 block, size_t dynamic_shared,
                       void (*body)(void*), void* ctx);

cudaError_t& last_error();

// Bytes of the kernel parameter space P... takes, as the CUDA ABI lays it out.
template <typename... P>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_shared,
            cudaStream_t /*stream: ignored, the launch completes before it returns*/, A&&... args) {
  static_assert(param_bytes<std::decay_t<P>...>() <= kMaxParamBytes,
                "kernel arguments exceed the CUDA parameter space");
  static_assert((std::is_trivially_copyable_v<std::decay_t<P>> && ...),
                "kernel arguments must be trivially copyable");
  // One copy of the arguments, as in the GPU's parameter space; each thread
  // receives its own copy of them as a by-value call.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...>* params;
  } ctx{kernel, &params};
  auto body = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->kernel, *x->params);
  };
  const cudaError_t e = launch_raw(name, grid, block, dynamic_shared, body, &ctx);
  if (e != cudaSuccess) last_error() = e;
}

template <typename T>
T shfl_typed(Shfl kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a 1-8 byte value");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(kind, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace pyreg::emu

#define threadIdx (::pyreg::emu::thread_idx())
#define blockIdx (::pyreg::emu::block_idx())
#define blockDim (::pyreg::emu::block_dim())
#define gridDim (::pyreg::emu::grid_dim())

inline void __syncthreads() { ::pyreg::emu::syncthreads(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::pyreg::emu::shfl_typed(::pyreg::emu::Shfl::kIdx, mask, v, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::pyreg::emu::shfl_typed(::pyreg::emu::Shfl::kUp, mask, v, int(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::pyreg::emu::shfl_typed(::pyreg::emu::Shfl::kDown, mask, v, int(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::pyreg::emu::shfl_typed(::pyreg::emu::Shfl::kXor, mask, v, lane_mask, width);
}

template <typename T>
T atomicAdd(T* p, T v) {
  static_assert(std::is_integral_v<T>, "the emulator's atomicAdd takes integers");
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicMax(T* p, T v) {
  static_assert(std::is_integral_v<T>, "the emulator's atomicMax takes integers");
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

// Loads through the read-only cache (__ldg) and bypassing L1 (__ldcg, cache-
// global): plain loads on the host, with the GPU's alignment rule (a vector
// type checks itself when copied).
template <typename T>
T __ldcg(const T* p) {
  if constexpr (std::is_arithmetic_v<T>) {
    ::pyreg::emu::check_vector(p, sizeof(T), "scalar", false);
    return *static_cast<const volatile T*>(p);
  } else {
    return *p;
  }
}
template <typename T>
T __ldg(const T* p) { return __ldcg(p); }

inline float __double2float_rn(double x) { return float(x); }  // host default rounding: nearest

// ---- runtime ------------------------------------------------------------------
// One emulated device, index 0.
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : (::pyreg::emu::last_error() = cudaErrorInvalidDevice);
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::pyreg::emu::last_error();
  ::pyreg::emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::pyreg::emu::last_error(); }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void*) {
  *a = cudaFuncAttributes{0, int(::pyreg::emu::kMaxBlockThreads), 0};
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return ::pyreg::emu::last_error() = cudaErrorInvalidDevice;
  std::memset(p, 0, sizeof(*p));
  std::strcpy(p->name, "pyreg CUDA emulator");
  p->major = 9;
  p->minor = 0;
  return cudaSuccess;
}
