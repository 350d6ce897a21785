// selftest.cpp: small kernels that check the CUDA emulator itself, built with
// it (PYREG_CUDA_EMU=ON) and reached from Python as _C.cuda_emu_selftest(name)
// (tests/test_emulator.py). Each kernel goes through PYREG_LAUNCH and
// PYREG_SHARED, as pyreg's own kernels do.
//
// "shuffles" and "barriers" run correct kernels and compare what the
// emulator computed with the CUDA semantics, worked out here on the host; they
// return "ok" or what differs. The "launch_*" cases make launches a GPU
// refuses and return the launch error's name. The remaining cases break a
// rule a GPU does not forgive (the emulator aborts the process with a message).
#include "selftest.h"

#include "cuda_runtime.h"
#include "../launch.h"

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
