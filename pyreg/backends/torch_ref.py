"""The ``torch`` backend: every op in plain PyTorch, one tensor at a time.

This is pyreg's specification. The tests compare the compiled kernels with it,
and it is the fallback for devices without compiled kernels. It computes in
float64 (float32 on devices without float64, e.g. MPS) and rounds once to the
tensor's dtype, so its results are as exact as the dtype allows.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .._common import WeightStats, coef_tensor, result_dtype


NAME = "torch"


def why_not(device: torch.device) -> str:
    return ""  # any device


def _hp(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def weight_stats(tensors: List[Tensor]):
    rd = result_dtype(tensors)
    l1, l2, linf, nnz = [], [], [], []
    for t in tensors:
        x = t.detach().to(_hp(t)).reshape(-1)
        a = x.abs()
        l1.append(a.sum())
        l2.append(x.square().sum().sqrt())
        linf.append(a.max() if a.numel() else a.new_zeros(()))
        nnz.append(torch.count_nonzero(x))
    stack = lambda xs, dt: torch.stack(xs).to(dt)  # noqa: E731
    return WeightStats(stack(l1, rd), stack(l2, rd), stack(linf, rd), stack(nnz, torch.int64))


def _per_tensor(c, tensors: List[Tensor]) -> Tensor:
    return coef_tensor(c, len(tensors), tensors[0].device)


def _delta(t: Tensor, r: Optional[Tensor]) -> Tensor:
    """t (or t - r, toward a reference) in the computing dtype."""
    x = t.detach().to(_hp(t))
    return x if r is None else x - r.detach().to(_hp(t))


def _refs(tensors: List[Tensor], ref: Optional[List[Tensor]]) -> list:
    return [None] * len(tensors) if ref is None else list(ref)


def penalty(tensors: List[Tensor], l1, l2, ref: Optional[List[Tensor]] = None) -> Tensor:
    l1, l2 = _per_tensor(l1, tensors), _per_tensor(l2, tensors)
    total = l1.new_zeros(())
    for i, (t, r) in enumerate(zip(tensors, _refs(tensors, ref))):
        d = _delta(t, r)
        total = total + l1[i] * d.abs().sum() + l2[i] * d.square().sum()
    return total.to(result_dtype(tensors))


def add_penalty_grad_(tensors: List[Tensor], grads: List[Tensor], l1, l2,
                      ref: Optional[List[Tensor]] = None) -> Tensor:
    l1, l2 = _per_tensor(l1, tensors), _per_tensor(l2, tensors)
    value = penalty(tensors, l1, l2, ref)
    for i, (w, g, r) in enumerate(zip(tensors, grads, _refs(tensors, ref))):
        d = _delta(w, r)
        g.copy_(g.to(d.dtype) + (l1[i] * torch.sign(d) + 2 * l2[i] * d))
    return value


def _shrink(x: Tensor, t, scale) -> Tensor:
    """sign(x) * max(|x| - t, 0) * scale, exactly 0 where |x| <= t (NaN
    compares false: it propagates)."""
    shrunk = torch.sign(x) * (x.abs() - t) * scale
    return torch.where(x.abs() <= t, torch.zeros_like(x), shrunk)


def prox_(tensors: List[Tensor], l1, l2, lr, ref: Optional[List[Tensor]] = None) -> Tensor:
    """w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2). Toward a reference r:
    w <- r + prox(w - r), each of the three steps rounded to w's dtype (as
    the three tensor ops would be); the count is then of w != r."""
    l1, l2, lr = (_per_tensor(c, tensors) for c in (l1, l2, lr))
    nnz = []
    for i, (w, r) in enumerate(zip(tensors, _refs(tensors, ref))):
        t, scale = lr[i] * l1[i], 1 / (1 + 2 * lr[i] * l2[i])
        if r is None:
            w.copy_(_shrink(w.detach().to(_hp(w)), t, scale))
            nnz.append(torch.count_nonzero(w))
        else:
            d = (w.detach() - r.detach()).to(_hp(w))  # rounded to w's dtype
            p = _shrink(d, t, scale).to(w.dtype)
            w.copy_(r.detach() + p)
            nnz.append(torch.count_nonzero(w != r))
    return torch.stack(nnz) if nnz else torch.zeros(0, dtype=torch.int64)


# --------------------------------------------------------------------------
# Group ops: group g of a tensor along dim = every element with index g in dim
# --------------------------------------------------------------------------
def kth_abs(tensors: List[Tensor], k: List[int], closest: bool = False) -> Tensor:
    """Per tensor the k-th smallest |w| (NaN the largest; 0 for k = 0), as
    float64. ``closest``: where ties at it leave #(|w| <= it) farther from
    k than the largest |w| below it would, that one (0 if there is none)."""
    out = []
    for t, kk in zip(tensors, k):
        a = t.detach().reshape(-1).to(_hp(t)).abs()
        if kk == 0:
            out.append(a.new_zeros(()))
            continue
        kth = a.kthvalue(kk).values
        if closest:
            below = a < kth
            n_lt = below.sum()
            n_le = n_lt + (a == kth).sum()
            lower = torch.where(below, a, torch.zeros_like(a)).amax()
            kth = torch.where(n_le - kk > kk - n_lt, lower, kth)
        out.append(kth)
    return torch.stack(out).to(torch.float64) if out else torch.zeros(0, dtype=torch.float64)


def _grouped(x: Tensor, dim: int) -> Tensor:
    """x as [groups, rest] (a view or copy; a 0-dim tensor is one group)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    g = x.shape[dim]
    return x.movedim(dim, 0).reshape(g, x.numel() // g if g else 0)


def _norms(x: Tensor, dim: int) -> Tensor:
    return _grouped(x, dim).square().sum(dim=1).sqrt()


def _scaled(w: Tensor, x: Tensor, dim: int, f: Tensor) -> Tensor:
    """x (w's values, computing dtype) times its group's factor f, shaped as w."""
    if w.dim() == 0:
        return x * f[0]
    shape = [1] * w.dim()
    shape[dim] = -1
    return x * f.reshape(shape)


def group_norms(tensors: List[Tensor], dims: List[int]) -> Tensor:
    """||w_g||_2 of every group of every tensor, concatenated."""
    parts = [_norms(t.detach().to(_hp(t)), d) for t, d in zip(tensors, dims)]
    return torch.cat(parts).to(result_dtype(tensors))


def group_penalty(tensors: List[Tensor], dims: List[int], group_l1) -> Tensor:
    c = _per_tensor(group_l1, tensors)
    total = c.new_zeros(())
    for i, (t, d) in enumerate(zip(tensors, dims)):
        total = total + c[i] * _norms(t.detach().to(_hp(t)), d).sum()
    return total.to(result_dtype(tensors))


def add_group_penalty_grad_(tensors: List[Tensor], grads: List[Tensor], dims: List[int], group_l1) -> Tensor:
    """g += group_l1 * w_g / ||w_g||_2 (0 for a zero group)."""
    c = _per_tensor(group_l1, tensors)
    value = group_penalty(tensors, dims, c)
    for i, (w, g, d) in enumerate(zip(tensors, grads, dims)):
        x = w.detach().to(_hp(w))
        n = _norms(x, d)
        f = torch.where(n == 0, torch.zeros_like(n), c[i] / n)
        g.copy_(g.to(x.dtype) + _scaled(w, x, d, f))
    return value


def group_prox_(tensors: List[Tensor], dims: List[int], l1, group_l1, l2, lr) -> Tensor:
    """The exact prox of lr * (l1 |w|_1 + group_l1 sum_g ||w_g||_2 + l2 |w|^2):
    s = the element soft-threshold by lr*l1 (rounded to w's dtype), then
    w_g <- s_g * max(0, 1 - lr*group_l1 / ||s_g||) / (1 + 2*lr*l2), 0 where
    ||s_g|| <= lr*group_l1. Returns the groups not set to zero, per tensor."""
    l1, gl1, l2, lr = (_per_tensor(c, tensors) for c in (l1, group_l1, l2, lr))
    out = []
    for i, (w, d) in enumerate(zip(tensors, dims)):
        s = _shrink(w.detach().to(_hp(w)), lr[i] * l1[i], 1.0).to(w.dtype).to(_hp(w))
        n = _norms(s, d)
        t, scale = lr[i] * gl1[i], 1 / (1 + 2 * lr[i] * l2[i])
        f = torch.where(n <= t, torch.zeros_like(n), (1 - t / n) * scale)
        w.copy_(_scaled(w, s, d, f))
        out.append(torch.count_nonzero(f))
    return torch.stack(out)


def max_norm_(tensors: List[Tensor], dims: List[int], max_value) -> Tensor:
    """w_g <- w_g * min(1, max_value / ||w_g||_2); returns the groups scaled."""
    c = _per_tensor(max_value, tensors)
    out = []
    for i, (w, d) in enumerate(zip(tensors, dims)):
        x = w.detach().to(_hp(w))
        n = _norms(x, d)
        f = torch.where(n > c[i], c[i] / n, torch.ones_like(n))
        w.copy_(_scaled(w, x, d, f))
        out.append(torch.count_nonzero(n > c[i]))
    return torch.stack(out)


# --------------------------------------------------------------------------
# The fused optimizer step
# --------------------------------------------------------------------------
#: Columns of the hyperparameter table (one row per param group), as in
#: csrc/common/hyper.h (the compiled module's hyper_fields(), checked at load).
HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum", "dampening", "lr_decay", "alpha", "l1",
         "l2")
SGD, ADAM, ADAGRAD, RMSPROP = 0, 1, 2, 3
NO_PROX, PLAIN_PROX, METRIC_PROX = 0, 1, 2


def optim_step(algo: int, params: List[Tensor], grads: List[Tensor], s1: List[Tensor], s2: List[Tensor],
               s3: List[Tensor], steps: List[Tensor], group: List[int], fresh: List[int], hyper: Tensor, *,
               decoupled: bool, amsgrad: bool, maximize: bool, nesterov: bool, prox: int,
               centered: bool = False, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, ticket: Optional[Tensor] = None) -> None:
    """One step of SGD (algo 0), Adam/AdamW (1), Adagrad (2) or RMSprop (3) on every param,
    then its group's prox, in place: torch.optim's single-tensor algorithms,
    computed in float64 and rounded once per stored value.

    ``s1``/``s2``/``s3``: the state buffers (SGD momentum_buffer; Adam exp_avg,
    exp_avg_sq, max_exp_avg_sq; Adagrad sum; RMSprop square_avg,
    momentum_buffer (given when momentum > 0), grad_avg (``centered``)), an
    empty list when unused; ``steps``: the step counters (Adam, Adagrad,
    RMSprop), incremented; ``group``: each
    param's row of ``hyper`` (float64, columns :data:`HYPER`); ``fresh`` (SGD):
    1 where the momentum buffer starts now (buf = grad).

    The prox (``prox``): none, or w <- sign(w) max(|w| - lr l1, 0) / (1 + 2 lr l2)
    with the group's lr (as :func:`prox_`), or the same with each element's own
    step size lr_e in place of lr (the optimizer's metric): Adam
    lr / (sqrt(v_hat) + eps), Adagrad clr / (sqrt(sum) + eps), RMSprop
    lr / (sqrt(square_avg [- grad_avg^2]) + eps) (SGD: lr).

    ``grad_scale``/``found_inf`` (GradScaler, float32 scalars): grads are divided
    by grad_scale (and stored so); found_inf != 0 leaves everything unchanged.
    ``ticket``: the CUDA kernels' (see ``CompiledKernels.optim_step``), unused here.
    """
    skip = None if found_inf is None else found_inf.detach().to(torch.float64) != 0

    def store(dst: Tensor, value: Tensor) -> None:
        value = value.to(dst.dtype)
        dst.copy_(value if skip is None else torch.where(skip, dst, value))

    for i, p in enumerate(params):
        hp = _hp(p)
        h = dict(zip(HYPER, hyper[group[i]].to(hp).unbind()))
        lr, wd = h["lr"], h["weight_decay"]
        x = p.detach().to(hp)
        g = grads[i].detach().to(hp)
        if grad_scale is not None:
            g = g / grad_scale.detach().to(hp)
            store(grads[i], g)
        if maximize:
            g = -g
        step = None
        if algo != SGD:
            step = steps[i] + 1  # in the counter's dtype, as torch's step_t += 1
            store(steps[i], step)
            step = step.to(hp)
        coupled_wd = algo != ADAM or not decoupled
        g = torch.where(wd != 0, g + wd * x, g) if coupled_wd else g
        metric_lr = lr  # what the metric prox divides by each element's denominator
        denom = None
        if algo == SGD:
            if s1:
                buf = g if fresh[i] else s1[i].detach().to(hp) * h["momentum"] + (1 - h["dampening"]) * g
                store(s1[i], buf)
                g = g + h["momentum"] * buf if nesterov else buf
            x = x - lr * g
        elif algo == ADAM:
            if decoupled:
                x = torch.where(wd != 0, x * (1 - lr * wd), x)
            m = s1[i].detach().to(hp)
            m = m + (1 - h["beta1"]) * (g - m)
            v = s2[i].detach().to(hp) * h["beta2"] + (1 - h["beta2"]) * g * g
            store(s1[i], m)
            store(s2[i], v)
            if amsgrad:
                v = torch.maximum(s3[i].detach().to(hp), v)
                store(s3[i], v)
            bc1, bc2 = 1 - h["beta1"] ** step, 1 - h["beta2"] ** step
            denom = v.sqrt() / bc2.sqrt() + h["eps"]
            x = x - (lr / bc1) * m / denom
        elif algo == RMSPROP:
            alpha = h["alpha"]
            sq = s1[i].detach().to(hp) * alpha + (1 - alpha) * g * g
            store(s1[i], sq)
            if centered:
                ga = s3[i].detach().to(hp)
                ga = ga + (1 - alpha) * (g - ga)  # lerp(grad_avg, g, 1 - alpha)
                store(s3[i], ga)
                avg = (sq - ga * ga).sqrt()
            else:
                avg = sq.sqrt()
            denom = avg + h["eps"]
            if s2:  # momentum > 0
                buf = s2[i].detach().to(hp) * h["momentum"] + g / denom
                store(s2[i], buf)
                x = x - lr * buf
            else:
                x = x - lr * g / denom
        else:
            clr = lr / (1 + (step - 1) * h["lr_decay"])
            s = s1[i].detach().to(hp) + g * g
            store(s1[i], s)
            denom = s.sqrt() + h["eps"]
            x = x - clr * g / denom
            metric_lr = clr
        if prox == PLAIN_PROX or (prox == METRIC_PROX and algo == SGD):
            x = _shrink(x, lr * h["l1"], 1 / (1 + 2 * lr * h["l2"]))
        elif prox == METRIC_PROX:
            lr_e = metric_lr / denom
            x = _shrink(x, lr_e * h["l1"], 1 / (1 + 2 * lr_e * h["l2"]))
        store(p, x)
