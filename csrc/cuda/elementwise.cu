// elementwise.cu: pyreg's element-wise CUDA ops (weight_stats, penalty,
// add_penalty_grad, prox, l2_bound; see kernels.h for the contracts and csrc/cpu/ for
// the exact semantics they reproduce). The group ops are in group.cu, the
// fused optimizer step in optim.cu; what they share in common.cuh.
//
// Multi-tensor, chunked design (like PyTorch's MultiTensorApply / apex):
//   * Every tensor is cut into chunks (kSmallChunk elements for tensors under
//     kBigTensor elements, kChunk for larger ones: a model of a few million
//     parameters still gives several blocks per SM, and the last wave of
//     blocks is short; the chunk size depends only on the tensor's own size,
//     so its results do not depend on the rest of the list); the chunks of all
//     tensors, in tensor order, are numbered 0..C-1 ("global chunk index").
//   * The host groups consecutive tensors into batches of at most kMaxTensors
//     and describes each batch BY VALUE in a kernel argument (struct Batch,
//     well under the classic 4 KB parameter limit): data pointers, grad
//     pointers, numels, dtype codes and each tensor's first chunk relative to
//     the batch. One launch per batch (a single launch for lists of up to
//     kMaxTensors tensors); block b of a launch processes the batch's chunk b
//     and finds its tensor by binary search over the chunk starts.
//   * Each thread sums its share of a chunk (at most 128 elements) in the
//     compute type (float32 for 32- and 16-bit data: GPUs without fast FP64
//     stay memory-bound) and folds it into float64; a share whose float32
//     sums left float32's range is summed again in float64, as on the CPU.
//   * Each block reduces its chunk to one Partial (sum|w|, sum w^2, max|w|,
//     nnz) with a fixed-order tree and writes it to the workspace at its global
//     chunk index. Block 0 of each launch also writes the batch's per-tensor
//     chunk ranges (first[t]) into the workspace, so the finishing kernel needs
//     no host->device copy.
//   * ONE finishing launch: a warp per tensor folds that tensor's chunk
//     partials (lane-strided in chunk order, then a fixed shuffle tree) and
//     writes the per-tensor results. For the penalty, each tensor's term
//     l1*s1 + l2*s2 goes to the workspace and the last block to finish (an
//     integer ticket; no floating-point atomics) folds the terms in a fixed
//     order and writes the value.
// Every reduction order depends only on the tensor sizes: same input, same bits.
//
// Nothing here synchronizes with the host, copies host memory or allocates:
// the ops can be captured in a CUDA graph.
//
// The per-element math lives in csrc/common/op_math.h, shared with the CPU
// kernels; this file keeps iteration, chunking and reductions. Every launch
// goes through PYREG_LAUNCH and every shared variable through PYREG_SHARED
// (launch.h), so the file also compiles as host C++ against the CUDA emulator
// (csrc/cuda/emu/), which runs these kernels in CI without a GPU.
//
// Workspace layout (see Layout): [counter: 16 B][first: int64 x (n+1)]
// [terms: double x n][parts: Partial x (an upper bound of C)], each piece
// 16-byte aligned.
#include "common.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {

constexpr int kMaxTensors = kParamBytes > 4096 ? 800 : 96;  // tensors per launch (by-value metadata)

// ---------------------------------------------------------------------------
// Kernel arguments
// ---------------------------------------------------------------------------
struct Batch {
  void* x[kMaxTensors];            // data pointers
  void* g[kMaxTensors];            // grad pointers (add_penalty_grad only)
  const void* r[kMaxTensors];      // reference pointers (ops toward a reference), or null
  int64_t numel[kMaxTensors];
  int32_t cstart[kMaxTensors + 1];  // first chunk of each tensor, relative to chunk0
  int8_t dtype[kMaxTensors];
  int8_t shift[kMaxTensors];       // log2 of the tensor's chunk size
  int64_t chunk0;                  // global index of the batch's first chunk
  int32_t t0;                      // global index of the batch's first tensor
  int32_t nt;                      // tensors in this batch (0 only for an empty list)
};

static_assert(sizeof(Batch) + sizeof(Coefs) + sizeof(Work) <= kParamBytes - kParamSlack,
              "chunk kernel arguments must fit in the kernel parameter space (launch.h)");
static_assert(kChunk * 8 < INT_MAX, "chunk lengths are int");
static_assert(kChunk / kThreads <= 128, "a thread's float32 run is at most 128 elements");

// Per-tensor constants of an op, in the compute type.
template <typename A>
struct Params {
  A c1, c2;            // add_penalty_grad: l1, 2*l2
  ProxParams<A> prox;  // prox
};

// Thread accumulators, in the compute type A: a thread's share of a chunk is
// at most 128 elements, a short run that float32 sums as accurately as the
// CPU kernels' lanes; run_chunk folds it into float64 (again in float64 when
// out of float32's range).
template <typename A>
struct Acc {
  A s1 = A(0), s2 = A(0), mx = A(0);
  int nnz = 0;
};

// The per-element work of each op, reading (and for grad/prox writing) storage.
// kRef: toward the reference value rv (d = x - rv in place of x).
template <int kOp, bool kRef, typename T, typename A>
__device__ __forceinline__ void element(T& xv, T& gv, T rv, const Params<A>& p, Acc<A>& acc) {
  if constexpr (kOp == kScale) {
    xv = store<T>(load<A>(xv) * p.c1);
  } else if constexpr (kOp == kProx) {
    if constexpr (kRef) {
      const T o = prox_toward<T>(load<A>(xv), load<A>(rv), p.prox);
      xv = o;
      acc.nnz += load<A>(o) != load<A>(rv) ? 1 : 0;  // elements left different from the reference
    } else {
      const T o = store<T>(prox_value(load<A>(xv), p.prox));
      xv = o;
      acc.nnz += load<A>(o) != A(0) ? 1 : 0;  // nonzeros of what was stored
    }
  } else {
    const A v = kRef ? A(load<A>(xv) - load<A>(rv)) : load<A>(xv);
    const A a = abs_of(v);
    acc.s1 += a;
    acc.s2 += v * v;
    if constexpr (kOp == kStats) {
      acc.mx = a > acc.mx ? a : acc.mx;
      acc.nnz += v != A(0) ? 1 : 0;
    }
    if constexpr (kOp == kGrad) gv = store<T>(load<A>(gv) + grad_term(v, p.c1, p.c2));
  }
  (void)gv;
  (void)rv;
}

// Visits this thread's elements of a chunk of len elements in a fixed order:
// vec(i) for its 16-byte vectors i (nv of them in all), then one(i) for its
// elements of the scalar tail.
template <typename V, typename S>
__device__ __forceinline__ void for_my_elements(int nv, int vw, int len, V&& vec, S&& one) {
#pragma unroll 4
  for (int i = threadIdx.x; i < nv; i += kThreads) vec(i);
  for (int i = nv * vw + int(threadIdx.x); i < len; i += kThreads) one(i);
}

// One chunk (len elements at x, and g for grads) by the whole block; returns
// this thread's share as a Partial (before the block reduction).
template <int kOp, bool kRef, typename T>
__device__ __forceinline__ Partial run_chunk(void* xbase, void* gbase, const void* rbase,
                                             int64_t begin, int len, const Coefs& c, int t) {
  using A = opmath_t<T>;
  T* __restrict__ x = static_cast<T*>(xbase) + begin;
  T* __restrict__ g = kOp == kGrad ? static_cast<T*>(gbase) + begin : nullptr;
  const T* __restrict__ r = kRef ? static_cast<const T*>(rbase) + begin : nullptr;

  Params<A> p{};
  if constexpr (kOp == kGrad) {
    p.c1 = A(coef_at(c.l1, t));
    p.c2 = A(2.0 * coef_at(c.l2, t));
  }
  if constexpr (kOp == kProx) p.prox = prox_params<A>(coef_at(c.l1, t), coef_at(c.l2, t), coef_at(c.lr, t));
  if constexpr (kOp == kScale) p.c1 = A(coef_at(c.l1, t));

  Acc<A> acc;
  // 16-byte vectors when the chunk start is 16-byte aligned (chunks are a
  // multiple of 16 bytes, so that is the tensor's alignment), scalar tails.
  constexpr int V = 16 / int(sizeof(T));
  const uintptr_t mis = (reinterpret_cast<uintptr_t>(x) |
                         (kOp == kGrad ? reinterpret_cast<uintptr_t>(g) : uintptr_t(0)) |
                         (kRef ? reinterpret_cast<uintptr_t>(r) : uintptr_t(0))) & 15u;
  const int nv = mis == 0 ? len / V : 0;
  for_my_elements(
      nv, V, len,
      [&](int i) {
        uint4 rx = reinterpret_cast<const uint4*>(x)[i];
        T vx[V];
        memcpy(vx, &rx, 16);
        T vr[V];
        if constexpr (kRef) {
          const uint4 rr = reinterpret_cast<const uint4*>(r)[i];
          memcpy(vr, &rr, 16);
        } else {
          memcpy(vr, &rx, 16);  // unused
        }
        if constexpr (kOp == kGrad) {
          uint4 rg = reinterpret_cast<const uint4*>(g)[i];
          T vg[V];
          memcpy(vg, &rg, 16);
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, kRef, T, A>(vx[k], vg[k], vr[k], p, acc);
          memcpy(&rg, vg, 16);
          reinterpret_cast<uint4*>(g)[i] = rg;
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) element<kOp, kRef, T, A>(vx[k], vx[k], vr[k], p, acc);
          if constexpr (kOp == kProx || kOp == kScale) {
            memcpy(&rx, vx, 16);
            reinterpret_cast<uint4*>(x)[i] = rx;
          }
        }
      },
      [&](int i) {
        T xv = x[i];
        const T rv = kRef ? r[i] : xv;
        if constexpr (kOp == kGrad) {
          T gv = g[i];
          element<kOp, kRef, T, A>(xv, gv, rv, p, acc);
          g[i] = gv;
        } else {
          element<kOp, kRef, T, A>(xv, xv, rv, p, acc);
          if constexpr (kOp == kProx || kOp == kScale) x[i] = xv;
        }
      });
  Partial out{double(acc.s1), double(acc.s2), double(acc.mx), int64_t(acc.nnz)};
  if constexpr (kOp != kProx && kOp != kScale && sizeof(A) < sizeof(double)) {
    if (out_of_float_range(acc.s1, acc.s2)) {
      // Rare: this thread's elements again, in float64 (the spec). The weights
      // were only read (grads are written, weights never), so they are intact.
      double d1 = 0.0, d2 = 0.0;
      auto add = [&](int i) {
        const double d = kRef ? double(load<A>(x[i])) - double(load<A>(r[i])) : double(load<A>(x[i]));
        d1 += fabs(d);
        d2 += d * d;
      };
      for_my_elements(
          nv, V, len,
          [&](int i) {
            for (int k = 0; k < V; ++k) add(i * V + k);
          },
          add);
      out.s1 = d1;
      out.s2 = d2;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------
template <int kOp>
__global__ void __launch_bounds__(kThreads) chunk_kernel(PYREG_PARAM(Batch) b, const Coefs c, const Work w) {
  const int cidx = int(blockIdx.x);
  if (cidx == 0) {
    // This batch's tensor -> chunk map, for the finishing kernel. Entry t0+nt
    // is also written by the next batch, with the same value.
    for (int k = int(threadIdx.x); k <= b.nt; k += kThreads)
      w.first[b.t0 + k] = b.chunk0 + b.cstart[k];
    if constexpr (kOp == kBound)  // each tensor's numel, for the finishing kernel
      for (int k = int(threadIdx.x); k < b.nt; k += kThreads) w.terms[b.t0 + k] = double(b.numel[k]);
    if (b.t0 == 0 && threadIdx.x == 0) *w.counter = 0u;
  }
  if (cidx >= b.cstart[b.nt]) return;  // only for a batch without chunks (grid of 1)

  // The tensor owning this chunk: the largest k with cstart[k] <= cidx (empty
  // tensors share their cstart with the next tensor, so they are never picked).
  int lo = 0, hi = b.nt - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (b.cstart[mid] <= cidx) lo = mid;
    else hi = mid - 1;
  }
  const int k = lo;
  const int64_t chunk = int64_t(1) << b.shift[k];
  const int64_t begin = int64_t(cidx - b.cstart[k]) * chunk;
  const int64_t rest = b.numel[k] - begin;
  const int len = int(rest < chunk ? rest : chunk);
  const int t = b.t0 + k;
  if constexpr (kOp == kScale) {
    if (coef_at(c.l1, t) == 1.0) return;  // the tensor keeps its bits (block-uniform)
  }

  Partial p;
  if (kOp != kStats && b.r[k] != nullptr) {
    switch (b.dtype[k]) {
      case kFloat64: p = run_chunk<kOp, true, double>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      case kFloat16: p = run_chunk<kOp, true, half_t>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      case kBFloat16: p = run_chunk<kOp, true, bf16_t>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
      default: p = run_chunk<kOp, true, float>(b.x[k], b.g[k], b.r[k], begin, len, c, t); break;
    }
  } else {
    switch (b.dtype[k]) {
      case kFloat64: p = run_chunk<kOp, false, double>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      case kFloat16: p = run_chunk<kOp, false, half_t>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      case kBFloat16: p = run_chunk<kOp, false, bf16_t>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
      default: p = run_chunk<kOp, false, float>(b.x[k], b.g[k], nullptr, begin, len, c, t); break;
    }
  }
  if constexpr (kOp != kScale) {
    p = block_reduce(p);
    if (threadIdx.x == 0) w.parts[b.chunk0 + cidx] = p;
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
// Sized for the most chunks n tensors of `total` elements can have:
// sum ceil(numel_i / chunk_i) <= total / kSmallChunk + n.
struct Layout {
  int64_t first, terms, parts, total;
  Layout(int64_t n, int64_t numel) {
    const int64_t chunks = numel / kSmallChunk + n;
    first = 16;
    terms = first + align16(8 * (n + 1));
    parts = terms + align16(8 * n);
    total = parts + int64_t(sizeof(Partial)) * (chunks > 0 ? chunks : 1);
  }
  explicit Layout(const TensorList& w) : Layout(w.size(), total_numel(w)) {}
  static int64_t total_numel(const TensorList& w) {
    int64_t s = 0;
    for (int64_t k : w.numels) s += k > 0 ? k : 0;
    return s;
  }
};

std::vector<Batch> plan(const TensorList& w, void* const* grads, const void* const* refs) {
  check_list(w, grads, refs);
  const int64_t n = w.size();
  std::vector<Batch> out;
  Batch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t chunk0 = 0, rel = 0;  // rel: chunks in `cur` so far
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = w.numels[t];
    const int code = w.dtypes[t];
    const int64_t ch = chunks_of(numel);
    if (ch > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxTensors || rel + ch > kMaxGrid) {  // close the batch
      cur.cstart[cur.nt] = int32_t(rel);
      out.push_back(cur);
      chunk0 += rel;
      std::memset(&cur, 0, sizeof(cur));
      cur.t0 = int32_t(t);
      rel = 0;
    }
    cur.chunk0 = chunk0;
    const int k = cur.nt++;
    cur.x[k] = w.ptrs[t];
    cur.g[k] = grads != nullptr ? grads[t] : nullptr;
    cur.r[k] = refs != nullptr ? refs[t] : nullptr;
    cur.numel[k] = numel;
    cur.dtype[k] = int8_t(code);
    cur.shift[k] = int8_t(chunk_shift(numel));
    cur.cstart[k] = int32_t(rel);
    rel += ch;
  }
  cur.chunk0 = chunk0;
  cur.cstart[cur.nt] = int32_t(rel);
  out.push_back(cur);  // always at least one batch (n == 0: nt == 0, no chunks)
  return out;
}

Work work_of(const TensorList& w, void* workspace) {
  if (workspace == nullptr) fail("null workspace");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) fail("workspace is not 16-byte aligned");
  const Layout lay(w);
  char* base = static_cast<char*>(workspace);
  return Work{reinterpret_cast<unsigned*>(base), reinterpret_cast<int64_t*>(base + lay.first),
              reinterpret_cast<double*>(base + lay.terms),
              reinterpret_cast<Partial*>(base + lay.parts)};
}

template <int kOp>
void launch_chunks(const std::vector<Batch>& batches, const Coefs& c, const Work& wk, cudaStream_t s,
                   const char* name) {
  for (const Batch& b : batches) {
    const int64_t blocks = b.cstart[b.nt] > 0 ? b.cstart[b.nt] : 1;
    PYREG_LAUNCH(chunk_kernel<kOp>, dim3(unsigned(blocks)), kThreads, 0, s, b, c, wk);
    check(cudaGetLastError(), (std::string(name) + " chunk kernel launch").c_str());
  }
}

template <int kOp, int kFin>
void launch(const TensorList& w, void* const* grads, const void* const* refs, const Coefs& c,
            const Outs& o, const Launch& at, const char* name) {
  const std::vector<Batch> batches = plan(w, grads, refs);
  const Work wk = work_of(w, at.workspace);
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();  // do not blame this launch for an earlier, non-sticky error
  cudaStream_t s = reinterpret_cast<cudaStream_t>(at.stream);
  launch_chunks<kOp>(batches, c, wk, s, name);
  const int64_t n = w.size();
  const int64_t fblocks = n > 0 ? (n + kWarps - 1) / kWarps : 1;
  PYREG_LAUNCH(finish_kernel<kFin>, dim3(unsigned(fblocks)), kThreads, 0, s, wk, n, c, o);
  check(cudaGetLastError(), (std::string(name) + " finishing kernel launch").c_str());
  if constexpr (kFin == kBound)  // each tensor by its factor, from the workspace (1: not written)
    launch_chunks<kScale>(batches, Coefs{Coef{wk.terms, 0.0}, Coef{nullptr, 0.0}, Coef{nullptr, 0.0}}, wk, s,
                          name);
}

}  // namespace

std::vector<KernelRef> elementwise_kernels() {
  return {
      {reinterpret_cast<const void*>(&chunk_kernel<kStats>), "chunk_kernel<stats>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kPenalty>), "chunk_kernel<penalty>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kGrad>), "chunk_kernel<grad>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kProx>), "chunk_kernel<prox>"},
      {reinterpret_cast<const void*>(&finish_kernel<kStats>), "finish_kernel<stats>"},
      {reinterpret_cast<const void*>(&finish_kernel<kPenalty>), "finish_kernel<penalty>"},
      {reinterpret_cast<const void*>(&finish_kernel<kProx>), "finish_kernel<prox>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kBound>), "chunk_kernel<bound>"},
      {reinterpret_cast<const void*>(&finish_kernel<kBound>), "finish_kernel<bound>"},
      {reinterpret_cast<const void*>(&chunk_kernel<kScale>), "chunk_kernel<scale>"},
  };
}

int64_t workspace_bytes(int64_t n, int64_t total_numel) {
  if (n < 0 || total_numel < 0) fail("workspace_bytes: negative size");
  return Layout(n, total_numel).total;
}

void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                  int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{l1, l2, linf, nnz, nullptr, out_dtype};
  const Coef none{nullptr, 0.0};
  launch<kStats, kStats>(w, nullptr, nullptr, Coefs{none, none, none}, o, at, "weight_stats");
}

void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out,
             int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kPenalty, kPenalty>(w, nullptr, refs, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at, "penalty");
}

void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1,
                      Coef l2, void* out, int out_dtype, const Launch& at) {
  check_out_dtype(out_dtype);
  if (grads == nullptr && w.size() > 0) fail("null grads");
  const Outs o{nullptr, nullptr, nullptr, nullptr, out, out_dtype};
  launch<kGrad, kPenalty>(w, grads, refs, Coefs{l1, l2, Coef{nullptr, 0.0}}, o, at,
                          "add_penalty_grad");
}

void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at) {
  const Outs o{nullptr, nullptr, nullptr, nnz, nullptr, kFloat64};
  launch<kProx, kProx>(w, nullptr, refs, Coefs{l1, l2, lr}, o, at, "prox");
}

void l2_bound(const TensorList& w, double* lam, double* kappa, int64_t* steps, Coef bound, Coef mu, Coef warmup,
              const Launch& at) {
  if (w.size() > 0 && (lam == nullptr || kappa == nullptr || steps == nullptr)) fail("null l2_bound state");
  Outs o{nullptr, nullptr, nullptr, nullptr, nullptr, kFloat64};
  o.lam = lam;
  o.kappa = kappa;
  o.steps = steps;
  launch<kBound, kBound>(w, nullptr, nullptr, Coefs{bound, mu, warmup}, o, at, "l2_bound");
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
