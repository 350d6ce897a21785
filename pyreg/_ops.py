"""pyreg's op definitions: the ``torch.library.custom_op`` schemas (namespace
``pyreg``), their fake kernels and autograd, and the dispatch of each call to
a backend. Nothing here validates: the public functions (ops.py) do, and call
these ops (or, in plain eager mode, the backend directly).

    pyreg::weight_stats(tensors) -> (l1, l2, linf, nnz)
    pyreg::penalty(tensors, l1, l2) -> 0-dim, differentiable in tensors
    pyreg::add_penalty_grad_(tensors, grads!, l1, l2) -> 0-dim (the penalty)
    pyreg::prox_(tensors!, l1, l2, lr) -> 1-D int64 (nonzeros per tensor)

Coefficients are 1-D float64 tensors with one entry per tensor, on the
tensors' device. No ``from __future__ import annotations`` here: custom_op
reads these annotations as types.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from . import backends
from ._common import result_dtype


@torch.library.custom_op("pyreg::weight_stats", mutates_args=())
def weight_stats_op(tensors: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(backends.for_tensors(tensors).weight_stats(tensors))


@weight_stats_op.register_fake
def _(tensors):
    n, rd, dev = len(tensors), result_dtype(tensors), tensors[0].device
    f = lambda dt: torch.empty(n, dtype=dt, device=dev)  # noqa: E731
    return f(rd), f(rd), f(rd), f(torch.int64)


@torch.library.custom_op("pyreg::penalty", mutates_args=())
def penalty_op(tensors: List[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    return backends.for_tensors(tensors).penalty(tensors, l1, l2)


@penalty_op.register_fake
def _(tensors, l1, l2):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


def _penalty_setup(ctx, inputs, output):
    tensors, l1, l2 = inputs
    ctx.save_for_backward(l1, l2, *tensors)


def _penalty_backward(ctx, grad_out):
    l1, l2, *tensors = ctx.saved_tensors
    grads = [torch.zeros_like(t) for t in tensors]
    go = grad_out.to(l1.dtype)
    add_penalty_grad_op(tensors, grads, l1 * go, l2 * go)
    return grads, None, None


penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)


@torch.library.custom_op("pyreg::add_penalty_grad_", mutates_args=("grads",))
def add_penalty_grad_op(tensors: List[Tensor], grads: List[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    return backends.for_tensors(tensors).add_penalty_grad_(tensors, grads, l1, l2)


@add_penalty_grad_op.register_fake
def _(tensors, grads, l1, l2):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("pyreg::prox_", mutates_args=("tensors",))
def prox_op(tensors: List[Tensor], l1: Tensor, l2: Tensor, lr: Tensor) -> Tensor:
    return backends.for_tensors(tensors).prox_(tensors, l1, l2, lr)


@prox_op.register_fake
def _(tensors, l1, l2, lr):
    return torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)
