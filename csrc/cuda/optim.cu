// optim.cu: the fused optimizer step on CUDA (kernels_api.h: optim_step),
// on a GPU or against the CUDA emulator. The chunking, checks and device
// guard are common.cuh's.
//
// Chunked like the element-wise ops: tensors are cut into chunks (chunk_shift),
// tensors are grouped into batches of kMaxOptimTensors described by value in
// the kernel arguments (OptimBatch), one block per chunk. Each block reads its
// tensor's group row of the hyperparameter table and its step counter (device
// memory, so a captured CUDA graph replays with the current values), computes
// the per-tensor scalars in double, then each thread updates its elements
// (csrc/common/optim_math.h): param, grad and state read once, written once,
// staged in registers as 16-byte vectors when the chunk's pointers are all
// aligned (optim_kernel.cuh).
// The last block of a launch to finish (a ticket, OptimSpec::ticket)
// increments the batch's step counters, which every block read before: one
// launch per batch. With found_inf nonzero every block returns at once:
// nothing changes.
//
// The kernel and its per-algorithm units: optim_kernel.cuh.
#include "optim_kernel.cuh"

namespace pyreg {
namespace PYREG_CUDA_NS {
namespace {

// ---- host side ------------------------------------------------------------------
std::vector<OptimBatch> optim_plan(const OptimList& l, const OptimSpec& s) {
  check_list(l.w, nullptr, nullptr);
  const int64_t n = l.w.size();
  auto sized = [&](const std::vector<void*>& v, const char* what, bool required) {
    if ((required || !v.empty()) && int64_t(v.size()) != n)
      fail(std::string("optim_step: ") + what + " differ in length from the params");
  };
  sized(l.grads, "grads", true);
  sized(l.s1, "state buffers", false);
  sized(l.s2, "state buffers", false);
  sized(l.s3, "state buffers", false);
  sized(l.steps, "step counters", s.algo != kSgd);
  if (int64_t(l.group.size()) != n) fail("optim_step: group indices differ in length from the params");
  if (s.algo == kSgd && !l.s1.empty() && int64_t(l.fresh.size()) != n)
    fail("optim_step: fresh flags differ in length from the params");
  if (s.algo < kSgd || s.algo > kRmsprop) fail("optim_step: unknown algorithm");
  if (s.step_dtype != kFloat32 && s.step_dtype != kFloat64) fail("optim_step: step counters must be float32 or float64");
  if (s.hyper == nullptr && n > 0) fail("optim_step: null hyperparameter table");
  if (s.algo != kSgd && s.ticket == nullptr && n > 0) fail("optim_step: null step ticket");
  auto need = [&](const std::vector<void*>& v, int64_t t, const char* what) {
    if (v.empty() || v[t] == nullptr) fail(std::string("optim_step: null ") + what + " for tensor " + std::to_string(t));
  };
  std::vector<OptimBatch> out;
  OptimBatch cur;
  std::memset(&cur, 0, sizeof(cur));
  int64_t rel = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (l.group[t] < 0 || l.group[t] >= l.n_groups) fail("optim_step: group index out of range");
    if (s.algo != kSgd) need(l.steps, t, "step counter");
    const int64_t numel = l.w.numels[t];
    if (numel > 0) {
      need(l.grads, t, "grad");
      if (s.algo != kSgd) need(l.s1, t, "state buffer"); 
      if (s.algo == kAdam) need(l.s2, t, "state buffer");
      if (s.algo == kAdam && s.amsgrad) need(l.s3, t, "state buffer");
      if (s.algo == kRmsprop && s.centered) need(l.s3, t, "state buffer");
    }
    const int64_t ch = chunks_of(numel);
    if (ch > kMaxGrid) fail("tensor " + std::to_string(t) + " is too large");
    if (cur.nt == kMaxOptimTensors || rel + ch > kMaxGrid) {
      cur.cstart[cur.nt] = int32_t(rel);
      out.push_back(cur);
      std::memset(&cur, 0, sizeof(cur));
      rel = 0;
    }
    const int k = cur.nt++;
    auto get = [&](const std::vector<void*>& v) { return v.empty() ? nullptr : v[t]; };
    cur.p[k] = l.w.ptrs[t];
    cur.g[k] = get(l.grads);
    cur.s1[k] = get(l.s1);
    cur.s2[k] = get(l.s2);
    cur.s3[k] = get(l.s3);
    cur.step[k] = get(l.steps);
    cur.numel[k] = numel;
    cur.group[k] = l.group[t];
    cur.dtype[k] = int8_t(l.w.dtypes[t]);
    cur.shift[k] = int8_t(chunk_shift(numel));
    cur.fresh[k] = l.fresh.empty() ? 0 : l.fresh[t];
    cur.cstart[k] = int32_t(rel);
    rel += ch;
  }
  cur.cstart[cur.nt] = int32_t(rel);
  if (cur.nt > 0) out.push_back(cur);
  return out;
}

}  // namespace

std::vector<KernelRef> optim_kernels() {
  return {
      optim_sgd_kernel(),
      optim_adam_kernel(),
      optim_adagrad_kernel(),
      optim_rmsprop_kernel(),
  };
}

void optim_step(const OptimList& l, const OptimSpec& s, const Launch& at) {
  const std::vector<OptimBatch> batches = optim_plan(l, s);
  if (batches.empty()) return;
  DeviceGuard guard(at.device);
  (void)cudaGetLastError();
  cudaStream_t st = reinterpret_cast<cudaStream_t>(at.stream);
  for (const OptimBatch& b : batches) {
    // A batch without elements still counts its steps (SGD has none).
    if (b.cstart[b.nt] == 0 && s.algo == kSgd) continue;
    const dim3 grid(unsigned(b.cstart[b.nt] > 0 ? b.cstart[b.nt] : 1));
    switch (s.algo) {
      case kSgd: launch_optim_sgd(b, s, grid, st); break;
      case kAdam: launch_optim_adam(b, s, grid, st); break;
      case kRmsprop: launch_optim_rmsprop(b, s, grid, st); break;
      default: launch_optim_adagrad(b, s, grid, st); break;
    }
    check(cudaGetLastError(), "optim_step kernel launch");
  }
}

}  // namespace PYREG_CUDA_NS
}  // namespace pyreg
