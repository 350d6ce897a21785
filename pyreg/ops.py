"""pyreg's public ops. Each covers a whole list of tensors (all layers of a
model) in one call:

    weight_stats(tensors)                       -> WeightStats(l1, l2, linf, nnz)
    penalty(tensors, l1, l2)                    -> 0-dim tensor, differentiable
    add_penalty_grad_(tensors, grads, l1, l2)   -> 0-dim tensor (penalty value)
    prox_(tensors, l1, l2, lr)                  -> 1-D int64 (nonzeros per tensor)

Each function validates its arguments (_validate.py), normalizes the
coefficients, and runs: lists of DTensors through pyreg.distributed; in plain
eager mode the backend directly (``_eager``); otherwise the custom op
(_ops.py), which works under ``torch.compile`` and the dispatcher's modes.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from ._common import WeightStats, coef_tensor, has_dtensor
from ._ops import add_penalty_grad_op, penalty_op, prox_op, weight_stats_op
from ._validate import Coefficient, check_grads_apart, check_no_overlap, coefficient, tensor_list

_dtype_of, _shape_of, _requires_grad = attrgetter("dtype"), attrgetter("shape"), attrgetter("requires_grad")
#: Types whose tensors the kernels may read through data_ptr() in plain eager
#: mode: torch.Tensor and nn.Parameter (which adds no torch_function behaviour).
_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})


def _distributed():
    from . import distributed  # imported on first use: it loads torch.distributed
    return distributed


# --------------------------------------------------------------------------
# Eager fast path: the same backend call, without the dispatcher
# --------------------------------------------------------------------------
def _eager(inputs: Sequence[Tensor], mutated: Sequence[Tensor],
           call: Callable[[object], object]) -> Optional[object]:
    """``call(backend)`` run directly, when the custom op would add only cost
    (about 1.5 us per tensor in the dispatcher; same backend, kernels and
    results): not tracing, no dispatch mode active, plain tensors (``Tensor``
    or ``nn.Parameter``), and no inference tensor to mutate outside inference
    mode (the op raises for that). The versions of ``mutated`` are then bumped,
    as the dispatcher does, so autograd sees the change to any of them saved for
    backward. Returns None where the custom op must run instead."""
    if (torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None
            or not set(map(type, inputs)) <= _PLAIN_TYPES
            or not set(map(type, mutated)) <= _PLAIN_TYPES
            or (not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, mutated)))):
        return None
    out = call(backends.for_tensors(inputs or mutated))
    if mutated:
        torch.autograd.graph.increment_version(list(mutated))
    return out


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------
def weight_stats(tensors: Iterable[Tensor]) -> WeightStats:
    """Per-tensor sum|w|, sqrt(sum w^2), max|w| and count of w != 0, in one pass.

    Returns ``WeightStats(l1, l2, linf, nnz)``: four 1-D tensors on the tensors'
    device with one entry per tensor (float64 if any tensor is float64, else
    float32; nnz is int64).
    """
    ts = tensor_list(tensors)
    if not ts:
        e = torch.zeros(0)
        return WeightStats(e, e.clone(), e.clone(), torch.zeros(0, dtype=torch.int64))
    if has_dtensor(ts):
        return _distributed().weight_stats(ts)
    with torch.no_grad():
        out = _eager(ts, (), lambda be: be.weight_stats(ts))
    if out is not None:
        return WeightStats(*out)
    return WeightStats(*weight_stats_op([t.detach() for t in ts]))


def penalty(tensors: Iterable[Tensor], l1: Coefficient = 0.0, l2: Coefficient = 0.0) -> Tensor:
    """sum_i l1_i * ||w_i||_1 + l2_i * ||w_i||_2^2 as a 0-dim tensor.

    Differentiable with respect to the tensors: the gradient is
    l1 * sign(w) + 2 * l2 * w, with sign(0) = 0. ``l1`` and ``l2`` are numbers
    (all tensors) or one value per tensor (a sequence or 1-D tensor); they are
    constants for autograd.
    """
    ts = tensor_list(tensors)
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2 = coefficient(l1, n, dev, "l1"), coefficient(l2, n, dev, "l2")
    if not ts:
        return torch.zeros(())
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(map(_requires_grad, ts))):
        out = _eager(ts, (), lambda be: be.penalty(ts, c1, c2))
        if out is not None:
            return out
    c1, c2 = coef_tensor(c1, n, dev), coef_tensor(c2, n, dev)
    if has_dtensor(ts):
        return _distributed().penalty(ts, c1, c2)
    return penalty_op(ts, c1, c2)


def add_penalty_grad_(tensors: Iterable[Tensor], grads: Iterable[Tensor],
                      l1: Coefficient = 0.0, l2: Coefficient = 0.0) -> Tensor:
    """In place, g_i += l1_i * sign(w_i) + 2 * l2_i * w_i for every pair.

    Returns the penalty value (as ``penalty``), computed in the same pass.
    """
    ts = tensor_list(tensors)
    gs = tensor_list(grads, "grads")
    if len(gs) != len(ts):
        raise ValueError(f"got {len(ts)} tensors but {len(gs)} grads")
    if ts and (torch.compiler.is_compiling()  # Dynamo traces the loop below, not map()
               or gs[0].device != ts[0].device  # one device per list
               or list(map(_dtype_of, gs)) != list(map(_dtype_of, ts))
               or list(map(_shape_of, gs)) != list(map(_shape_of, ts))):
        for i, (t, g) in enumerate(zip(ts, gs)):
            if g.shape != t.shape or g.dtype != t.dtype or g.device != t.device:
                raise ValueError(f"grads[{i}] is {tuple(g.shape)} {g.dtype} on {g.device} but "
                                 f"tensors[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}")
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2 = coefficient(l1, n, dev, "l1"), coefficient(l2, n, dev, "l2")
    if not ts:
        return torch.zeros(())
    if has_dtensor(ts) or has_dtensor(gs):
        return _distributed().add_penalty_grad_(ts, gs, coef_tensor(c1, n, dev), coef_tensor(c2, n, dev))
    check_grads_apart(ts, gs)
    with torch.no_grad():
        out = _eager(ts, gs, lambda be: be.add_penalty_grad_(ts, gs, c1, c2))
        if out is not None:
            return out
        return add_penalty_grad_op([t.detach() for t in ts], gs, coef_tensor(c1, n, dev),
                                   coef_tensor(c2, n, dev))


def prox_(tensors: Iterable[Tensor], l1: Coefficient = 0.0, l2: Coefficient = 0.0, lr: Coefficient = 1.0) -> Tensor:
    """In place, the proximal step of lr * (l1 * ||w||_1 + l2 * ||w||_2^2):

        w <- sign(w) * max(|w| - lr * l1, 0) / (1 + 2 * lr * l2)

    Weights with |w| <= lr * l1 become exactly 0. Returns the count of nonzeros
    of each tensor after the step (1-D int64), from the same pass.
    """
    ts = tensor_list(tensors)
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2, clr = (coefficient(c, n, dev, name) for c, name in ((l1, "l1"), (l2, "l2"), (lr, "lr")))
    if not ts:
        return torch.zeros(0, dtype=torch.int64)
    if has_dtensor(ts):
        return _distributed().prox_(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)))
    check_no_overlap(ts, "tensors")
    with torch.no_grad():
        out = _eager((), ts, lambda be: be.prox_(ts, c1, c2, clr))
        if out is not None:
            return out
        return prox_op(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)))
