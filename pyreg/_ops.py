"""pyreg's op definitions: the ``torch.library.custom_op`` schemas (namespace
``pyreg``), their fake kernels and autograd, and the dispatch of each call to
a backend. Nothing here validates: the public functions (ops.py) do, and call
these ops (or, in plain eager mode, the backend directly).

    pyreg::weight_stats(tensors) -> (l1, l2, linf, nnz)
    pyreg::penalty(tensors, l1, l2, ref?) -> 0-dim, differentiable in tensors
    pyreg::add_penalty_grad_(tensors, grads!, l1, l2, ref?) -> 0-dim (the penalty)
    pyreg::prox_(tensors!, l1, l2, lr, ref?) -> 1-D int64 (nonzeros per tensor)
    pyreg::group_norms(tensors, dims) -> 1-D (every group's norm, concatenated)
    pyreg::group_penalty(tensors, dims, group_l1) -> 0-dim, differentiable in tensors
    pyreg::add_group_penalty_grad_(tensors, grads!, dims, group_l1) -> 0-dim
    pyreg::group_prox_(tensors!, dims, l1, group_l1, l2, lr) -> 1-D int64 (nonzero groups)
    pyreg::max_norm_(tensors!, dims, max_value) -> 1-D int64 (groups scaled)
    pyreg::kth_abs(tensors, k, closest) -> 1-D float64 (the k-th smallest |w| per tensor)

Coefficients are 1-D float64 tensors with one entry per tensor, on the
tensors' device; ``ref`` is a list of tensors like ``tensors``, or empty (none);
``dims`` holds each tensor's group dimension, normalized (0 <= dim). No ``from __future__ import annotations`` here: custom_op
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
def penalty_op(tensors: List[Tensor], l1: Tensor, l2: Tensor, ref: List[Tensor]) -> Tensor:
    return backends.for_tensors(tensors).penalty(tensors, l1, l2, ref or None)


@penalty_op.register_fake
def _(tensors, l1, l2, ref):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


class _KernelGrad(torch.autograd.Function):
    """A penalty's grad (from its kernel, outside autograd) as a function of
    the penalized tensor whose own backward raises: a second derivative
    through it is refused, not silently computed without the penalty."""

    @staticmethod
    def forward(ctx, grad: Tensor, tensor: Tensor, message: str) -> Tensor:
        ctx.message = message
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(ctx.message)


def _differentiable_once(grads: List[Tensor], inputs: List[Tensor], op: str, formula: str) -> List[Tensor]:
    """The grads of a penalty's backward, as :class:`_KernelGrad` where that
    backward builds a graph (``create_graph=True``: grad mode on) and the
    input requires grad."""
    if not torch.is_grad_enabled():
        return grads
    message = (f"pyreg.{op}'s gradient is computed by its kernel and cannot be differentiated again (a second "
               f"derivative through create_graph=True); for one, write the penalty in torch ops: {formula}")
    return [_KernelGrad.apply(g, t, message) if t.requires_grad else g for g, t in zip(grads, inputs)]


def _penalty_setup(ctx, inputs, output):
    tensors, l1, l2, ref = inputs
    ctx.n = len(tensors)
    ctx.save_for_backward(l1, l2, *tensors, *ref)


def _penalty_backward(ctx, grad_out):
    l1, l2, *rest = ctx.saved_tensors
    tensors, ref = rest[:ctx.n], rest[ctx.n:]
    grads = [torch.zeros_like(t) for t in tensors]
    go = grad_out.to(l1.dtype)
    add_penalty_grad_op(tensors, grads, l1 * go, l2 * go, ref)
    grads = _differentiable_once(grads, tensors, "penalty",
                                 "l1 * (w - ref).abs().sum() + l2 * (w - ref).square().sum()")
    return grads, None, None, [None] * len(ref)


penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)


@torch.library.custom_op("pyreg::add_penalty_grad_", mutates_args=("grads",))
def add_penalty_grad_op(tensors: List[Tensor], grads: List[Tensor], l1: Tensor, l2: Tensor,
                        ref: List[Tensor]) -> Tensor:
    return backends.for_tensors(tensors).add_penalty_grad_(tensors, grads, l1, l2, ref or None)


@add_penalty_grad_op.register_fake
def _(tensors, grads, l1, l2, ref):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("pyreg::prox_", mutates_args=("tensors",))
def prox_op(tensors: List[Tensor], l1: Tensor, l2: Tensor, lr: Tensor,
            ref: List[Tensor]) -> Tensor:
    return backends.for_tensors(tensors).prox_(tensors, l1, l2, lr, ref or None)


@prox_op.register_fake
def _(tensors, l1, l2, lr, ref):
    return torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)


# --------------------------------------------------------------------------
# Group ops
# --------------------------------------------------------------------------
def group_count(tensors: List[Tensor], dims: List[int]) -> int:
    """Groups of all tensors together (a 0-dim tensor is one group)."""
    return sum(t.shape[d] if t.dim() else 1 for t, d in zip(tensors, dims))


@torch.library.custom_op("pyreg::group_norms", mutates_args=())
def group_norms_op(tensors: List[Tensor], dims: List[int]) -> Tensor:
    return backends.for_tensors(tensors).group_norms(tensors, dims)


@group_norms_op.register_fake
def _(tensors, dims):
    return torch.empty(group_count(tensors, dims), dtype=result_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("pyreg::group_penalty", mutates_args=())
def group_penalty_op(tensors: List[Tensor], dims: List[int], group_l1: Tensor) -> Tensor:
    return backends.for_tensors(tensors).group_penalty(tensors, dims, group_l1)


@group_penalty_op.register_fake
def _(tensors, dims, group_l1):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


def _group_penalty_setup(ctx, inputs, output):
    tensors, dims, group_l1 = inputs
    ctx.dims = list(dims)
    ctx.save_for_backward(group_l1, *tensors)


def _group_penalty_backward(ctx, grad_out):
    group_l1, *tensors = ctx.saved_tensors
    grads = [torch.zeros_like(t) for t in tensors]
    add_group_penalty_grad_op(tensors, grads, ctx.dims, group_l1 * grad_out.to(group_l1.dtype))
    grads = _differentiable_once(grads, tensors, "group_penalty",
                                 "group_l1 * the sum of the groups' torch.linalg.norm")
    return grads, None, None


group_penalty_op.register_autograd(_group_penalty_backward, setup_context=_group_penalty_setup)


@torch.library.custom_op("pyreg::add_group_penalty_grad_", mutates_args=("grads",))
def add_group_penalty_grad_op(tensors: List[Tensor], grads: List[Tensor], dims: List[int],
                              group_l1: Tensor) -> Tensor:
    return backends.for_tensors(tensors).add_group_penalty_grad_(tensors, grads, dims, group_l1)


@add_group_penalty_grad_op.register_fake
def _(tensors, grads, dims, group_l1):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("pyreg::group_prox_", mutates_args=("tensors",))
def group_prox_op(tensors: List[Tensor], dims: List[int], l1: Tensor, group_l1: Tensor, l2: Tensor,
                  lr: Tensor) -> Tensor:
    return backends.for_tensors(tensors).group_prox_(tensors, dims, l1, group_l1, l2, lr)


@group_prox_op.register_fake
def _(tensors, dims, l1, group_l1, l2, lr):
    return torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)


@torch.library.custom_op("pyreg::max_norm_", mutates_args=("tensors",))
def max_norm_op(tensors: List[Tensor], dims: List[int], max_value: Tensor) -> Tensor:
    return backends.for_tensors(tensors).max_norm_(tensors, dims, max_value)


@max_norm_op.register_fake
def _(tensors, dims, max_value):
    return torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------
@torch.library.custom_op("pyreg::kth_abs", mutates_args=())
def kth_abs_op(tensors: List[Tensor], k: List[int], closest: bool) -> Tensor:
    return backends.for_tensors(tensors).kth_abs(tensors, list(k), closest)


@kth_abs_op.register_fake
def _(tensors, k, closest):
    return torch.empty(len(tensors), dtype=torch.float64, device=tensors[0].device)
