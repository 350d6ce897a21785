"""The ``torch`` backend: every op in plain PyTorch, one tensor at a time.

This is pyreg's specification. The tests compare the compiled kernels with it,
and it is the fallback for devices without compiled kernels. It computes in
float64 (float32 on devices without float64, e.g. MPS) and rounds once to the
tensor's dtype, so its results are as exact as the dtype allows.
"""
from __future__ import annotations

from typing import List

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


def _sums(t: Tensor):
    x = t.detach().to(_hp(t))
    return x.abs().sum(), x.square().sum()


def penalty(tensors: List[Tensor], l1, l2) -> Tensor:
    l1, l2 = _per_tensor(l1, tensors), _per_tensor(l2, tensors)
    total = l1.new_zeros(())
    for i, t in enumerate(tensors):
        s1, s2 = _sums(t)
        total = total + l1[i] * s1 + l2[i] * s2
    return total.to(result_dtype(tensors))


def add_penalty_grad_(tensors: List[Tensor], grads: List[Tensor], l1, l2) -> Tensor:
    l1, l2 = _per_tensor(l1, tensors), _per_tensor(l2, tensors)
    value = penalty(tensors, l1, l2)
    for i, (w, g) in enumerate(zip(tensors, grads)):
        hp = _hp(w)
        x = w.detach().to(hp)
        g.copy_(g.to(hp) + (l1[i] * torch.sign(x) + 2 * l2[i] * x))
    return value


def prox_(tensors: List[Tensor], l1, l2, lr) -> Tensor:
    l1, l2, lr = (_per_tensor(c, tensors) for c in (l1, l2, lr))
    nnz = []
    for i, w in enumerate(tensors):
        x = w.detach().to(_hp(w))
        a = x.abs()
        t = lr[i] * l1[i]
        shrunk = torch.sign(x) * (a - t) / (1 + 2 * lr[i] * l2[i])
        # exact zeros where |w| <= lr*l1 (NaN compares false: it propagates)
        w.copy_(torch.where(a <= t, torch.zeros_like(x), shrunk))
        nnz.append(torch.count_nonzero(w))
    return torch.stack(nnz) if nnz else torch.zeros(0, dtype=torch.int64)
