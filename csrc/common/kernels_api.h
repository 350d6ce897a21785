// kernels_api.h: what every build of pyreg's kernels exports, as one table
// (Kernels), so that one binding template (csrc/bindings.cpp) and one Python
// class (pyreg/backends/compiled.py) serve them all:
//
//   kCpu      the C++ kernels (csrc/cpu/*.cpp);
//   kCuda     the CUDA kernels built by nvcc (csrc/cuda/*.cu), or a stub;
//   kCudaEmu  the CUDA kernels built against the CUDA emulator
//             (csrc/cuda/emu/, PYREG_CUDA_EMU=ON), or a stub.
//
// Every op takes a TensorList (pointers, numels, dtype codes: no torch types),
// its coefficients as Coefs, its outputs as pointers, and a Launch: where it
// runs. Each build reads the fields it needs: the CPU kernels `nthreads`, the
// CUDA ones `workspace`, `device` and `stream`.
#pragma once
#include <cstdint>
#include <string>

#include "tensor_list.h"

namespace pyreg {

struct Launch {
  void* workspace;   // device scratch of workspace_bytes(n, total_numel) bytes (CUDA)
  int device;        // device index (CUDA)
  uintptr_t stream;  // cudaStream_t (CUDA; the emulator ignores it)
  int nthreads;      // threads of pyreg's pool (CPU)
};

struct Kernels {
  bool compiled;                   // false: a stub (this build was not made)
  std::string (*archs)();          // what the code was built for: "avx2+fma+f16c", "sm_80 sm_90"...
  int (*device_count)();           // 0 when no driver / no GPU (never throws)
  std::string (*runtime_error)();  // why device_count() is 0, if it is
  // Why the kernels cannot run on `device` (no kernel image for its compute
  // capability...), or "" when they can. On CUDA this also loads every
  // kernel's module, so a first launch inside CUDA graph capture loads nothing.
  std::string (*device_error)(int device);
  // Workspace bytes for any list of n tensors with `total_numel` elements in
  // all (an upper bound, so the caller needs no per-tensor sizes); 0 on the CPU.
  int64_t (*workspace_bytes)(int64_t n, int64_t total_numel);
  // CUDA builds: the kernel parameter space the tensor lists are batched for
  // (4096, or 32764 with CUDA 12.1's large kernel parameters: one launch per
  // kernel for a model's list), and the kernel launches made so far (for
  // tests). 0 on the CPU.
  int64_t (*param_bytes)();
  int64_t (*launch_count)();

  // Per tensor: l1 = sum|w|, l2 = sqrt(sum w^2), linf = max|w| (NaN if any w
  // is NaN), nnz = #(w != 0). Outputs in out_dtype (kFloat32/kFloat64), nnz int64.
  void (*weight_stats)(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                       int out_dtype, const Launch& at);
  // Toward a reference: `refs` (null, or one pointer per tensor, each like its
  // tensor: same dtype, numel and layout) replaces w by d = w - ref below.
  //
  // out[0] = sum_i l1_i * sum|d_i| + l2_i * sum d_i^2.
  void (*penalty)(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out,
                  int out_dtype, const Launch& at);
  // g_i += l1_i * sign(d_i) + 2 * l2_i * d_i (g_i has w_i's dtype and layout);
  // out[0] = the penalty of w, from the same pass.
  void (*add_penalty_grad)(const TensorList& w, const void* const* refs, void* const* grads,
                           Coef l1, Coef l2, void* out, int out_dtype, const Launch& at);
  // w_i <- sign(w_i) * max(|w_i| - lr_i * l1_i, 0) / (1 + 2 * lr_i * l2_i);
  // nnz[i] = count of nonzeros of w_i after the step. With refs:
  // w <- ref + prox(w - ref), each of the three steps rounded to w's dtype, and
  // nnz[i] counts the elements with w != ref after the step.
  void (*prox)(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr,
               int64_t* nnz, const Launch& at);

  // ---- group ops (csrc/common/group_plan.h: groups and their tiling) --------
  // Tensor i is seen, in memory order, as [outer_i, groups_i, inner_i]; its
  // group g is every element with index g in the middle dimension. Per-group
  // outputs hold the groups of tensor 0, then of tensor 1, ...
  //
  // Workspace bytes for the group ops on (w, gl).
  int64_t (*group_workspace_bytes)(const TensorList& w, const GroupList& gl);
  // norms[k] = ||w_g||_2 of every group, in out_dtype.
  void (*group_norms)(const TensorList& w, const GroupList& gl, void* norms, int out_dtype,
                      const Launch& at);
  // The exact prox of lr * (l1 |w|_1 + group_l1 sum_g ||w_g||_2 + l2 |w|^2):
  // s = the element soft-threshold of w by lr*l1 (rounded to w's dtype), then
  // w_g <- s_g * max(0, 1 - lr*group_l1 / ||s_g||_2) / (1 + 2*lr*l2).
  // nonzero[i] = groups of tensor i not set to zero.
  void (*group_prox)(const TensorList& w, const GroupList& gl, Coef l1, Coef group_l1, Coef l2,
                     Coef lr, int64_t* nonzero, const Launch& at);
  // w_g <- w_g * min(1, max_value / ||w_g||_2); clipped[i] = groups of tensor
  // i that were scaled (||w_g||_2 > max_value).
  void (*max_norm)(const TensorList& w, const GroupList& gl, Coef max_value, int64_t* clipped,
                   const Launch& at);
  // out[0] = sum_i group_l1_i * sum_g ||w_ig||_2.
  void (*group_penalty)(const TensorList& w, const GroupList& gl, Coef group_l1, void* out,
                        int out_dtype, const Launch& at);
  // g_i += group_l1_i * w_ig / ||w_ig||_2 (0 for a zero group); out[0] = the
  // group penalty of w, from the same call.
  void (*add_group_penalty_grad)(const TensorList& w, const GroupList& gl, void* const* grads,
                                 Coef group_l1, void* out, int out_dtype, const Launch& at);

  // ---- the fused optimizer step (csrc/common/optim_math.h) -----------------
  // One step of SGD, Adam/AdamW or Adagrad (spec.algo) on every tensor of
  // the list, then the prox of its group's l1/l2 (spec.prox), in one pass:
  // param, grad and state are read once and written once. Step counters are
  // incremented. With spec.found_inf pointing at a nonzero value nothing
  // changes; with spec.grad_scale the grads are divided by it (and stored so).
  void (*optim_step)(const OptimList& l, const OptimSpec& spec, const Launch& at);

  // ---- l2_bound (CPR; csrc/common/op_math.h cpr_update) ------------------------
  // Per tensor i, after the optimizer's step: steps[i] += 1, then lam[i],
  // kappa[i] (host or device float64, as the tensors) updated from
  // R = sum w_i^2 by cpr_update, and w_i <- w_i * (1 - 2 * lam[i]) (not
  // written where the factor is 1). Null in a stub (Python then runs the
  // rule in torch ops).
  void (*l2_bound)(const TensorList& w, double* lam, double* kappa, int64_t* steps, Coef bound, Coef mu,
                   Coef warmup, const Launch& at);

  // ---- selection -------------------------------------------------------------
  // out[i] = the k[i]-th smallest |w_i| (0 <= k[i] <= numel_i; 0 for k[i] = 0;
  // NaN counts as the largest), as a double: exact, no rounding. With
  // `closest`, where ties at it leave the count #(|w_i| <= out) farther from
  // k[i] than the largest |w_i| below it would, that one (0 if none). `out`
  // and the workspace on the tensors' device.
  void (*kth_abs)(const TensorList& w, const int64_t* k, bool closest, double* out, const Launch& at);
  // Workspace bytes kth_abs needs for n tensors (0 on the CPU).
  int64_t (*kth_abs_workspace_bytes)(int64_t n);
  // out[i] = kth_abs (k[i], not closest) of the push of tensor i's adaptive
  // step, P = adaptive_push(m, v, e[i], s[i]) (csrc/common/optim_math.h;
  // P = m / s[i] where v is null), computed in m's type: l1_strength's
  // refresh in one call, without the pushes in memory. m (and v) float32 or
  // float64, on the host. Null where not built (the CUDA builds: Python
  // computes the push in torch ops and selects with kth_abs).
  // With w (not null): the push plus a decoupled decay's term, decayed_push(P,
  // w_t, wd[i]), w the weights before the step (m's type).
  // With groups (not null; group_strength's refresh): out[i] = the k[i]-th
  // smallest L2 norm of the groups of tensor i's push (0 <= k[i] <= its
  // groups), the norms as group_norms gives them (float64 if any tensor is
  // float64, else float32), so the same bits as group_norms of the pushes
  // in memory, then kth_abs.
  void (*push_kth)(const TensorList& m, const void* const* v, const double* e, const double* s,
                   const void* const* w, const double* wd, const GroupList* groups, const int64_t* k, double* out,
                   const Launch& at);
  // target_sparsity in an adaptive optimizer's metric, in one call: for each
  // tensor t of w (float32 or float64, on the host) with v[t] (its state, of
  // w's type), d = metric_divisor(v, e[t], s[t], e[t] <= 0) and u = w * d
  // (csrc/common/optim_math.h), tau = the k[t]-th smallest |u| (as kth_abs,
  // `closest`), l1[t] = per_lr(tau, m[t]), and w <- metric_target_value(u,
  // tau, d + 2 * m[t] * l2[t]): the same bits as those steps in torch ops
  // and pyreg's ops (pyreg/optim/apply.py's _metric_target) where torch's
  // sqrt is correctly rounded, as this one is. Null where not
  // built (the CUDA builds: Python makes those calls).
  void (*metric_target)(const TensorList& w, const void* const* v, const double* e, const double* s,
                        const int64_t* k, bool closest, const double* m, const double* l2, double* l1,
                        const Launch& at);
};

extern const Kernels kCpu;
extern const Kernels kCuda;
extern const Kernels kCudaEmu;

}  // namespace pyreg
