"""What a step does to the plan's buckets (plan.py), the functional core of
both optimizer families: the proximal step (element-wise, toward a
reference, sparse group lasso), the penalty gradient, the max-norm
projection, and the penalty of the weights as they are. Each bucket is one
call of a fused op (or of the backend's direct entry, for plain CPU lists
already checked).
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends, ops
from .._validate import check_grads_apart, disjoint_pointers, plain_cpu, tensor_list
from .plan import Plan, Work
from .results import ParamStats, Sparsity

def prox_buckets(buckets: Sequence[Tuple[Work, Tensor]]) -> None:
    """The proximal step of each bucket ``(work, lr)`` (lr: one float64 per
    tensor on the params' device), in place: element-wise L1/L2 (``prox_``,
    toward the refs in a "ref" bucket), or the exact sparse-group-lasso prox
    with L2 (``group_prox_``) in a "group" bucket."""
    eager = not torch.compiler.is_compiling()
    be = _direct_backend() if eager else None
    for w, lr in buckets:
        c = partial(w.coef, eager=eager)
        d = w.bucket.direct() if be is not None and w.params is w.bucket.params else None
        if d is not None:  # the checks were made: straight to the kernels
            be.prox_ptrs(d[0], d[1], d[2], c("l1"), c("l2"), lr, d[3])
            torch.autograd.graph.increment_version(w.params)
        elif w.kind == "group":
            ops.group_prox_(w.params, c("group_l1"), lr, w.dims, element_l1=c("l1"), l2=c("l2"))
        else:
            ops.prox_(w.params, c("l1"), c("l2"), lr, ref=w.refs)


def _direct_backend():
    """The cpu backend when a step may call it directly (plain eager mode,
    no dispatch mode, no other backend forced), else None."""
    return None if _get_current_dispatch_mode() is not None else backends.eager_cpu()


def max_norm_buckets(buckets: Sequence[Work]) -> None:
    """The max-norm projection of each "max_norm" bucket, in place."""
    eager = not torch.compiler.is_compiling()
    for w in buckets:
        ops.max_norm_(w.params, w.coef("max_norm", eager), w.dims)


def add_penalty_grads(buckets: Sequence[Work]) -> Tensor:
    """Adds the gradient of each bucket's penalty to its params' grads
    (``l1 * sign(d) + 2 * l2 * d`` with d = w, or w - ref in a "ref" bucket;
    plus ``group_l1 * w_g / ||w_g||`` in a "group" bucket); returns the total
    penalty of the params (0-dim). With several buckets, every bucket's grads
    are checked before the first one is written, so a bad grad changes nothing."""
    grads = [[p.grad for p in w.params] for w in buckets]
    eager = not torch.compiler.is_compiling()
    be = _direct_backend() if eager else None
    # Buckets whose params and grads pass the direct path's checks (see
    # _direct_grads) go straight to the kernels; the others through the op.
    direct = [_direct_grads(w, gs) if be is not None else None for w, gs in zip(buckets, grads)]
    if len(buckets) > 1 and eager:
        for w, gs, d in zip(buckets, grads, direct):
            if d is None:
                check_grads_apart(w.params, tensor_list(gs, "grads"))
    total = None
    for w, gs, d in zip(buckets, grads, direct):
        c = partial(w.coef, eager=eager)
        if d is not None:
            b, gptrs = d
            value = torch.empty((), dtype=torch.float64 if w.params[0].dtype is torch.float64 else torch.float32)
            be.add_penalty_grad_ptrs(b[0], b[1], b[2], gptrs, c("l1"), c("l2"), value)
            torch.autograd.graph.increment_version(gs)
        else:
            value = ops.add_penalty_grad_(w.params, gs, c("l1"), c("l2"), ref=w.refs)
        if w.kind == "group":
            value = _sum(value, ops.add_group_penalty_grad_(w.params, gs, c("group_l1"), w.dims))
        total = value if total is None else _sum(total, value)
    return total if total is not None else torch.zeros(())


def _direct_grads(w: Work, gs: List[Optional[Tensor]]) -> Optional[Tuple[list, List[int]]]:
    """(the bucket's ``direct()`` arguments, the grads' pointers) when the
    kernels may take this bucket and these grads directly: the whole bucket,
    and grads that are plain contiguous CPU tensors of the params' dtype and
    sizes, not inference tensors, sharing no memory with each other or with
    any param. Else None (the op then checks, and explains)."""
    if w.params is not w.bucket.params:
        return None
    b = w.bucket.direct()
    if (b is None or not plain_cpu(gs) or gs[0].dtype is not w.params[0].dtype
            or list(map(Tensor.numel, gs)) != b[1] or any(map(Tensor.is_inference, gs))):
        return None
    gptrs = list(map(Tensor.data_ptr, gs))
    if gptrs != b[4]:  # grads elsewhere than the last checked ones: check again
        ptrs = disjoint_pointers(gs + w.params)
        if ptrs is None:
            return None
        b[4] = gptrs
    return b, gptrs


def penalty_of(buckets: Sequence[Work]) -> Tensor:
    """The total penalty of the buckets' params as they are now (0-dim)."""
    total = None
    for w in buckets:
        c = w.coefs
        ps = [p.detach() for p in w.params]
        value = ops.penalty(ps, c["l1"], c["l2"], ref=w.refs)
        if w.kind == "group":
            value = _sum(value, ops.group_penalty(ps, c["group_l1"], w.dims))
        total = value if total is None else _sum(total, value)
    return total if total is not None else torch.zeros(())


def _sum(a: Tensor, b: Tensor) -> Tensor:
    """a + b for 0-dim results of different buckets (dtype and device of the widest / first)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt) + b.to(device=a.device, dtype=dt)


def stats(plan: Plan) -> ParamStats:
    """:class:`ParamStats` of every parameter of the plan's groups."""
    parts = [ops.weight_stats(ps) for ps in plan.stat_buckets]
    if not parts:
        e = torch.zeros(0)
        return ParamStats([], e, e.clone(), e.clone(), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64))
    dev = plan.first_device
    rd = torch.float64 if any(s.l1.dtype == torch.float64 for s in parts) else torch.float32

    def cat(field, dtype):
        return torch.cat([getattr(s, field).to(device=dev, dtype=dtype) for s in parts])[plan.inverse]

    return ParamStats(list(plan.names), cat("l1", rd), cat("l2", rd), cat("linf", rd),
                      cat("nnz", torch.int64), plan.numel)


def sparsity(s: ParamStats) -> Sparsity:
    """Fraction of exact zeros, overall and per parameter, from ``s``."""
    numel = s.numel.to(torch.float64)
    zeros = numel - s.nnz.to(torch.float64)
    per = (zeros / numel.clamp_min(1)).to(torch.float32)
    overall = (zeros.sum() / numel.sum().clamp_min(1)).to(torch.float32)
    return Sparsity(overall, per, s.names)
