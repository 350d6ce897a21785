// optim_math.h: the per-element math of pyreg's fused optimizer step (SGD,
// Adam/AdamW, Adagrad, RMSprop, each followed by the L1/L2 proximal step), written
// once for the CPU kernels (csrc/cpu/optim.cpp) and the CUDA kernels
// (csrc/cuda/optim.cu, on a GPU or under the emulator).
//
// The update of each optimizer is torch.optim's single-tensor algorithm, op
// for op in the same order, computed in the compute type A (float32 for
// 16-bit and float32 storage, float64 for float64) and rounded to storage
// once per stored value (param, state, grad). The float64 specification is
// pyreg/backends/torch_ref.py (optim_step).
#pragma once
#include <math.h>

#include <cstdint>

#include "dtype.h"
#include "op_math.h"

namespace pyreg {
inline namespace PYREG_ISA_NS {

// Per-tensor scalars of one step, from the group's numbers and the tensor's
// step count (after its increment), in double as torch computes them on the host.
struct StepScalars {
  double lr, wd, decay;       // decay = 1 - lr * wd (AdamW)
  double beta1_w, beta2, one_minus_beta2;  // beta1_w = 1 - beta1 (lerp weight)
  double neg_step_size, bc2_sqrt, eps;     // Adam
  double momentum, one_minus_dampening;    // SGD
  double clr;                 // Adagrad: lr / (1 + (step - 1) * lr_decay)
  double alpha, one_minus_alpha;  // RMSprop
  double l1, l2;
};

PYREG_HD StepScalars step_scalars(const OptimSpec& s, const double* h, double step) {
  StepScalars c;
  c.lr = h[kLr];
  c.wd = h[kWeightDecay];
  c.decay = 1.0 - h[kLr] * h[kWeightDecay];
  c.beta1_w = 1.0 - h[kBeta1];
  c.beta2 = h[kBeta2];
  c.one_minus_beta2 = 1.0 - h[kBeta2];
  c.eps = h[kEps];
  c.neg_step_size = 0.0;
  c.bc2_sqrt = 1.0;
  if (s.algo == kAdam) {
    c.neg_step_size = -(h[kLr] / (1.0 - pow(h[kBeta1], step)));
    c.bc2_sqrt = sqrt(1.0 - pow(h[kBeta2], step));
  }
  c.momentum = h[kMomentum];
  c.one_minus_dampening = 1.0 - h[kDampening];
  c.clr = h[kLr] / (1.0 + (step - 1.0) * h[kLrDecay]);
  c.alpha = h[kAlpha];
  c.one_minus_alpha = 1.0 - h[kAlpha];
  c.l1 = h[kL1];
  c.l2 = h[kL2];
  return c;
}

// The same scalars in the compute type, as torch's tensor ops round them
// (a Python float scalar becomes the tensor's opmath type).
template <typename A>
struct ElemScalars {
  A wd, decay, beta1_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps;
  A momentum, one_minus_dampening, neg_lr, neg_clr;
  A alpha, one_minus_alpha;
  A metric_lr;   // the lr the metric prox scales: Adam and RMSprop lr, Adagrad clr
  A l1, two_l2;  // the metric prox's coefficients
  ProxParams<A> prox;  // the plain prox (pyreg.prox_ with the group's lr)
  A grad_sign;  // -1 to maximize, else 1
  bool use_wd, nesterov, decoupled;
};

template <typename A>
PYREG_HD ElemScalars<A> elem_scalars(const OptimSpec& s, const StepScalars& c) {
  ElemScalars<A> e;
  e.wd = A(c.wd);
  e.decay = A(c.decay);
  e.beta1_w = A(c.beta1_w);
  e.beta2 = A(c.beta2);
  e.one_minus_beta2 = A(c.one_minus_beta2);
  e.neg_step_size = A(c.neg_step_size);
  e.bc2_sqrt = A(c.bc2_sqrt);
  e.eps = A(c.eps);
  e.momentum = A(c.momentum);
  e.one_minus_dampening = A(c.one_minus_dampening);
  e.neg_lr = A(-c.lr);
  e.neg_clr = A(-c.clr);
  e.alpha = A(c.alpha);
  e.one_minus_alpha = A(c.one_minus_alpha);
  e.metric_lr = A(s.algo == kAdagrad ? c.clr : c.lr);
  e.l1 = A(c.l1);
  e.two_l2 = A(2.0 * c.l2);
  e.prox = prox_params<A>(c.l1, c.l2, c.lr);
  e.use_wd = c.wd != 0.0;
  e.grad_sign = s.maximize ? A(-1) : A(1);
  e.nesterov = s.nesterov;
  e.decoupled = s.decoupled && s.algo == kAdam;  // as the spec: the others' decay is coupled
  return e;
}

// The prox in the optimizer's metric: the element's step size is
// lr_e = metric_lr / denom; zero where |w| <= lr_e * l1, else
// sign(w) * (|w| - lr_e * l1) / (1 + 2 * lr_e * l2).
template <typename A>
PYREG_HD A metric_prox(A w, A denom, const ElemScalars<A>& e) {
  const A lr_e = e.metric_lr / denom;
  const A t = lr_e * e.l1;
  const A a = abs_of(w);
  return a <= t ? A(0) : copysign_of((a - t) / (A(1) + lr_e * e.two_l2), w);
}

// Weight decay: none, coupled (g += wd * p: SGD, Adam, Adagrad, RMSprop) or decoupled
// (p *= 1 - lr * wd: AdamW). The CPU kernels instantiate each (a loop without
// branches vectorizes); kWdAny reads it from ElemScalars at run time (CUDA).
enum WdMode : int { kWdNone = 0, kWdCoupled = 1, kWdDecoupled = 2, kWdAny = 3 };

template <int kWd, typename A>
PYREG_HD void weight_decay(A& p, A& g, const ElemScalars<A>& e) {
  if constexpr (kWd == kWdCoupled) g = g + e.wd * p;
  if constexpr (kWd == kWdDecoupled) p = p * e.decay;
  if constexpr (kWd == kWdAny) {
    if (e.use_wd) {
      if (e.decoupled) p = p * e.decay;
      else g = g + e.wd * p;
    }
  }
}

// The mode of a step (what kWdAny decides at run time).
PYREG_HD int wd_mode(bool use_wd, bool decoupled) {
  return !use_wd ? kWdNone : decoupled ? kWdDecoupled : kWdCoupled;
}

// ---- SGD ----------------------------------------------------------------------
// kState: 0 no momentum, 1 the momentum buffer's first step (buf = grad), 2 momentum.
template <int kProx, int kState, int kWd, typename A>
PYREG_HD void sgd_element(A& p, A g, A& buf, const ElemScalars<A>& e) {
  g = g * e.grad_sign;  // maximize: -g (exact)
  weight_decay<kWd>(p, g, e);
  if constexpr (kState != 0) {
    if constexpr (kState == 1) buf = g;
    else buf = buf * e.momentum + e.one_minus_dampening * g;
    g = e.nesterov ? A(g + e.momentum * buf) : buf;
  }
  p = p + e.neg_lr * g;
  if constexpr (kProx != kNoProx) p = prox_value(p, e.prox);  // SGD's metric is its lr
}

// ---- Adam / AdamW ---------------------------------------------------------------
template <int kProx, bool kAmsgrad, int kWd, typename A>
PYREG_HD void adam_element(A& p, A g, A& m, A& v, A& vmax, const ElemScalars<A>& e) {
  g = g * e.grad_sign;
  weight_decay<kWd>(p, g, e);
  m = m + e.beta1_w * (g - m);  // lerp(m, g, 1 - beta1)
  v = v * e.beta2;
  v = v + (e.one_minus_beta2 * g) * g;
  A denom;
  if constexpr (kAmsgrad) {
    vmax = (vmax > v) | (vmax != vmax) ? vmax : v;  // torch.maximum: a NaN wins
    denom = sqrt(vmax) / e.bc2_sqrt + e.eps;
  } else {
    denom = sqrt(v) / e.bc2_sqrt + e.eps;
  }
  p = p + (e.neg_step_size * m) / denom;
  if constexpr (kProx == kPlainProx) p = prox_value(p, e.prox);
  if constexpr (kProx == kMetricProx) p = metric_prox(p, denom, e);
}

// l1_strength's push of an adaptive step, in l1's units (the step over the
// prox's step size), m / ((sqrt(v) + e) * s), op for op as the optimizers'
// _pushes / _push compute it in torch ops (pyreg/optim/adam.py and the
// others' _push_terms):
//   Adam, plain metric: m_hat / (sqrt(v_hat) + eps) with m = exp_avg,
//     v = exp_avg_sq, e = eps * r, s = c1 / r (c1 = 1 - beta1^t,
//     r = sqrt(1 - beta2^t)); in Adam's own metric m_hat = m / s, s = c1 (no v);
//   Adagrad (no lr_decay), RMSprop (no momentum, not centered), plain metric:
//     grad / (sqrt(v) + eps), e = eps, s = 1 (exact).
template <typename A>
PYREG_HD A adaptive_push(A m, A v, A e, A s) {
  return m / ((sqrt(v) + e) * s);
}

// The push of a step with a decoupled weight decay (AdamW, plain metric): the
// adaptive push plus the decay's term, wd * w with w the weight before the
// step, rounded on its own and then added (as _pushes: a multiply, then an add).
template <typename A>
PYREG_HD A decayed_push(A push, A w, A wd) {
  return push + wd * w;
}

// target_sparsity in the optimizer's metric (preconditioned=True): the divisor
// of an adaptive step, d = (sqrt(v) + e) * s (Adam: v = exp_avg_sq or
// max_exp_avg_sq, e = eps * r, s = 1 / r with r = sqrt(1 - beta2^t), which is
// sqrt(v_hat) + eps; Adagrad: v = sum, e = eps, s = 1; RMSprop: square_avg,
// centered: square_avg - grad_avg^2), raised to A's smallest normal where e is
// not positive (`floor`), as pyreg/optim/apply.py's metric_divisors computes
// it in torch ops (a multiply, not a division by a number: torch's CPU ops
// divide by a number as a multiply by its reciprocal).
template <typename A>
PYREG_HD A metric_divisor(A v, A e, A s, bool floor) {
  const A d = (sqrt(v) + e) * s;
  return floor && d < tiny<A>() ? tiny<A>() : d;
}

// Then, with u = w * d and tau the k-th smallest |u| of the tensor, the new
// weight: 0 where |u| <= tau, else sign(u) * (|u| - tau) / den, den = d +
// 2 * m * l2 (m the metric's lr), as pyreg/optim/apply.py's _metric_target
// computes it (prox_ of u at l1 tau and lr 1, whose threshold is tau itself,
// then a division).
template <typename A>
PYREG_HD A metric_target_value(A u, A tau, A den) {
  const A a = abs_of(u);
  return (a <= tau ? A(0) : copysign_of(a - tau, u)) / den;
}

// ---- Adagrad ------------------------------------------------------------------
template <int kProx, int kWd, typename A>
PYREG_HD void adagrad_element(A& p, A g, A& sum, const ElemScalars<A>& e) {
  g = g * e.grad_sign;
  weight_decay<kWd>(p, g, e);
  sum = sum + g * g;
  const A std_ = sqrt(sum) + e.eps;
  p = p + (e.neg_clr * g) / std_;
  if constexpr (kProx == kPlainProx) p = prox_value(p, e.prox);
  if constexpr (kProx == kMetricProx) p = metric_prox(p, std_, e);
}

// ---- RMSprop ------------------------------------------------------------------
// kState: a set of kRmsMomentum (the momentum buffer, momentum > 0) and
// kRmsCentered (grad_avg).
enum RmsState : int { kRmsMomentum = 1, kRmsCentered = 2 };

template <int kProx, int kState, int kWd, typename A>
PYREG_HD void rmsprop_element(A& p, A g, A& sq, A& buf, A& gavg, const ElemScalars<A>& e) {
  g = g * e.grad_sign;
  weight_decay<kWd>(p, g, e);
  sq = sq * e.alpha;
  sq = sq + (e.one_minus_alpha * g) * g;  // square_avg.mul_(alpha).addcmul_(g, g, value=1-alpha)
  A avg;
  if constexpr ((kState & kRmsCentered) != 0) {
    gavg = gavg + e.one_minus_alpha * (g - gavg);  // lerp(grad_avg, g, 1 - alpha)
    avg = sqrt(sq - gavg * gavg);
  } else {
    avg = sqrt(sq);
  }
  avg = avg + e.eps;
  if constexpr ((kState & kRmsMomentum) != 0) {
    buf = buf * e.momentum + g / avg;  // buf.mul_(momentum).addcdiv_(g, avg)
    p = p + e.neg_lr * buf;
  } else {
    p = p + (e.neg_lr * g) / avg;      // addcdiv_(g, avg, value=-lr)
  }
  if constexpr (kProx == kPlainProx) p = prox_value(p, e.prox);
  if constexpr (kProx == kMetricProx) p = metric_prox(p, avg, e);
}

// The state arrays an algorithm's element touches (s1, s2, s3 of
// optim_element), for loops that stage them in registers: state_reads<>(j)
// whether s<j> is read, state_writes<>(j) whether it is written (j = 1, 2, 3).
// SGD's first momentum step (kState 1) writes its buffer without reading it.
template <int kAlgo, int kState>
PYREG_HD constexpr bool state_writes(int j) {
  return kAlgo == kSgd      ? j == 1 && kState != 0
         : kAlgo == kAdam   ? j == 1 || j == 2 || (j == 3 && kState == 1)
         : kAlgo == kAdagrad ? j == 1
                             : j == 1 || (j == 2 && (kState & kRmsMomentum) != 0) || (j == 3 && (kState & kRmsCentered) != 0);
}
template <int kAlgo, int kState>
PYREG_HD constexpr bool state_reads(int j) {
  return state_writes<kAlgo, kState>(j) && !(kAlgo == kSgd && kState == 1);
}

// One element of the step in storage: reads param i and its state, updates
// them with grad value gv (already unscaled) and stores them. The CPU and
// CUDA loops call it for their elements.
template <int kAlgo, int kProx, int kState, int kWd, typename T, typename A>
PYREG_HD void optim_element(T* p, A gv, T* s1, T* s2, T* s3, int64_t i, const ElemScalars<A>& e) {
  A pv = load<A>(p[i]);
  if constexpr (kAlgo == kSgd) {
    A b = kState == 2 ? load<A>(s1[i]) : A(0);
    sgd_element<kProx, kState, kWd>(pv, gv, b, e);
    if constexpr (kState != 0) s1[i] = store<T>(b);
  } else if constexpr (kAlgo == kAdam) {
    A m = load<A>(s1[i]), v = load<A>(s2[i]);
    A vmax = kState == 1 ? load<A>(s3[i]) : A(0);
    adam_element<kProx, kState == 1, kWd>(pv, gv, m, v, vmax, e);
    s1[i] = store<T>(m);
    s2[i] = store<T>(v);
    if constexpr (kState == 1) s3[i] = store<T>(vmax);
  } else if constexpr (kAlgo == kAdagrad) {
    A sum = load<A>(s1[i]);
    adagrad_element<kProx, kWd>(pv, gv, sum, e);
    s1[i] = store<T>(sum);
  } else {
    constexpr bool kMomentum = (kState & kRmsMomentum) != 0, kCentered = (kState & kRmsCentered) != 0;
    A sq = load<A>(s1[i]);
    A buf = kMomentum ? load<A>(s2[i]) : A(0);
    A gavg = kCentered ? load<A>(s3[i]) : A(0);
    rmsprop_element<kProx, kState, kWd>(pv, gv, sq, buf, gavg, e);
    s1[i] = store<T>(sq);
    if constexpr (kMomentum) s2[i] = store<T>(buf);
    if constexpr (kCentered) s3[i] = store<T>(gavg);
  }
  p[i] = store<T>(pv);
}

// A step counter's value, and the value it gets after this step (float32
// counters add in float32, as torch's `step_t += 1`).
PYREG_HD double read_step(const void* step, int dtype) {
  return dtype == kFloat64 ? *static_cast<const double*>(step) : double(*static_cast<const float*>(step));
}
PYREG_HD double next_step(const void* step, int dtype) {
  return dtype == kFloat64 ? *static_cast<const double*>(step) + 1.0
                           : double(*static_cast<const float*>(step) + 1.0f);
}
PYREG_HD void write_step(void* step, int dtype, double v) {
  if (dtype == kFloat64) *static_cast<double*>(step) = v;
  else *static_cast<float*>(step) = float(v);
}

}  // inline namespace PYREG_ISA_NS
}  // namespace pyreg
