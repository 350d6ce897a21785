// bindings.cpp: the pybind11 module pyreg._C. It only converts Python ints
// (data pointers, sizes, dtype codes, the CUDA stream) into TensorLists, and
// (pointer, value) pairs into Coefs, and calls the kernels with the GIL
// released. Validation happens in Python before anything reaches this file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/kernels_api.h"
#include "common/op_math.h"
#include "common/tensor_list.h"
#include "fast_list.h"
#include "fast_prox.h"
#include "strength_counts.h"
#if defined(PYREG_WITH_CUDA_EMU)
#include "cuda/emu/selftest.h"
#endif

namespace py = pybind11;
using pyreg::TensorList;

namespace {

using Ptrs = std::vector<uintptr_t>;
using Numels = std::vector<int64_t>;
using Codes = std::vector<int>;
// A coefficient from Python: (pointer to one double per tensor, value); a
// null pointer means `value` for every tensor.
using CoefArg = std::pair<uintptr_t, double>;

pyreg::Coef coef(const CoefArg& c) {
  return pyreg::Coef{reinterpret_cast<const double*>(c.first), c.second};
}

TensorList make_list(const Ptrs& ptrs, const Numels& numels, const Codes& dtypes) {
  if (ptrs.size() != numels.size() || ptrs.size() != dtypes.size())
    throw std::invalid_argument("pyreg._C: ptrs, numels and dtypes differ in length");
  TensorList w;
  w.ptrs.reserve(ptrs.size());
  for (uintptr_t p : ptrs) w.ptrs.push_back(reinterpret_cast<void*>(p));
  w.numels = numels;
  w.dtypes = dtypes;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) throw std::invalid_argument("pyreg._C: negative numel");
    if (dtypes[i] < 0 || dtypes[i] > 3) throw std::invalid_argument("pyreg._C: unknown dtype code");
    if (numels[i] > 0 && ptrs[i] == 0) throw std::invalid_argument("pyreg._C: null data pointer");
  }
  return w;
}

// Per-tensor pointers of a list paired with the tensors of `w` (grads,
// refs, state buffers): as many, and none null where its tensor has elements.
std::vector<void*> paired_ptrs(const Ptrs& p, const TensorList& w, const char* what) {
  if (p.size() != w.ptrs.size())
    throw std::invalid_argument(std::string("pyreg._C: ") + what + " differ in length from tensors");
  std::vector<void*> out;
  out.reserve(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0 && w.numels[i] > 0) throw std::invalid_argument(std::string("pyreg._C: null ") + what + " pointer");
    out.push_back(reinterpret_cast<void*>(p[i]));
  }
  return out;
}

std::vector<void*> as_ptrs(const Ptrs& p, const TensorList& w) { return paired_ptrs(p, w, "grads"); }

// Optional per-tensor pointers (refs): an empty list means none.
std::vector<void*> optional_ptrs(const Ptrs& p, const TensorList& w, const char* what) {
  if (p.empty()) return {};
  return paired_ptrs(p, w, what);
}

const void* const* data_or_null(const std::vector<void*>& v) { return v.empty() ? nullptr : v.data(); }

pyreg::GroupList make_groups(const TensorList& w, const Numels& outer, const Numels& groups,
                             const Numels& inner) {
  const size_t n = w.ptrs.size();
  if (outer.size() != n || groups.size() != n || inner.size() != n)
    throw std::invalid_argument("pyreg._C: group shapes differ in length from tensors");
  for (size_t i = 0; i < n; ++i) {
    if (outer[i] < 0 || groups[i] < 0 || inner[i] < 0 || outer[i] * groups[i] * inner[i] != w.numels[i])
      throw std::invalid_argument("pyreg._C: group shape does not match numel");
  }
  return pyreg::GroupList{outer, groups, inner};
}

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The functions `<prefix>_*` of one build of the kernels (CPU, CUDA or
// emulated CUDA). Each op takes, after its own arguments, where it runs: the
// workspace pointer, device index, stream and thread count (each build reads
// the ones it needs; see csrc/common/kernels_api.h).
void bind_kernels(py::module_& m, const std::string& prefix, const pyreg::Kernels& kernels) {
  const pyreg::Kernels* k = &kernels;
  auto name = [&](const char* what) { return prefix + "_" + what; };
  using pyreg::Launch;
  m.def(name("compiled").c_str(), [k] { return k->compiled; });
  m.def(name("archs").c_str(), [k] { return k->archs(); });
  m.def(name("device_count").c_str(), [k] { return k->device_count(); });
  m.def(name("runtime_error").c_str(), [k] { return k->runtime_error(); });
  m.def(name("device_error").c_str(), [k](int device) { return k->device_error(device); },
        py::arg("device"));
  m.def(name("workspace_bytes").c_str(),
        [k](int64_t n, int64_t total) { return k->workspace_bytes(n, total); }, py::arg("n"),
        py::arg("total_numel"));
  m.def(name("param_bytes").c_str(), [k] { return k->param_bytes(); });
  m.def(name("launch_count").c_str(), [k] { return k->launch_count(); });
  m.def(name("weight_stats").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, uintptr_t l1, uintptr_t l2,
            uintptr_t linf, uintptr_t nnz, int out_dtype, uintptr_t ws, int device,
            uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          py::gil_scoped_release nogil;
          k->weight_stats(w, ptr<void>(l1), ptr<void>(l2), ptr<void>(linf), ptr<int64_t>(nnz),
                          out_dtype, Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("penalty").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& refs, const CoefArg& l1,
            const CoefArg& l2, uintptr_t out, int out_dtype, uintptr_t ws, int device,
            uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          std::vector<void*> rp = optional_ptrs(refs, w, "refs");
          py::gil_scoped_release nogil;
          k->penalty(w, data_or_null(rp), coef(l1), coef(l2), ptr<void>(out), out_dtype,
                     Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("add_penalty_grad").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& refs, const Ptrs& g,
            const CoefArg& l1, const CoefArg& l2, uintptr_t out, int out_dtype, uintptr_t ws,
            int device, uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          std::vector<void*> rp = optional_ptrs(refs, w, "refs");
          std::vector<void*> gp = as_ptrs(g, w);
          py::gil_scoped_release nogil;
          k->add_penalty_grad(w, data_or_null(rp), gp.data(), coef(l1), coef(l2), ptr<void>(out),
                              out_dtype, Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("prox").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& refs, const CoefArg& l1,
            const CoefArg& l2, const CoefArg& lr, uintptr_t nnz, uintptr_t ws, int device,
            uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          std::vector<void*> rp = optional_ptrs(refs, w, "refs");
          py::gil_scoped_release nogil;
          k->prox(w, data_or_null(rp), coef(l1), coef(l2), coef(lr), ptr<int64_t>(nnz),
                  Launch{ptr<void>(ws), device, stream, nthreads});
        });

  // ---- group ops: each takes the group shapes (outer, groups, inner) per tensor
  m.def(name("group_workspace_bytes").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner) {
          TensorList w = make_list(p, n, d);
          return k->group_workspace_bytes(w, make_groups(w, outer, groups, inner));
        });
  m.def(name("group_norms").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner, uintptr_t norms, int out_dtype,
            uintptr_t ws, int device, uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          pyreg::GroupList gl = make_groups(w, outer, groups, inner);
          py::gil_scoped_release nogil;
          k->group_norms(w, gl, ptr<void>(norms), out_dtype, Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("group_prox").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner, const CoefArg& l1, const CoefArg& group_l1,
            const CoefArg& l2, const CoefArg& lr, uintptr_t nonzero, uintptr_t ws, int device,
            uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          pyreg::GroupList gl = make_groups(w, outer, groups, inner);
          py::gil_scoped_release nogil;
          k->group_prox(w, gl, coef(l1), coef(group_l1), coef(l2), coef(lr), ptr<int64_t>(nonzero),
                        Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("max_norm").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner, const CoefArg& max_value, uintptr_t clipped,
            uintptr_t ws, int device, uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          pyreg::GroupList gl = make_groups(w, outer, groups, inner);
          py::gil_scoped_release nogil;
          k->max_norm(w, gl, coef(max_value), ptr<int64_t>(clipped),
                      Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("group_penalty").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner, const CoefArg& group_l1, uintptr_t out,
            int out_dtype, uintptr_t ws, int device, uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          pyreg::GroupList gl = make_groups(w, outer, groups, inner);
          py::gil_scoped_release nogil;
          k->group_penalty(w, gl, coef(group_l1), ptr<void>(out), out_dtype,
                           Launch{ptr<void>(ws), device, stream, nthreads});
        });
  m.def(name("add_group_penalty_grad").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& outer,
            const Numels& groups, const Numels& inner, const Ptrs& g, const CoefArg& group_l1,
            uintptr_t out, int out_dtype, uintptr_t ws, int device, uintptr_t stream, int nthreads) {
          TensorList w = make_list(p, n, d);
          pyreg::GroupList gl = make_groups(w, outer, groups, inner);
          std::vector<void*> gp = as_ptrs(g, w);
          py::gil_scoped_release nogil;
          k->add_group_penalty_grad(w, gl, gp.data(), coef(group_l1), ptr<void>(out), out_dtype,
                                    Launch{ptr<void>(ws), device, stream, nthreads});
        });

  // ---- l2_bound: bound only in a build that has it (Python runs the rule in
  // torch ops where `<prefix>_l2_bound` is missing).
  if (k->l2_bound != nullptr) {
    m.def(name("l2_bound").c_str(),
          [k](const Ptrs& p, const Numels& n, const Codes& d, uintptr_t lam, uintptr_t kappa, uintptr_t steps,
              const CoefArg& bound, const CoefArg& mu, const CoefArg& warmup, uintptr_t ws, int device,
              uintptr_t stream, int nthreads) {
            TensorList w = make_list(p, n, d);
            if (!p.empty() && (lam == 0 || kappa == 0 || steps == 0))
              throw std::invalid_argument("pyreg._C: null l2_bound state");
            py::gil_scoped_release nogil;
            k->l2_bound(w, ptr<double>(lam), ptr<double>(kappa), ptr<int64_t>(steps), coef(bound), coef(mu),
                        coef(warmup), Launch{ptr<void>(ws), device, stream, nthreads});
          });
  }

  // ---- selection: bound only in a build that has it (Python falls back to
  // torch's selection where `<prefix>_kth_abs` is missing).
  m.def(name("kth_abs_workspace_bytes").c_str(), [k](int64_t n) { return k->kth_abs_workspace_bytes(n); },
        py::arg("n"));
  if (k->kth_abs != nullptr) {
    m.def(name("kth_abs").c_str(),
          [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& ks, bool closest, uintptr_t out,
              uintptr_t ws, int device, uintptr_t stream, int nthreads) {
            TensorList w = make_list(p, n, d);
            if (ks.size() != p.size()) throw std::invalid_argument("pyreg._C: k differs in length from tensors");
            for (size_t i = 0; i < ks.size(); ++i)
              if (ks[i] < 0 || ks[i] > n[i]) throw std::invalid_argument("pyreg._C: k out of [0, numel]");
            if (out == 0 && !p.empty()) throw std::invalid_argument("pyreg._C: null output");
            py::gil_scoped_release nogil;
            k->kth_abs(w, ks.data(), closest, ptr<double>(out), Launch{ptr<void>(ws), device, stream, nthreads});
          });
  }

  // ---- l1_strength's refresh of an adaptive step: bound only in a build that has
  // it (the CPU build; Python computes the push in torch ops elsewhere).
  if (k->push_kth != nullptr) {
    m.def(name("push_kth").c_str(),
          [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& v, const std::vector<double>& e,
              const std::vector<double>& s, const Ptrs& wb, const std::vector<double>& wd, const Numels& ks,
              uintptr_t out, int nthreads, const Numels& outer, const Numels& groups, const Numels& inner) {
            TensorList w = make_list(p, n, d);
            for (int code : d)
              if (code != pyreg::kFloat32 && code != pyreg::kFloat64)
                throw std::invalid_argument("pyreg._C: push_kth takes float32 or float64 state");
            std::vector<void*> vp = optional_ptrs(v, w, "second moments");
            for (size_t i = 0; i < vp.size(); ++i)
              if (vp[i] == nullptr && n[i] > 0) throw std::invalid_argument("pyreg._C: null second moment");
            if (e.size() != p.size() || s.size() != p.size() || ks.size() != p.size())
              throw std::invalid_argument("pyreg._C: e, s and k differ in length from tensors");
            std::vector<void*> wp = optional_ptrs(wb, w, "weights before the step");
            if (!wp.empty() && wd.size() != p.size())
              throw std::invalid_argument("pyreg._C: wd differs in length from tensors");
            // groups: (outer, groups, inner) of each tensor for the group form, or three empty lists
            const bool grouped = !groups.empty();
            pyreg::GroupList gl;
            if (grouped) gl = make_groups(w, outer, groups, inner);
            for (size_t i = 0; i < ks.size(); ++i)
              if (ks[i] < 0 || ks[i] > (grouped ? gl.groups[i] : n[i]))
                throw std::invalid_argument("pyreg._C: k out of [0, numel] (of [0, groups] with groups)");
            if (out == 0 && !p.empty()) throw std::invalid_argument("pyreg._C: null output");
            py::gil_scoped_release nogil;
            k->push_kth(w, vp.empty() ? nullptr : vp.data(), e.data(), s.data(), wp.empty() ? nullptr : wp.data(),
                        wd.data(), grouped ? &gl : nullptr, ks.data(), ptr<double>(out),
                        Launch{nullptr, -1, 0, nthreads});
          });
  }

  // ---- target_sparsity in an adaptive optimizer's metric: bound only in a build
  // that has it (the CPU build; Python makes the calls it stands for elsewhere).
  if (k->metric_target != nullptr) {
    m.def(name("metric_target").c_str(),
          [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& v, const std::vector<double>& e,
              const std::vector<double>& s, const Numels& ks, bool closest, const std::vector<double>& mlr,
              const std::vector<double>& l2, uintptr_t l1, int nthreads) {
            TensorList w = make_list(p, n, d);
            for (int code : d)
              if (code != pyreg::kFloat32 && code != pyreg::kFloat64)
                throw std::invalid_argument("pyreg._C: metric_target takes float32 or float64 tensors");
            std::vector<void*> vp = paired_ptrs(v, w, "second moments");
            if (e.size() != p.size() || s.size() != p.size() || ks.size() != p.size() || mlr.size() != p.size() ||
                l2.size() != p.size())
              throw std::invalid_argument("pyreg._C: e, s, k, m and l2 differ in length from tensors");
            for (size_t i = 0; i < ks.size(); ++i)
              if (ks[i] < 0 || ks[i] > n[i]) throw std::invalid_argument("pyreg._C: k out of [0, numel]");
            if (l1 == 0 && !p.empty()) throw std::invalid_argument("pyreg._C: null output");
            py::gil_scoped_release nogil;
            k->metric_target(w, vp.data(), e.data(), s.data(), ks.data(), closest, mlr.data(), l2.data(),
                             ptr<double>(l1), Launch{nullptr, -1, 0, nthreads});
          });
  }

  // ---- the fused optimizer step: per param its grad, state buffers (an empty
  // list when unused), step counter, group row and fresh flag (SGD).
  m.def(name("optim_step").c_str(),
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Ptrs& g, const Ptrs& s1,
            const Ptrs& s2, const Ptrs& s3, const Ptrs& steps, const std::vector<int32_t>& group,
            const std::vector<uint8_t>& fresh, int64_t n_groups, uintptr_t hyper, int algo,
            int step_dtype, bool decoupled, bool amsgrad, bool maximize, bool nesterov, bool centered, int prox,
            uintptr_t grad_scale, uintptr_t found_inf, uintptr_t ticket, uintptr_t ws, int device,
            uintptr_t stream, int nthreads) {
          pyreg::OptimList l;
          l.w = make_list(p, n, d);
          const size_t count = p.size();
          l.grads = as_ptrs(g, l.w);
          l.s1 = optional_ptrs(s1, l.w, "state buffers");
          l.s2 = optional_ptrs(s2, l.w, "state buffers");
          l.s3 = optional_ptrs(s3, l.w, "state buffers");
          l.steps = optional_ptrs(steps, l.w, "step counters");
          if (group.size() != count) throw std::invalid_argument("pyreg._C: group indices differ in length from tensors");
          if (!fresh.empty() && fresh.size() != count)
            throw std::invalid_argument("pyreg._C: fresh flags differ in length from tensors");
          for (int32_t gi : group)
            if (gi < 0 || gi >= n_groups) throw std::invalid_argument("pyreg._C: group index out of range");
          if (algo < pyreg::kSgd || algo > pyreg::kRmsprop) throw std::invalid_argument("pyreg._C: unknown algorithm");
          if (prox < pyreg::kNoProx || prox > pyreg::kMetricProx) throw std::invalid_argument("pyreg._C: unknown prox");
          if (step_dtype != 0 && step_dtype != 1) throw std::invalid_argument("pyreg._C: step counters must be float32 or float64");
          if (algo != pyreg::kSgd && steps.size() != count)
            throw std::invalid_argument("pyreg._C: Adam, Adagrad and RMSprop need a step counter per tensor");
          const size_t need = algo == pyreg::kSgd ? 0 : algo == pyreg::kAdam ? (amsgrad ? 3 : 2) : 1;
          if ((need >= 1 && s1.size() != count) || (need >= 2 && s2.size() != count) || (need >= 3 && s3.size() != count))
            throw std::invalid_argument("pyreg._C: missing state buffers");
          if (algo == pyreg::kRmsprop && centered && s3.size() != count)
            throw std::invalid_argument("pyreg._C: centered RMSprop needs a grad_avg buffer per tensor");
          if (algo == pyreg::kSgd && !s1.empty() && fresh.size() != count)
            throw std::invalid_argument("pyreg._C: SGD with momentum needs a fresh flag per tensor");
          if (hyper == 0 && count > 0) throw std::invalid_argument("pyreg._C: null hyperparameter table");
          l.group = group;
          l.fresh = fresh;
          l.n_groups = n_groups;
          const pyreg::OptimSpec spec{algo, step_dtype, decoupled, amsgrad, maximize, nesterov, centered, prox,
                                      ptr<const double>(hyper), ptr<const float>(grad_scale),
                                      ptr<const float>(found_inf), ptr<unsigned>(ticket)};
          py::gil_scoped_release nogil;
          k->optim_step(l, spec, Launch{ptr<void>(ws), device, stream, nthreads});
        });
}

// cpu_target_prox: target_sparsity's prox for a list already checked (the
// optimizers' direct path on the CPU), in one call: tau_i = kth_abs(w_i, k_i,
// closest), l1[i] = per_lr(tau_i, lr_i) (into the optimizer's state vector),
// then prox with those l1 (nnz: the counts). The same two kernels as the
// separate calls, hence the same bits; the CPU build only, since the division
// between them runs here, on the host.
void bind_cpu_target_prox(py::module_& m, const pyreg::Kernels& kernels) {
  const pyreg::Kernels* k = &kernels;
  if (k->kth_abs == nullptr || k->prox == nullptr) return;  // (Python then makes the separate calls)
  m.def("cpu_target_prox",
        [k](const Ptrs& p, const Numels& n, const Codes& d, const Numels& ks, bool closest, uintptr_t l1,
            const CoefArg& l2, const CoefArg& lr, uintptr_t nnz, int nthreads) {
          TensorList w = make_list(p, n, d);
          if (ks.size() != p.size()) throw std::invalid_argument("pyreg._C: k differs in length from tensors");
          for (size_t i = 0; i < ks.size(); ++i)
            if (ks[i] < 0 || ks[i] > n[i]) throw std::invalid_argument("pyreg._C: k out of [0, numel]");
          if (!p.empty() && (l1 == 0 || nnz == 0)) throw std::invalid_argument("pyreg._C: null output");
          py::gil_scoped_release nogil;
          const pyreg::Launch at{nullptr, -1, 0, nthreads};
          double* tau = ptr<double>(l1);
          k->kth_abs(w, ks.data(), closest, tau, at);
          const pyreg::Coef step = coef(lr);
          for (size_t i = 0; i < p.size(); ++i)
            tau[i] = pyreg::per_lr(tau[i], step.per_tensor != nullptr ? step.per_tensor[i] : step.value);
          k->prox(w, nullptr, pyreg::Coef{tau, 0.0}, coef(l2), step, ptr<int64_t>(nnz), at);
        });
}

// cpu_per_lr: out[i] = per_lr(tau[i], lr_i) for n float64 values in host
// memory (`out` may be `tau`): the l1 that zeroes a weight of magnitude tau
// at step size lr, as target_sparsity's and l1_strength's refreshes set it
// on the CPU, in one call instead of a few torch ops on a small vector.
void bind_cpu_per_lr(py::module_& m) {
  m.def("cpu_per_lr", [](uintptr_t tau, uintptr_t out, int64_t n, const CoefArg& lr) {
    if (n < 0) throw std::invalid_argument("pyreg._C: negative count");
    if (n > 0 && (tau == 0 || out == 0)) throw std::invalid_argument("pyreg._C: null pointer");
    const pyreg::Coef step = coef(lr);
    const double* t = ptr<const double>(tau);
    double* o = ptr<double>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = pyreg::per_lr(t[i], step.per_tensor != nullptr ? step.per_tensor[i] : step.value);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyreg's compiled kernels (raw pointers in, no libtorch).";
  m.attr("CPU_CHUNK") = pyreg::kCpuChunk;
  m.def(
      "hyper_fields",
      [] {
        py::tuple names(size_t(pyreg::kHyper));
        for (int i = 0; i < pyreg::kHyper; ++i) names[size_t(i)] = py::str(pyreg::kHyperNames[i]);
        return names;
      },
      "The columns of optim_step's hyperparameter table, in order (csrc/common/hyper.h).");
  // One set of bindings per build: the CPU kernels, the GPU build of the CUDA
  // kernels and the emulated one.
  bind_kernels(m, "cpu", pyreg::kCpu);
  bind_cpu_target_prox(m, pyreg::kCpu);
  bind_cpu_per_lr(m);
  bind_kernels(m, "cuda", pyreg::kCuda);
  bind_kernels(m, "cuda_emu", pyreg::kCudaEmu);
  pyreg::bind_fast_prox(m, pyreg::kCpu);
  pyreg::bind_fast_list(m);
  pyreg::bind_strength_counts(m);
#if defined(PYREG_WITH_CUDA_EMU)
  m.def("cuda_emu_selftest", &pyreg::emu::selftest, py::arg("name"),
        "Runs one of the emulator's own checks (csrc/cuda/emu/selftest.cpp).");
#endif
}
