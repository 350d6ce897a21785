// select.cu: kth_abs on CUDA (kernels_api.h for the contract; csrc/cpu/select.cpp
// for the CPU's), a radix selection on the magnitudes' bit patterns: with the
// sign bit cleared, a float's bits (any of the four formats) order as its
// magnitude does, and every NaN's lie above infinity's (NaN the largest).
//
// The key of a tensor's k-th magnitude is found 8 bits at a time, from the
// top (2 levels for 16-bit tensors, 4 for float32, 8 for float64):
//   * count_kernel: one block per chunk of a tensor counts, in shared memory,
//     the digit of each key whose higher bits are the k-th key's found so far,
//     and adds its counts into the tensor's 256 bins (integer atomics: the
//     counts, and so the result, do not depend on the order);
//   * pick_kernel: one block per tensor scans its bins and finds the digit
//     holding the k-th key, adds the counts below it, and clears the bins.
// Then, for `closest`, one more pass takes the largest key below the k-th
// (an integer atomicMax), and finish_select writes each tensor's value.
// Nothing synchronizes with the host or copies host memory: k travels in the
// kernel arguments.
//
// Workspace: [states: SelState x n][bins: uint64 x 256 x n], 16-byte aligned.
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {

constexpr int kMaxSel = kParamBytes > 4096 ? 600 : 64;  // tensors per launch (by-value metadata)
constexpr int kSelChunkShift = 14;                      // 16384 elements per block
constexpr int kBins = 256;                              // 8-bit digits

struct SelBatch {
  const void* x[kMaxSel];
  int64_t numel[kMaxSel];
  int64_t k[kMaxSel];
  int32_t cstart[kMaxSel + 1];  // first chunk of each tensor in this launch
  int8_t dtype[kMaxSel];
  int32_t t0;  // global index of the batch's first tensor
  int32_t nt;  // tensors in the batch
};

static_assert(sizeof(SelBatch) + 64 <= kParamBytes - kParamSlack,
              "selection kernel arguments must fit in the kernel parameter space (launch.h)");

// One tensor's selection so far: the k-th key's bits found (`prefix`), the
// keys below every key that still matches it (`below`), at the end the keys
// equal to it (`eq`) and the largest key below it (`lower`, for closest).
struct SelState {
  unsigned long long prefix;
  long long below;
  long long eq;
  unsigned long long lower;
};

__device__ __forceinline__ int key_bits(int dtype) { return dtype == kFloat64 ? 63 : dtype == kFloat32 ? 31 : 15; }

__device__ __forceinline__ unsigned long long key_at(const void* x, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat64: return static_cast<const unsigned long long*>(x)[i] & 0x7fffffffffffffffull;
    case kFloat32: return static_cast<const unsigned*>(x)[i] & 0x7fffffffu;
    default: return static_cast<const unsigned short*>(x)[i] & 0x7fffu;
  }
}

// The value of a key, and whether it is a NaN's.
__device__ __forceinline__ double key_value(unsigned long long key, int dtype) {
  switch (dtype) {
    case kFloat64: {
      double d;
      memcpy(&d, &key, 8);
      return d;
    }
    case kFloat32: return double(bits_f32(unsigned(key)));
    case kFloat16: return double(half_to_float(half_t{static_cast<uint16_t>(key)}));
    default: return double(bf16_to_float(bf16_t{static_cast<uint16_t>(key)}));
  }
}

__device__ __forceinline__ bool key_is_nan(unsigned long long key, int dtype) {
  const unsigned long long inf = dtype == kFloat64   ? 0x7ff0000000000000ull
                                 : dtype == kFloat32 ? 0x7f800000ull
                                 : dtype == kFloat16 ? 0x7c00ull
                                                     : 0x7f80ull;
  return key > inf;
}

// Level `level` reads bits [lo, hi) of a key: hi = bits - 8 * level, lo =
// max(0, hi - 8); a tensor whose hi is <= 0 is done.
__device__ __forceinline__ void level_bits(int dtype, int level, int& hi, int& lo) {
  hi = key_bits(dtype) - 8 * level;
  lo = hi > 8 ? hi - 8 : 0;
}

__global__ void __launch_bounds__(kBins) clear_kernel(SelState* st, unsigned long long* bins, int64_t n) {
  const int64_t t = blockIdx.x;
  if (t >= n) return;
  bins[t * kBins + threadIdx.x] = 0ull;
  if (threadIdx.x == 0) st[t] = SelState{0ull, 0ll, 0ll, 0ull};
}

// kLower: the pass for `closest` (the largest key below the k-th); else the
// digit counts of `level`.
template <bool kLower>
__global__ void __launch_bounds__(kThreads) count_kernel(PYREG_PARAM(SelBatch) b, SelState* st,
                                                         unsigned long long* bins, int level) {
  const int cidx = int(blockIdx.x);
  if (cidx >= b.cstart[b.nt]) return;
  const int k = owner(b.cstart, b.nt, cidx);
  const int t = b.t0 + k;
  if (b.k[k] == 0) return;  // nothing to select (block-uniform, as below)
  const int dtype = b.dtype[k];
  int hi, lo;
  level_bits(dtype, level, hi, lo);
  if (!kLower && hi <= 0) return;
  const unsigned long long prefix = st[t].prefix;
  const int64_t begin = int64_t(cidx - b.cstart[k]) << kSelChunkShift;
  const int64_t rest = b.numel[k] - begin;
  const int64_t len = rest < (int64_t(1) << kSelChunkShift) ? rest : (int64_t(1) << kSelChunkShift);
  const void* x = b.x[k];
  if constexpr (!kLower) {
    PYREG_SHARED(unsigned[kBins], h);
    for (int i = int(threadIdx.x); i < kBins; i += kThreads) h[i] = 0u;
    __syncthreads();
    const unsigned long long mask = (1ull << (hi - lo)) - 1ull;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const unsigned long long key = key_at(x, dtype, begin + i);
      if ((key >> hi) == (prefix >> hi)) atomicAdd(&h[(key >> lo) & mask], 1u);
    }
    __syncthreads();
    for (int i = int(threadIdx.x); i < kBins; i += kThreads)
      if (h[i] != 0u) atomicAdd(&bins[int64_t(t) * kBins + i], static_cast<unsigned long long>(h[i]));
  } else {
    unsigned long long m = 0ull;  // the largest key below the k-th among this thread's (0: none)
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const unsigned long long key = key_at(x, dtype, begin + i);
      m = key < prefix && key > m ? key : m;
    }
    PYREG_SHARED(unsigned long long[kWarps], wm);
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned long long o = __shfl_down_sync(0xffffffffu, m, off);
      m = o > m ? o : m;
    }
    if ((threadIdx.x & 31) == 0) wm[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kWarps; ++w) m = wm[w] > m ? wm[w] : m;
      if (m != 0ull) atomicMax(&st[t].lower, m);
    }
  }
}

// One block of kBins threads per tensor of the batch: the digit of `level`
// that holds the k-th key (the first whose running count reaches k - below).
__global__ void __launch_bounds__(kBins) pick_kernel(PYREG_PARAM(SelBatch) b, SelState* st,
                                                     unsigned long long* bins, int level) {
  const int k = int(blockIdx.x);
  if (k >= b.nt || b.k[k] == 0) return;
  const int t = b.t0 + k;
  int hi, lo;
  level_bits(b.dtype[k], level, hi, lo);
  if (hi <= 0) return;
  unsigned long long* h = bins + int64_t(t) * kBins;
  // Read before the scan's barriers: the thread that finds the digit writes
  // the state after them, while no other thread reads it.
  const SelState was = st[t];
  const unsigned long long want = static_cast<unsigned long long>(b.k[k] - was.below);
  PYREG_SHARED(unsigned long long[kBins], cum);
  const unsigned long long mine = h[threadIdx.x];
  cum[threadIdx.x] = mine;
  __syncthreads();
  for (int off = 1; off < kBins; off <<= 1) {  // inclusive running sums (Hillis-Steele)
    const unsigned long long add = int(threadIdx.x) >= off ? cum[threadIdx.x - off] : 0ull;
    __syncthreads();
    cum[threadIdx.x] += add;
    __syncthreads();
  }
  const unsigned long long before = cum[threadIdx.x] - mine;
  if (mine != 0ull && before < want && want <= cum[threadIdx.x]) {  // exactly one thread
    SelState s = was;
    s.prefix |= static_cast<unsigned long long>(threadIdx.x) << lo;
    s.below += static_cast<long long>(before);
    if (lo == 0) s.eq = static_cast<long long>(mine);
    st[t] = s;
  }
  h[threadIdx.x] = 0ull;  // clear for the next level (read above by this thread only)
}

__global__ void __launch_bounds__(kThreads) finish_select(PYREG_PARAM(SelBatch) b, const SelState* st, bool closest,
                                                          double* out) {
  const int k = int(blockIdx.x) * kThreads + int(threadIdx.x);
  if (k >= b.nt) return;
  const int t = b.t0 + k;
  const long long want = b.k[k];
  if (want == 0) {
    out[t] = 0.0;
    return;
  }
  const SelState s = st[t];
  const int dtype = b.dtype[k];
  if (key_is_nan(s.prefix, dtype)) {
    out[t] = key_value(s.prefix, dtype);  // a NaN
    return;
  }
  const long long n_lt = s.below, n_le = s.below + s.eq;
  out[t] = closest && n_le - want > want - n_lt ? key_value(s.lower, dtype) : key_value(s.prefix, dtype);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
std::vector<SelBatch> plan_select(const TensorList& w, const int64_t* k, int& levels) {
  check_list(w, nullptr, nullptr);
  std::vector<SelBatch> out;
  SelBatch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t rel = 0;
  levels = 0;
  for (int64_t t = 0; t < w.size(); ++t) {
    const int64_t numel = w.numels[t];
    if (k[t] < 0 || k[t] > numel) fail("kth_abs: k out of [0, numel] for tensor " + std::to_string(t));
    const int64_t ch = (numel + (int64_t(1) << kSelChunkShift) - 1) >> kSelChunkShift;
    if (ch > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxSel || rel + ch > kMaxGrid) {
      cur.cstart[cur.nt] = int32_t(rel);
      out.push_back(cur);
      std::memset(&cur, 0, sizeof(cur));
      cur.t0 = int32_t(t);
      rel = 0;
    }
    const int i = cur.nt++;
    cur.x[i] = w.ptrs[t];
    cur.numel[i] = numel;
    cur.k[i] = k[t];
    cur.dtype[i] = int8_t(w.dtypes[t]);
    cur.cstart[i] = int32_t(rel);
    rel += ch;
    const int bits = w.dtypes[t] == kFloat64 ? 63 : w.dtypes[t] == kFloat32 ? 31 : 15;
    levels = std::max(levels, (bits + 7) / 8);
  }
  cur.cstart[cur.nt] = int32_t(rel);
  out.push_back(cur);
  return out;
}

}  // namespace

std::vector<KernelRef> select_kernels() {
  return {
      {reinterpret_cast<const void*>(&clear_kernel), "clear_kernel"},
      {reinterpret_cast<const void*>(&count_kernel<false>), "count_kernel<digits>"},
      {reinterpret_cast<const void*>(&count_kernel<true>), "count_kernel<lower>"},
      {reinterpret_cast<const void*>(&pick_kernel), "pick_kernel"},
      {reinterpret_cast<const void*>(&finish_select), "finish_select"},
  };
}

int64_t kth_abs_workspace_bytes(int64_t n) {
  if (n < 0) fail("kth_abs_workspace_bytes: negative size");
  return align16(int64_t(sizeof(SelState)) * (n > 0 ? n : 1)) + int64_t(sizeof(unsigned long long)) * kBins * (n > 0 ? n : 1);
}

void kth_abs(const TensorList& w, const int64_t* k, bool closest, double* out, const Launch& at) {
  const int64_t n = w.size();
  if (n == 0) return;
  if (at.workspace == nullptr || reinterpret_cast<uintptr_t>(at.workspace) % 16 != 0)
    fail("kth_abs: null or misaligned workspace");
  int levels = 0;
  const std::vector<SelBatch> batches = plan_select(w, k, levels);
  char* base = static_cast<char*>(at.workspace);
  SelState* st = reinterpret_cast<SelState*>(base);
  unsigned long long* bins =
      reinterpret_cast<unsigned long long*>(base + align16(int64_t(sizeof(SelState)) * n));
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();
  cudaStream_t s = reinterpret_cast<cudaStream_t>(at.stream);
  PYREG_LAUNCH(clear_kernel, dim3(unsigned(n)), kBins, 0, s, st, bins, n);
  check(cudaGetLastError(), "kth_abs clear launch");
  for (int level = 0; level < levels; ++level) {
    for (const SelBatch& b : batches) {
      const int64_t blocks = b.cstart[b.nt] > 0 ? b.cstart[b.nt] : 1;
      PYREG_LAUNCH(count_kernel<false>, dim3(unsigned(blocks)), kThreads, 0, s, b, st, bins, level);
      check(cudaGetLastError(), "kth_abs count launch");
    }
    for (const SelBatch& b : batches) {
      PYREG_LAUNCH(pick_kernel, dim3(unsigned(b.nt > 0 ? b.nt : 1)), kBins, 0, s, b, st, bins, level);
      check(cudaGetLastError(), "kth_abs pick launch");
    }
  }
  for (const SelBatch& b : batches) {
    if (closest) {
      const int64_t blocks = b.cstart[b.nt] > 0 ? b.cstart[b.nt] : 1;
      PYREG_LAUNCH(count_kernel<true>, dim3(unsigned(blocks)), kThreads, 0, s, b, st, bins, 0);
      check(cudaGetLastError(), "kth_abs lower launch");
    }
    PYREG_LAUNCH(finish_select, dim3(unsigned((b.nt + kThreads - 1) / kThreads > 0 ? (b.nt + kThreads - 1) / kThreads : 1)),
                 kThreads, 0, s, b, st, closest, out);
    check(cudaGetLastError(), "kth_abs finish launch");
  }
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
