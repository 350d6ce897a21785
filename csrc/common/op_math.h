// op_math.h: the per-element math of every op, written once. The CPU kernels
// (csrc/cpu/) and the CUDA kernels (csrc/cuda/*.cu, on a GPU
// or under the emulator) both include it; they keep only iteration, chunking
// and reductions. Everything here is PYREG_HD: host and device.
//
// A is the compute type (opmath_t<T>: float for 16-bit and float32 storage,
// double for float64). The float64 reference (pyreg/backends/torch_ref.py) is
// the specification these reproduce.
#pragma once
#include <math.h>

#include <cstdint>

#include "dtype.h"
#include "tensor_list.h"

namespace pyreg {
// Per build variant (csrc/cpu/isa/): each instruction-set variant of the CPU
// kernels gets its own copy of these inline functions, so the linker cannot
// hand one variant another's (e.g. AVX-512) code.
inline namespace PYREG_ISA_NS {

// ---- scalar helpers, one spelling for host and device ---------------------------
PYREG_HD float abs_of(float v) { return fabsf(v); }
PYREG_HD double abs_of(double v) { return fabs(v); }
PYREG_HD float copysign_of(float m, float s) { return copysignf(m, s); }
PYREG_HD double copysign_of(double m, double s) { return copysign(m, s); }

// Largest A <= t: with it, `a <= floor_to<A>(t)` is exactly `a <= t` for any a
// of type A (the float64 spec's zero test, done in A).
template <typename A> PYREG_HD A floor_to(double t);
template <> PYREG_HD float floor_to<float>(double t) {
  const float f = float(t);  // round to nearest
  return double(f) > t ? nextafterf(f, -INFINITY) : f;
}
template <> PYREG_HD double floor_to<double>(double t) { return t; }

// A's largest finite value, as a double.
template <typename A> PYREG_HD constexpr double largest();
template <> PYREG_HD constexpr double largest<float>() { return 3.4028234663852886e38; }
template <> PYREG_HD constexpr double largest<double>() { return 1.7976931348623157e308; }
// The smallest normal of A.
template <typename A> PYREG_HD constexpr A tiny();
template <> PYREG_HD constexpr float tiny<float>() { return 1.17549435082228751e-38f; }
template <> PYREG_HD constexpr double tiny<double>() { return 2.2250738585072014e-308; }

// A coefficient's value for tensor i (a function of this namespace rather
// than a member of Coef: see PYREG_ISA_NS).
PYREG_HD double coef_at(const Coef& c, int64_t i) { return c.per_tensor ? c.per_tensor[i] : c.value; }

// ---- reductions ---------------------------------------------------------------
// A tensor's (or a chunk's) sums: sum|v|, sum v^2, max|v| (NaN ignored here:
// finish_linf makes it NaN when sum|v| is), count of v != 0. An aggregate
// without initializers (CUDA shared memory needs one): start from zero_partial().
struct Partial {
  double s1;
  double s2;
  double mx;
  int64_t nnz;
};

PYREG_HD Partial zero_partial() { return Partial{0.0, 0.0, 0.0, 0}; }

// o += p. Order matters for the sums: callers fold in a fixed order.
PYREG_HD void combine(Partial& o, const Partial& p) {
  o.s1 += p.s1;
  o.s2 += p.s2;
  o.mx = p.mx > o.mx ? p.mx : o.mx;
  o.nnz += p.nnz;
}

// max|w| as reported: NaN exactly when some w is NaN (then sum|w| is NaN).
PYREG_HD double finish_linf(const Partial& p) { return isnan(p.s1) ? p.s1 : p.mx; }

// True when sums run in float32 may differ from float64 ones by more than
// rounding: a square or sum overflowed (|w| > ~1.8e19; also any Inf or NaN
// input), or squares fell below float32's normal range (all |w| < ~1e-15).
// Such a run is summed again in float64, so every result keeps float64's range.
template <typename A>
PYREG_HD bool out_of_float_range(A s1, A s2) {
  return !(isfinite(s1) && isfinite(s2)) || (s2 < A(0x1p-100) && s1 > A(0));
}

// ---- add_penalty_grad ---------------------------------------------------------
// The term added to the grad of weight v: l1 * sign(v) + 2 * l2 * v, with
// c1 = l1 and c2 = 2 * l2. sign(0) = 0, and the l1 term of a zero (or -0)
// weight is +0, so -0 + term is +0 as in the reference. A NaN or Inf v still
// makes the term NaN/Inf through c2 * v (0 * Inf = NaN).
template <typename A>
PYREG_HD A grad_term(A v, A c1, A c2) {
  const A l1_term = v != A(0) ? copysign_of(c1, v) : A(0);
  return l1_term + c2 * v;
}

// ---- prox ---------------------------------------------------------------------
// w <- sign(w) * max(|w| - t, 0) / (1 + 2 * lr * l2) with t = lr * l1, zero
// exactly where |w| <= t as in the float64 spec: a <= t_floor is that test
// for any a of type A. The shrink subtracts t as t_hi + t_lo, so a just above
// t stays (tiny but) nonzero.
template <typename A>
struct ProxParams {
  A t_floor, t_hi, t_lo, scale;
};

// The element soft-threshold alone (L2 scale 1), written without a division:
// the group prox's element step (prox_params(l1, 0, lr), whose scale 1 / (1 + 0)
// is 1 for a finite lr; with lr infinite every element is zeroed or NaN
// whatever the scale), so the group kernels call no division subroutine per
// tile.
template <typename A>
PYREG_HD ProxParams<A> soft_params(double l1, double lr) {
  const double t = lr * l1;
  ProxParams<A> p;
  p.t_floor = floor_to<A>(t);
  // t finite but beyond A's range: every finite a is at most t_floor (A's largest) and goes to 0;
  // the shrink subtracts A's largest, so an infinite a stays infinite, as in the spec (not inf - inf)
  const double th = t > largest<A>() && t <= largest<double>() ? largest<A>() : t;
  p.t_hi = A(th);
  p.t_lo = A(th - double(p.t_hi));
  p.scale = A(1);
  return p;
}

// The soft-threshold, then the L2 scale 1 / (1 + 2 lr l2). A scale below A's
// range (2 lr l2 above about 7e44 in float) takes every finite value to 0
// through the zero test, with a scale of 1 for the rest, so that an infinite
// value stays infinite as in the float64 spec (inf * s), not NaN (inf * 0).
template <typename A>
PYREG_HD ProxParams<A> prox_params(double l1, double l2, double lr) {
  ProxParams<A> p = soft_params<A>(l1, lr);
  const double s = 1.0 / (1.0 + 2.0 * lr * l2);
  p.scale = A(s);
  if (p.scale == A(0) && s > 0.0) {
    p.t_floor = A(largest<A>());
    p.scale = A(1);
  }
  return p;
}

template <typename A>
PYREG_HD A prox_value(A v, const ProxParams<A>& p) {
  const A a = abs_of(v);
  return a <= p.t_floor ? A(0) : copysign_of(((a - p.t_hi) - p.t_lo) * p.scale, v);
}

// Toward a reference r (prox with refs): r + prox(w - r), each step rounded to
// the storage type T as the composition of three tensor ops would be.
template <typename T, typename A>
PYREG_HD T prox_toward(A v, A r, const ProxParams<A>& p) {
  const A d = load<A>(store<T>(v - r));
  const A shrunk = load<A>(store<T>(prox_value(d, p)));
  return store<T>(r + shrunk);
}

// ---- group ops ----------------------------------------------------------------
enum GroupOp : int { kGNorms = 0, kGProx = 1, kGMaxNorm = 2, kGPenalty = 3, kGGrad = 4 };

// The coefficients of a group op (each op reads the ones it needs).
struct GroupCoefs {
  Coef l1, group_l1, l2, lr, max_value;
};

// Each group's factor, from its norm n (float64). NaN norms propagate into
// the group's elements except where the formula leaves them unchanged.
//
// Group soft-threshold, then the L2 scale: zero when n <= t (t = lr*group_l1).
PYREG_HD double group_prox_factor(double n, double t, double scale) {
  return n <= t ? 0.0 : (1.0 - t / n) * scale;
}
// Max-norm projection: min(1, c / n).
PYREG_HD double max_norm_factor(double n, double c) { return n > c ? c / n : 1.0; }
// Gradient of c * ||w_g||: c * w_g / n, and 0 for a zero group.
PYREG_HD double group_grad_factor(double n, double c) { return n == 0.0 ? 0.0 : c / n; }

// The factor of group op kOp for a group of tensor t with norm n (1 for the
// ops that do not scale).
template <int kOp>
PYREG_HD double group_factor(const GroupCoefs& c, int64_t t, double n) {
  if constexpr (kOp == kGProx) {
    const double lr = coef_at(c.lr, t);
    return group_prox_factor(n, lr * coef_at(c.group_l1, t), 1.0 / (1.0 + 2.0 * lr * coef_at(c.l2, t)));
  }
  if constexpr (kOp == kGMaxNorm) return max_norm_factor(n, coef_at(c.max_value, t));
  if constexpr (kOp == kGGrad) return group_grad_factor(n, coef_at(c.group_l1, t));
  return 1.0;
}

// Pass 2 of the group ops, in the compute type A: an element v times its
// group's factor f (f == 1 leaves v's bits), and a grad g plus f * v.
template <typename T, typename A>
PYREG_HD T group_scaled(A v, double f) { return store<T>(v * A(f)); }
template <typename T, typename A>
PYREG_HD T group_grad(A g, A v, double f) {
  const A af = A(f);
  // A factor beyond A's range (c / n for a norm n below about 1 / FLT_MAX, i.e.
  // subnormal weights in float): f * v in double, which is within it.
  if (af - af != A(0) && f - f == 0.0) return store<T>(g + A(f * double(v)));
  return store<T>(g + af * v);
}

// The value whose group norms op kOp takes, from a stored element x: the
// element soft-threshold by `soft` (rounded to the storage type T) for
// group_prox, the weight itself otherwise.
template <int kOp, typename T, typename A>
PYREG_HD A group_value(T x, const ProxParams<A>& soft) {
  if constexpr (kOp == kGProx) return load<A>(store<T>(prox_value(load<A>(x), soft)));
  else return load<A>(x);
}

// ---- target_sparsity ---------------------------------------------------------
// The l1 at which a prox of step size lr moves a weight of magnitude tau to
// zero (0 where lr is 0: no step, no strength): tau / lr, rounded, then
// raised by one ulp where the prox's threshold lr * l1 (rounded, as
// soft_params computes it) falls short of tau, at most kPerLrRaises times
// (once always sufficed in tests), so that a weight of magnitude tau is
// zeroed. The float64 reference is pyreg/optim/apply.py's _per_lr.
constexpr int kPerLrRaises = 2;
PYREG_HD double per_lr(double tau, double lr) {
  if (!(lr > 0.0)) return 0.0;
  double l1 = tau / lr;
  for (int i = 0; i < kPerLrRaises; ++i)
    if (lr * l1 < tau) l1 = nextafter(l1, HUGE_VAL);
  return l1;
}

// ---- l2_bound: Constrained Parameter Regularization (Franke et al. 2024) ------
// One tensor's update after the optimizer's step, from R = ||w||^2: with b the
// bound in force (with `warmup` set, a warm start: `kappa`, the bound it took,
// +inf until it takes one; else the group's `bound`),
//   lam   <- max(0, lam + mu / n * (R - b))    (0 while b is +inf)
//   kappa <- R at the first step with step >= warmup while b is +inf (the
//            warm-up's last step; or the next step, where `warmup` was set
//            below the steps taken, or a given bound was switched to a warm
//            start), else unchanged: a given bound is not written into it
// and returns w's factor 1 - 2 * lam. `step` counts this step; n is w's
// size (an empty tensor counts as 1: R = 0, its multiplier stays 0). The
// float64 reference is pyreg/optim/apply.py's l2_bound_buckets.
PYREG_HD double cpr_update(double& lam, double& kappa, int64_t step, double r, double n, double bound,
                           double mu, double warmup) {
  const double b = warmup > 0 ? kappa : bound;
  const double v = lam + mu / (n > 0.0 ? n : 1.0) * (r - b);
  lam = isinf(b) ? 0.0 : (v < 0.0 ? 0.0 : v);
  if (warmup > 0 && isinf(b) && double(step) >= warmup) kappa = r;
  return 1.0 - 2.0 * lam;
}

// ---- results ------------------------------------------------------------------
// One result into a float32 or float64 output (out_dtype: kFloat32 / kFloat64).
PYREG_HD void write_out(void* out, int out_dtype, int64_t i, double v) {
  if (out_dtype == kFloat64) static_cast<double*>(out)[i] = v;
  else static_cast<float*>(out)[i] = float(v);
}

}  // inline namespace PYREG_ISA_NS
}  // namespace pyreg
