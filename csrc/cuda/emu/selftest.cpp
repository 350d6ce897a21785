// selftest.cpp: small kernels that check the CUDA emulator itself, built with
// it (PYREG_CUDA_EMU=ON) and reached from Python as _C.cuda_emu_selftest(name)
// (tests/test_emulator.py). Each kernel goes through PYREG_LAUNCH and
// PYREG_SHARED, as pyreg's own kernels do.
//
// "shuffles" and "barriers" run correct kernels and compare what the
// emulator computed with the CUDA semantics, worked out here on the host; they
// return "ok" or what differs. "neighbour_racy" reads shared memory that
// another thread writes with no barrier between: it computes the right result
// in forward order only, so it returns "ok" there and what differs under some
// other PYREG_EMU_ORDER; "neighbour_synced" is the same with the barrier, "ok"
// in every order. "vector_aligned" loads and stores aligned vectors. The
// "launch_*" cases make launches a GPU
// refuses and return the launch error's name. The remaining cases break a
// rule a GPU does not forgive (the emulator aborts the process with a message).
#include "selftest.h"

#include "build.h"  // the emulator's cuda_runtime.h and namespace (its launches count there)
#include "../launch.h"

#include <cstring>
#include <string>
#include <vector>

namespace pyreg::emu {
namespace {

// Every lane of a 64-thread block writes the results of each shuffle kind,
// full mask and width 32, and of width 8.
__global__ void shuffle_kernel(int* out) {
  const int t = int(threadIdx.x), lane = t & 31;
  const int v = 1000 * t + 7;
  int* o = out + 6 * t;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 5 + 3) & 31);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 9);
  o[4] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[5] = __shfl_xor_sync(0xffffffffu, v, 6, 8);
}

int expect_shuffle(int t, int k) {
  const int lane = t & 31, base = t - lane;
  auto val = [&](int l) { return 1000 * (base + l) + 7; };
  switch (k) {
    case 0: return val((lane * 5 + 3) & 31);
    case 1: return val(lane >= 3 ? lane - 3 : lane);
    case 2: return val(lane + 5 < 32 ? lane + 5 : lane);
    case 3: return val(lane ^ 9);
    case 4: return val((lane & 7) + 3 < 8 ? lane + 3 : lane);
    case 5: return val(lane ^ 6);
  }
  return -1;
}

// A block-wide sum through shared memory and two barriers, and a counter
// every block bumps with atomicAdd: blocks x threads of a 3-D grid and block.
__global__ void barrier_kernel(long long* sums, unsigned* counter) {
  PYREG_SHARED(long long[256], buf);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  buf[t] = (long long)(b + 1) * (t + 1);
  __syncthreads();
  if (t == 0) {
    long long s = 0;
    for (unsigned i = 0; i < n; ++i) s += buf[i];
    sums[b] = s;
    atomicAdd(counter, 1u);
  }
  __syncthreads();
  buf[t] = 0;
}

// Each thread publishes a value in shared memory and reads its left
// neighbour's. With kSync a barrier separates the write from the read; without
// it, the read races with the neighbour's write (on a GPU, warps of one block
// run in no promised order). The values differ between blocks and launches,
// so a stale value of an earlier block (shared memory persists here) cannot
// pass for a fresh one.
template <bool kSync>
__global__ void neighbour_kernel(int base, int* out) {
  PYREG_SHARED(int[256], sh);
  const int t = int(threadIdx.x), n = int(blockDim.x);
  const int v = base + 1000 * int(blockIdx.x);
  sh[t] = v + t;
  if (kSync) __syncthreads();
  out[int(blockIdx.x) * n + t] = t > 0 ? sh[t - 1] : v - 1;
}

std::string check_neighbour(bool sync) {
  static int launches = 0;
  const int base = 100000 * ++launches, n = 128, blocks = 3;
  std::vector<int> out(blocks * n, 0);
  if (sync) PYREG_LAUNCH(neighbour_kernel<true>, blocks, n, 0, nullptr, base, out.data());
  else PYREG_LAUNCH(neighbour_kernel<false>, blocks, n, 0, nullptr, base, out.data());
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t) {
      const int want = base + 1000 * b + t - 1;
      if (out[b * n + t] != want)
        return "block " + std::to_string(b) + " thread " + std::to_string(t) + " read " +
               std::to_string(out[b * n + t]) + ", want " + std::to_string(want);
    }
  return "ok";
}

// Vector loads and stores through the vector types and __ldg, from `in` +
// `offset` bytes (a multiple of 16: aligned; otherwise misaligned).
__global__ void vector_kernel(const char* in, char* out, int offset, int kind) {
  const int t = int(threadIdx.x);
  if (kind == 0) {  // float4 load
    const float4 v = reinterpret_cast<const float4*>(in + offset)[t];
    reinterpret_cast<float4*>(out)[t] = v;
  } else if (kind == 1) {  // uint4 store
    const uint4 v = reinterpret_cast<const uint4*>(in)[t];
    reinterpret_cast<uint4*>(out + offset)[t] = v;
  } else if (kind == 2) {  // __ldg of a double2
    reinterpret_cast<double2*>(out)[t] = __ldg(reinterpret_cast<const double2*>(in + offset) + t);
  } else {  // float2 load (8 bytes)
    reinterpret_cast<float2*>(out)[t] = reinterpret_cast<const float2*>(in + offset)[t];
  }
}

std::string run_vectors(int offset, int kind) {
  const int n = 32;
  alignas(16) static char in[16 * 33 + 16], out[16 * 33 + 16];
  for (int i = 0; i < int(sizeof in); ++i) in[i] = char(i * 7 + 1);
  std::memset(out, 0, sizeof out);
  PYREG_LAUNCH(vector_kernel, 1, n, 0, nullptr, in, out, offset, kind);
  const int bytes = kind == 3 ? 8 : 16;
  const int src = kind == 1 ? 0 : offset, dst = kind == 1 ? offset : 0;
  if (std::memcmp(out + dst, in + src, size_t(n) * bytes) != 0) return "copied bytes differ";
  return "ok";
}

__global__ void noop_kernel(int) {}

__global__ void big_shared_kernel(int* out) {
  PYREG_SHARED(char[48 * 1024 + 16], big);
  big[threadIdx.x] = 1;
  out[0] = big[0];
}

// 48 threads: the second warp has 16 lanes, but the mask names all 32.
__global__ void mask_inactive_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Every lane passes the mask of lanes 0-15: lanes 16-31 call with a mask
// that leaves them out.
__global__ void mask_excludes_caller_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, int(threadIdx.x), 1);
}

// The lanes of one shuffle disagree on its mask.
__global__ void mask_diverged_kernel(int* out) {
  const int lane = int(threadIdx.x) & 31;
  out[threadIdx.x] = __shfl_xor_sync(lane < 16 ? 0xffffffffu : 0xffff0000u, lane, 1);
}

// Half the block returns before __syncthreads.
__global__ void barrier_diverged_kernel(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lane 0 waits in a shuffle of the whole warp while lane 1 goes to __syncthreads.
__global__ void barrier_vs_shuffle_kernel(int* out) {
  if (threadIdx.x == 1) __syncthreads();
  else out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

std::string launch_error(dim3 grid, dim3 block, size_t shared) {
  (void)cudaGetLastError();
  PYREG_LAUNCH(noop_kernel, grid, block, shared, nullptr, 0);
  return cudaGetErrorName(cudaGetLastError());
}

}  // namespace

std::string selftest(const std::string& name) {
  std::vector<int> out(2048, 0);
  if (name == "shuffles") {
    PYREG_LAUNCH(shuffle_kernel, 1, 64, 0, nullptr, out.data());
    for (int t = 0; t < 64; ++t)
      for (int k = 0; k < 6; ++k)
        if (out[6 * t + k] != expect_shuffle(t, k))
          return "thread " + std::to_string(t) + " shuffle " + std::to_string(k) + ": got " +
                 std::to_string(out[6 * t + k]) + ", want " + std::to_string(expect_shuffle(t, k));
    return "ok";
  }
  if (name == "barriers") {
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    const unsigned nb = 12, nt = 64;
    std::vector<long long> sums(nb, -1);
    unsigned counter = 0;
    PYREG_LAUNCH(barrier_kernel, grid, block, 0, nullptr, sums.data(), &counter);
    if (cudaGetLastError() != cudaSuccess) return "launch failed";
    for (unsigned b = 0; b < nb; ++b)
      if (sums[b] != (long long)(b + 1) * nt * (nt + 1) / 2)
        return "block " + std::to_string(b) + ": sum " + std::to_string(sums[b]);
    return counter == nb ? "ok" : "counter " + std::to_string(counter);
  }
#if defined(PYREG_CUDA_EMU_FMA)
  if (name == "contracted") return "on";  // built with PYREG_CUDA_EMU_FMA=ON
#else
  if (name == "contracted") return "off";
#endif
  if (name == "neighbour_racy") return check_neighbour(false);
  if (name == "neighbour_synced") return check_neighbour(true);
  if (name == "vector_aligned") {
    for (int kind = 0; kind < 4; ++kind) {
      const std::string r = run_vectors(kind == 3 ? 8 : 16, kind);
      if (r != "ok") return "kind " + std::to_string(kind) + ": " + r;
    }
    return "ok";
  }
  if (name == "misaligned_float4_load") return run_vectors(4, 0) + " (no abort)";
  if (name == "misaligned_uint4_store") return run_vectors(8, 1) + " (no abort)";
  if (name == "misaligned_ldg_double2") return run_vectors(8, 2) + " (no abort)";
  if (name == "misaligned_float2_load") return run_vectors(4, 3) + " (no abort)";
  if (name == "launch_max_grid_y") return launch_error(dim3(1, 65535), dim3(1), 0);
  if (name == "launch_max_block") return launch_error(dim3(2), dim3(16, 8, 8), 0);
  if (name == "launch_grid_x") return launch_error(dim3(0x80000000u), dim3(1), 0);
  if (name == "launch_grid_y") return launch_error(dim3(1, 65536), dim3(1), 0);
  if (name == "launch_grid_z") return launch_error(dim3(1, 1, 65536), dim3(1), 0);
  if (name == "launch_empty_grid") return launch_error(dim3(0), dim3(32), 0);
  if (name == "launch_block_1025") return launch_error(dim3(1), dim3(1025), 0);
  if (name == "launch_block_z_65") return launch_error(dim3(1), dim3(1, 1, 65), 0);
  if (name == "launch_block_2048_as_2d") return launch_error(dim3(1), dim3(64, 32), 0);
  if (name == "launch_dynamic_shared") return launch_error(dim3(1), dim3(32), 48 * 1024 + 1);
  if (name == "shared_too_big") PYREG_LAUNCH(big_shared_kernel, 1, 32, 0, nullptr, out.data());
  else if (name == "mask_inactive_lane") PYREG_LAUNCH(mask_inactive_kernel, 1, 48, 0, nullptr, out.data());
  else if (name == "mask_excludes_caller") PYREG_LAUNCH(mask_excludes_caller_kernel, 1, 32, 0, nullptr, out.data());
  else if (name == "mask_diverged") PYREG_LAUNCH(mask_diverged_kernel, 1, 32, 0, nullptr, out.data());
  else if (name == "barrier_diverged") PYREG_LAUNCH(barrier_diverged_kernel, 1, 64, 0, nullptr, out.data());
  else if (name == "barrier_vs_shuffle") PYREG_LAUNCH(barrier_vs_shuffle_kernel, 1, 32, 0, nullptr, out.data());
  else return "unknown self-test " + name;
  return "no abort";  // each of these should have aborted
}

}  // namespace pyreg::emu
