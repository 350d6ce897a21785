// elementwise.cpp: pyreg's element-wise CPU ops (weight_stats, penalty,
// add_penalty_grad, prox, l2_bound; csrc/common/kernels_api.h for the
// contracts), on the sweeps of sweep.h.
#include "sweep.h"

namespace pyreg::cpu {
namespace PYREG_ISA_NS {

void weight_stats(const TensorList& w, void* l1, void* l2, void* linf, int64_t* nnz,
                  int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      return sweep<A, true, true, true>(it.end - it.begin, no_update, loader<A>(x));
    });
  });
  for (int64_t i = 0; i < w.size(); ++i) {
    write_out(l1, out_dtype, i, s[i].s1);
    write_out(l2, out_dtype, i, std::sqrt(s[i].s2));
    write_out(linf, out_dtype, i, finish_linf(s[i]));
    nnz[i] = s[i].nnz;
  }
}

void penalty(const TensorList& w, const void* const* refs, Coef l1, Coef l2, void* out,
             int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it))
        return sweep<A, true, false, false>(n, no_update, DiffLoader<A, T>{x, r});
      return sweep<A, true, false, false>(n, no_update, loader<A>(x));
    });
  });
  write_out(out, out_dtype, 0, penalty_of(s, l1, l2));
}

void add_penalty_grad(const TensorList& w, const void* const* refs, void* const* grads, Coef l1,
                      Coef l2, void* out, int out_dtype, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      const T* x = p + it.begin;
      T* g = static_cast<T*>(grads[it.tensor]) + it.begin;
      const A c1 = A(coef_at(l1, it.tensor));
      const A c2 = A(2.0 * coef_at(l2, it.tensor));
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it)) {
        auto update = [=](int64_t b, int len) {
          const T* __restrict xs = x + b;
          const T* __restrict rs = r + b;
          T* __restrict gs = g + b;
#pragma omp simd
          for (int k = 0; k < len; ++k)
            gs[k] = store<T>(load<A>(gs[k]) + grad_term(A(load<A>(xs[k]) - load<A>(rs[k])), c1, c2));
        };
        return sweep<A, true, false, false>(n, update, DiffLoader<A, T>{x, r});
      }
      return grad_sweep(n, x, g, c1, c2);
    });
  });
  write_out(out, out_dtype, 0, penalty_of(s, l1, l2));
}

void prox(const TensorList& w, const void* const* refs, Coef l1, Coef l2, Coef lr, int64_t* nnz,
          const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      T* x = p + it.begin;
      using A = opmath_t<T>;
      const ProxParams<A> pp =
          prox_params<A>(coef_at(l1, it.tensor), coef_at(l2, it.tensor), coef_at(lr, it.tensor));
      const int64_t n = it.end - it.begin;
      if (const T* r = ref_of<T>(refs, it)) {
        auto update = [=](int64_t b, int len) {
          T* __restrict xs = x + b;
          const T* __restrict rs = r + b;
#pragma omp simd
          for (int k = 0; k < len; ++k) xs[k] = prox_toward<T>(load<A>(xs[k]), load<A>(rs[k]), pp);
        };
        // Counts the elements left different from the reference.
        return sweep<A, false, false, true>(n, update, NeLoader<A, T>{x, r});
      }
      // One pass: each element's prox, counting the nonzeros of what is stored
      // as it is stored (an exact count: no reduction order to keep).
      Partial part = zero_partial();
      part.nnz = prox_count(n, x, pp);
      return part;
    });
  });
  for (int64_t i = 0; i < w.size(); ++i) nnz[i] = s[i].nnz;
}

void l2_bound(const TensorList& w, double* lam, double* kappa, int64_t* steps, Coef bound, Coef mu,
              Coef warmup, const Launch& at) {
  auto s = run(w, at.nthreads, [&](const Item& it) {
    return with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using A = opmath_t<T>;
      return sweep<A, true, false, false>(it.end - it.begin, no_update, loader<A>(p + it.begin));
    });
  });
  std::vector<double> f(size_t(w.size()));
  bool scale = false;
  for (int64_t i = 0; i < w.size(); ++i) {
    steps[i] += 1;
    f[size_t(i)] = cpr_update(lam[i], kappa[i], steps[i], s[i].s2, double(w.numels[i]), coef_at(bound, i),
                              coef_at(mu, i), coef_at(warmup, i));
    scale = scale || f[size_t(i)] != 1.0;
  }
  if (!scale) return;  // a warm-up, or every multiplier 0: nothing to write
  run(w, at.nthreads, [&](const Item& it) {
    const double fi = f[size_t(it.tensor)];
    if (fi != 1.0) {
      with_dtype(w.dtypes[it.tensor], w.ptrs[it.tensor], [&](auto* p) {
        using T = std::remove_pointer_t<decltype(p)>;
        using A = opmath_t<T>;
        T* __restrict x = p + it.begin;
        const A c = A(fi);
        const int64_t n = it.end - it.begin;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) x[k] = store<T>(load<A>(x[k]) * c);
        return 0;
      });
    }
    return zero_partial();
  });
}

}  // namespace PYREG_ISA_NS
}  // namespace pyreg::cpu
