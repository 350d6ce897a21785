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
