"""What a step does to the plan's buckets (plan.py), the functional core of
both optimizer families: the proximal step (element-wise, toward a
reference, sparse group lasso), the penalty gradient, the constraints after
the step (the l2 bounds, the max-norm projection), and the penalty of the
weights as they are. Each bucket is one
call of a fused op (or of the backend's direct entry, for plain CPU lists
already checked).
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from itertools import repeat
from operator import attrgetter, is_, is_not
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends, ops
from .._common import SUPPORTED_DTYPES, capturing, has_dtensor, outside_graph, to_device
from .._validate import check_grads_apart, disjoint_pointers, first_unpaired, plain_cpu, tensor_list
from ..backends._marshal import plain_list
from .plan import Bucket, Plan, Work
from .results import ParamStats, Sparsity

#: The kinds of bucket whose regularizer is a penalty (the others are
#: constraints, applied after the step by :func:`constraints`).
PENALIZED = ("elem", "ref", "group", "target", "strength", "gstrength")
#: The kinds whose coefficient a refresh sets from the push (:func:`refresh_strength`).
STRENGTH_KINDS = ("strength", "gstrength")
#: What an ``l2_bound`` parameter keeps in the optimizer's state: its
#: multiplier (float64), the bound its warm start took (float64; +inf until
#: it takes one, and while a given bound is in force, which is not copied
#: there) and the steps it took (int64), 0-dim tensors on its device.
BOUND_STATE = ("l2_bound_lambda", "l2_bound_kappa", "l2_bound_step")
#: What a ``target_sparsity`` parameter keeps in the optimizer's state: the
#: l1 of its last step (float64, 0-dim, on its device).
TARGET_STATE = ("target_l1",)
#: What an ``l1_strength`` parameter keeps in the optimizer's state: the l1
#: its last refresh set (float64, 0-dim, on its device).
STRENGTH_STATE = ("strength_l1",)
#: What a ``group_strength`` parameter keeps: the group_l1 its last refresh set (float64, 0-dim).
GSTRENGTH_STATE = ("strength_group_l1",)
#: Its count of steps, for the next refresh (a number, on the host; see :func:`strength_due`).
STRENGTH_STEP = "strength_step"
#: Every state entry of pyreg's own (kept in its dtype by :func:`pop_own_state`).
OWN_STATE = BOUND_STATE + TARGET_STATE + STRENGTH_STATE + GSTRENGTH_STATE


def penalized(work: Sequence[Work]) -> List[Work]:
    """The buckets of ``work`` whose regularizer is a penalty."""
    return [w for w in work if w.kind in PENALIZED]


def constraints(work: Sequence[Work], state: Dict[Any, Dict[str, Any]], groups: Sequence[Dict[str, Any]]) -> None:
    """After the step: the l2 bounds (:func:`l2_bound_buckets`), then the
    max-norm projection (:func:`max_norm_buckets`); neither at a step where
    every group's lr is 0 (:func:`all_lrs_zero`)."""
    kinds = {w.kind for w in work}
    if not kinds & {"l2_bound", "max_norm"} or all_lrs_zero(groups):
        return
    if "l2_bound" in kinds:
        l2_bound_buckets([w for w in work if w.kind == "l2_bound"], state)
    if "max_norm" in kinds:
        max_norm_buckets([w for w in work if w.kind == "max_norm"])


def all_lrs_zero(groups: Sequence[Dict[str, Any]]) -> bool:
    """Whether every group's lr is 0 (a number, or a one-element CPU tensor,
    read without a device sync): a step that changes no parameter in torch's
    optimizers, so none of pyreg's passes that do not scale with lr (the l2
    bounds, max-norm) runs at it either. ``torch.distributed.checkpoint``'s
    ``get_state_dict`` makes such a step, with zero grads, to create an
    optimizer's state."""
    for g in groups:
        lr = g.get("lr")
        if isinstance(lr, Tensor):  # (not read in a graph: a compiled step runs the passes)
            if (lr.device.type != "cpu" or lr.numel() != 1 or torch.compiler.is_compiling()
                    or float(lr) != 0):
                return False
        elif not isinstance(lr, (int, float)) or lr != 0:
            return False
    return True


def prox_buckets(buckets: Sequence[Tuple[Work, Tensor]], state: Optional[Dict[Any, Dict[str, Any]]] = None,
                 vecs: Optional[Dict[int, Tensor]] = None,
                 metric: Optional[Dict[int, Tuple[List[Tensor], Optional[Tensor]]]] = None) -> None:
    """The proximal step of each bucket ``(work, lr)`` (lr: one float64 per
    tensor on the params' device), in place: element-wise L1/L2 (``prox_``,
    toward the refs in a "ref" bucket), the exact sparse-group-lasso prox
    with L2 (``group_prox_``) in a "group" bucket, or in a "target" bucket
    the element-wise prox with the l1 that meets each tensor's target
    (:func:`target_prox`, which keeps it in the optimizer's ``state``), or
    in a "strength" bucket the element-wise prox with each tensor's l1 as
    its last refresh set it (:func:`refresh_strength`). ``vecs``: those
    coefficients' vectors (:func:`strength_l1`) by bucket id, where the
    caller found the state holding them. ``metric``: by bucket id, a "target"
    bucket's step sizes in its optimizer's metric (see :func:`target_prox`)."""
    eager = not torch.compiler.is_compiling()
    be = direct_backend() if eager else None
    for w, lr in buckets:
        c = partial(w.coef, eager=eager)
        if w.kind == "target":  # (never traced by torch.compile: see target_prox_eager)
            target_prox_eager(w, lr, state if state is not None else {}, be,
                              None if metric is None else metric.get(id(w.bucket)))
            continue
        whole = be is not None and w.params is w.bucket.params
        d = w.bucket.direct() if whole else None
        gd = w.bucket.group_direct() if whole and d is None else None
        own = None if vecs is None else vecs.get(id(w.bucket))
        if d is not None:  # the checks were made: straight to the kernels
            l1 = (own if own is not None else strength_l1(w, state if state is not None else {})
                  ) if w.kind == "strength" else c("l1")
            be.prox_ptrs(d[0], d[1], d[2], l1, c("l2"), lr, d[3])
            torch.autograd.graph.increment_version(w.params)
        elif gd is not None:  # (the same for a group bucket, with its group shapes)
            d, shapes = gd
            gl1 = (own if own is not None else strength_l1(w, state if state is not None else {})
                   ) if w.kind == "gstrength" else c("group_l1")
            be.group_prox_ptrs(d[0], d[1], d[2], shapes, c("l1"), gl1, c("l2"), lr, d[3])
            torch.autograd.graph.increment_version(w.params)
        elif w.kind == "group":
            ops.group_prox_(w.params, c("group_l1"), lr, w.dims, element_l1=c("l1"), l2=c("l2"))
        elif w.kind == "strength":
            ops.prox_(w.params, strength_l1(w, state if state is not None else {}), c("l2"), lr)
        elif w.kind == "gstrength":
            ops.group_prox_(w.params, strength_l1(w, state if state is not None else {}), lr, w.dims,
                            element_l1=c("l1"), l2=c("l2"))
        else:
            ops.prox_(w.params, c("l1"), c("l2"), lr, ref=w.refs)


def target_prox(w: Work, lr, state: Dict[Any, Dict[str, Any]], be=None,
                metric: Optional[Tuple[List[Tensor], Optional[Tensor]]] = None) -> None:
    """``target_sparsity``: the element-wise prox of each tensor j (n_j
    elements, target t_j) with the smallest l1 that leaves it
    k_j = ceil(t_j * n_j) zeros: with tau_j the k_j-th smallest |w| of the
    tensor as the step left it (0 for a target of 0),

        l1_j = tau_j / lr,    w <- sign(w) * max(|w| - lr * l1_j, 0) / (1 + 2 * lr * l2)

    (l1_j one ulp larger where lr * l1_j would round below tau_j: see
    :func:`_per_lr`), so the weights with |w| <= tau_j, and only those, become exact zeros, and
    the others shrink by tau_j. Where weights tie at tau_j (common in 16-bit
    tensors: bfloat16 has 256 values per octave), tau_j is instead the
    largest |w| below it when that count is closer to k_j
    (:func:`pyreg.ops.kth_abs` with ``closest=True``). The target is met at
    every step, by any optimizer, with no warm-up; the l1 follows the weights
    (it is the L1 strength at which the target is the tensor's sparsity).
    Costs one selection call for the bucket, on the device, no host sync;
    the l1 used is in the optimizer's state (:data:`TARGET_STATE`, and in
    :attr:`penalty`). ``be``: the cpu backend, when the caller found that
    the kernels may be called directly (:func:`direct_backend`).

    ``metric``: ``(d, div)``, the prox in the optimizer's own metric
    (``preconditioned=True``), where weight i of tensor j steps by
    ``lr_j / d_i`` (d: one tensor per param, in the compute dtype, the
    divisor of its step size, as ``sqrt(v_hat) + eps`` for Adam) and the
    metric's lr is ``m_j = lr_j / div_j`` (``div``: a float64 vector, or
    None for ``m = lr``). Then the threshold of weight i is ``m_j * l1_j /
    d_i``, and with ``u = w * d`` (rounded; d at least float's smallest
    normal: :func:`metric_divisors`) and tau_j the k_j-th
    smallest |u| of the tensor,

        l1_j = tau_j / m_j,    w <- sign(u) * max(|u| - tau_j, 0) / (d + 2 * m_j * l2)

    so the weights with |u| <= tau_j, and only those, become exact zeros
    (the selection and the soft threshold read the same u: the plain
    prox's ``prox_`` with l1 tau_j at step size 1), and the others move
    as the metric's prox moves them. Torch's list ops for u, d and the
    division, the selection and the threshold in pyreg's ops; on the CPU,
    for float32 and float64 params, one call into the kernels, with the
    same bits where torch's sqrt is correctly rounded, as the kernel's is
    (``metric_target``, csrc/common/optim_math.h's ``metric_divisor`` and
    ``metric_target_value``)."""
    ps = w.params
    (l1, _) = _own_state(w, state, TARGET_STATE, (torch.float64,), lambda: ([0.0] * len(ps),))
    b = w.bucket
    targets = b.values["target_sparsity"]  # the values as now set (a new list when one changes)
    if metric is not None:
        _metric_target(w, targets, l1, lr, metric, be)
        return
    d = b.direct() if be is not None and ps is b.params and be.fuses_target() else None
    eager = not torch.compiler.is_compiling()
    l2 = w.coef("l2", eager)
    if d is not None:  # the checks were made: straight to the kernels (selection, l1, prox: one call)
        be.target_prox_ptrs(d[0], d[1], d[2], _target_ks(w, targets, d[1]), l1, l2, lr, d[3])
        torch.autograd.graph.increment_version(ps)
        return
    ks = _target_ks(w, targets)
    _per_lr(ops.kth_abs([p.detach() for p in ps], ks, closest=True), l1, lr)
    ops.prox_(ps, l1, l2, lr)


def _metric_target(w: Work, targets, l1: Tensor, lr, metric: tuple, be) -> None:
    """:func:`target_prox` in the optimizer's metric (its ``metric``: the
    optimizer's ``_metric_terms``, ``(v, e, s, div)``)."""
    if not w.params:
        return
    ks = _target_ks(w, targets)
    vs, e, sc, div = metric
    m = lr if div is None else (lr if isinstance(lr, Tensor) else torch.full_like(div, lr)) / div
    l2 = w.coef("l2", not torch.compiler.is_compiling())
    if be is not None and be.fuses_metric_target() and _metric_kernel(be, w.params, vs, e, sc, ks, m, l2, l1):
        torch.autograd.graph.increment_version(w.params)
        return
    ps = [p.detach() for p in w.params]
    d = metric_divisors([wide(v) for v in vs], e, sc)
    u = torch._foreach_mul([wide(p) for p in ps], d)
    tau = ops.kth_abs(u, ks, closest=True)
    _per_lr(tau, l1, m)
    ops.prox_(u, tau, 0.0, 1.0)
    if isinstance(l2, Tensor) or l2 != 0.0:
        c = (2.0 * m) * l2  # a number, or one float64 per tensor
        if isinstance(c, Tensor):
            for di, ci in zip(d, c.expand(len(d)).unbind()):
                di.add_(ci)
        else:
            torch._foreach_add_(d, c)
    torch._foreach_div_(u, d)
    torch._foreach_copy_(ps, u)


def _metric_kernel(be, ps: List[Tensor], vs: List[Tensor], e, sc, ks: List[int], m, l2, l1: Tensor) -> bool:
    """:func:`_metric_target`'s steps in one call into the CPU kernels
    (``metric_target``), where they take the terms: plain
    contiguous float32 or float64 CPU params, each v of its param's dtype,
    numbers for e, s, m and l2 (or CPU vectors for m and l2), ``l1`` a
    plain float64 CPU vector; False (nothing done) otherwise."""
    n = len(ps)
    if ((sc is not None and not all(type(x) is float for x in sc))
            or not all(isinstance(x, (int, float)) for x in e)
            or l1.device.type != "cpu" or not l1.is_contiguous()):
        return False
    desc = plain_list(ps + list(vs), True)  # (plain contiguous CPU tensors, apart in memory)
    if desc is None or desc[2][:n] != desc[2][n:] or not all(p.element_size() >= 4 for p in ps):
        return False
    ms = [float(m)] * n if not isinstance(m, Tensor) else m.tolist() if m.device.type == "cpu" else None
    l2s = [float(l2)] * n if not isinstance(l2, Tensor) else l2.tolist() if l2.device.type == "cpu" else None
    if ms is None or l2s is None:
        return False
    be.metric_target_ptrs(desc, n, [float(x) for x in e], [1.0] * n if sc is None else sc, ks, ms, l2s, l1)
    return True


def metric_divisors(vs: List[Tensor], e: list, s: Optional[list]) -> List[Tensor]:
    """``(sqrt(v_i) + e_i) * s_i`` for each v_i (in the compute dtype), the
    divisor of an adaptive step (see :func:`target_prox`), as
    csrc/common/optim_math.h's ``metric_divisor``: a sqrt, an add and a
    multiply (none where ``s`` is None), each rounded; raised to the dtype's
    smallest normal where an e is not positive. e and s: numbers, or 0-dim
    tensors on v's device (a step counter on the device)."""
    d = torch._foreach_sqrt(vs)
    numbers = all(isinstance(x, (int, float)) for x in e) and (s is None or all(type(x) is float for x in s))
    if numbers:
        torch._foreach_add_(d, e)
        if s is not None:
            torch._foreach_mul_(d, s)
        if not all(x > 0 for x in e) and d:
            torch._foreach_clamp_min_(d, torch.finfo(d[0].dtype).tiny)
        return d
    for i, x in enumerate(d):
        x.add_(e[i])
        if s is not None:
            x.mul_(s[i])
        if not (isinstance(e[i], (int, float)) and e[i] > 0):
            x.clamp_min_(torch.finfo(x.dtype).tiny)
    return d


def wide(t: Tensor) -> Tensor:
    """``t`` in a dtype to compute in (16-bit: float32)."""
    return t.float() if t.element_size() < 4 else t


#: :func:`target_prox` outside any compiled graph: its counts of zeros are host
#: integers from the targets, which a traced call would bake into the graph
#: (a new target, as a sparsity schedule sets at many steps, would recompile it).
#: (Always this one: after a graph break, torch.compile traces each function
#: called, even where ``is_compiling()`` is False at the call.)
target_prox_eager = outside_graph(target_prox)


def _target_ks(w: Work, targets, numels: Optional[List[int]] = None) -> List[int]:
    """:func:`_zeros_for` of the params of ``w``: for the whole bucket cached
    on it while the targets (the same list) and the sizes (``numels``, the
    params' where not given) stay the same."""
    b = w.bucket
    if w.params is not b.params:
        at = dict(zip(map(id, b.params), targets))
        return _zeros_for([at[id(p)] for p in w.params], [p.numel() for p in w.params])
    numels = [p.numel() for p in b.params] if numels is None else numels
    hit = b.target_ks
    if hit is None or hit[0] is not targets or hit[1] != numels:
        hit = b.target_ks = (targets, numels, _zeros_for(targets, numels))
    return hit[2]


def _zeros_for(targets: Sequence[float], numels: Sequence[int]) -> List[int]:
    """k_j = ceil(t_j * n_j) (at most n_j): the zeros each tensor's target asks for."""
    return [min(n, math.ceil(t * n - 1e-9)) for t, n in zip(targets, numels)]


def _per_lr(tau: Tensor, out: Tensor, lr) -> None:
    """``out <- l1``, the l1 at which a prox of step size ``lr`` moves a weight
    of magnitude ``tau`` to zero (float64; 0 where lr is 0), ``lr`` a number
    or one per tensor: ``tau / lr``, rounded, then raised by one ulp where
    the prox's threshold ``lr * l1`` (rounded as the prox rounds it) falls
    short of ``tau`` (about one case in twenty; twice at most), so that a
    weight of magnitude ``tau`` is zeroed. ``out`` may be ``tau``. As
    csrc/common/op_math.h's per_lr, bit for bit (on plain CPU vectors:
    that function, in one call)."""
    be = direct_backend() if out.device.type == "cpu" and not torch.compiler.is_compiling() else None
    if be is not None and be.per_lrs() and _host_vectors(tau, out, lr):
        be.per_lr(tau, out, float(lr) if not isinstance(lr, Tensor) else lr)
        return
    if isinstance(lr, Tensor):
        lr64 = lr.to(device=out.device, dtype=torch.float64)
        pos = lr64 > 0
        l1 = torch.where(pos, tau / torch.where(pos, lr64, 1.0), torch.zeros_like(tau))
    elif lr > 0:
        lr64, pos = lr, None
        l1 = tau / lr
    else:
        out.zero_()
        return
    up = torch.full_like(l1, math.inf)
    for _ in range(PER_LR_RAISES):
        low = l1 * lr64 < tau
        if pos is not None:
            low &= pos
        l1 = torch.where(low, torch.nextafter(l1, up), l1)
    out.copy_(l1)


def _host_vectors(tau: Tensor, out: Tensor, lr) -> bool:
    """Whether :func:`_per_lr` may call the CPU kernel: ``tau`` and ``out``
    plain contiguous float64 CPU vectors of one size, ``lr`` a real number or
    another such vector."""
    vecs = (tau, out, lr) if isinstance(lr, Tensor) else (tau, out)
    return (all(type(t) is Tensor and t.dtype == torch.float64 and t.device.type == "cpu" and t.dim() == 1
                and t.is_contiguous() and not t.is_neg() for t in vecs)
            and len({t.numel() for t in vecs}) == 1
            and (isinstance(lr, Tensor) or (isinstance(lr, (int, float)) and not isinstance(lr, bool))))


#: How many times :func:`_per_lr` may raise an l1 by one ulp (one always
#: sufficed in tests over four million random pairs; csrc/common/op_math.h
#: has the same count).
PER_LR_RAISES = 2


def strength_l1(w: Work, state: Dict[Any, Dict[str, Any]]) -> Tensor:
    """The l1 of each tensor of a "strength" bucket (the group_l1 of a
    "gstrength" one), float64 on the device, as the last
    :func:`refresh_strength` set it: 0 before the first refresh. The
    optimizer's state holds a 0-dim view of each (:data:`STRENGTH_STATE`,
    :data:`GSTRENGTH_STATE`)."""
    names = STRENGTH_STATE if w.kind == "strength" else GSTRENGTH_STATE
    return _own_state(w, state, names, (torch.float64,), lambda: ([0.0] * len(w.params),))[0]


#: A refresh takes at least this many weights of a bucket at once: below it
#: a refresh's fixed cost (a few torch ops and a kernel call) outweighs its work.
REFRESH_SLICE = 1 << 16


def refresh_phases(sizes: Sequence[int]) -> Tuple[List[int], int]:
    """The staggering of a bucket's refreshes: its tensors (of ``sizes``, in
    order) in S slices of whole tensors, about equal in weight count, S =
    min(number of tensors, ceil(total / REFRESH_SLICE)), at least 1. Returns
    each tensor's slice (by where its middle falls among the bucket's
    weights: a large tensor after small ones takes the next slice, not the
    small ones') and S."""
    total = sum(sizes)
    s = max(1, min(len(sizes), -(-total // REFRESH_SLICE)))
    out, before = [], 0
    for n in sizes:
        out.append(min(s - 1, (2 * before + n) * s // (2 * total)) if total else 0)
        before += n
    return out, s


def strength_due(b: Bucket, state: Dict[Any, Dict[str, Any]]) -> List[Tensor]:
    """Counts a step of each param with a grad of a "strength" bucket (on
    the host: no sync) and returns those whose l1 this step refreshes: every
    ``l1_refresh`` (K) of its own steps (those where it has a grad), from its
    K-th on, staggered by slices of the bucket (see :func:`refresh_phases`):
    a tensor of slice j of S at its steps t with (t + j*K // S) % K == 0. A
    small bucket is one slice, refreshed at once; a large one refreshes about
    1/K of its weights at each step (and Regularized copies only those before
    its inner step). A param without a grad at a step is not counted there,
    so it is refreshed at its K-th step with a grad, whatever the others do.
    The counts are read from the params' state (``strength_step``, a
    number, see :func:`record_strength_step`) at each step, so the state is
    their one record: a loaded state dict continues them, and a param whose
    state was cleared or deleted counts again from 0 (as its optimizer's
    state does); the steps where nothing else changed count at C speed, by
    the same rule, in the same state (:func:`strength_counter`).
    They live on the host, so a step captured into a CUDA
    graph (replayed without it) is refused with a clear error; under
    torch.compile the optimizers call it eagerly, outside the graph (the
    fused optimizers' step always runs eagerly; Regularized's bookkeeping
    and prox run so, where a bucket has a strength)."""
    check_countable(b)
    params = b.params
    b.steps_taken = [int(state[p].get(STRENGTH_STEP, 0)) if p in state else 0 for p in params]
    every = b.values["l1_refresh"]  # (a new list when a value changes)
    if b.refresh_at[0] is not every:
        slices, s = refresh_phases([p.numel() for p in params])
        at = [(int(k), j * int(k) // s) for j, k in zip(slices, every)]
        b.refresh_at = (every, at[0] if at.count(at[0]) == len(at) else at)  # (one for all: one test per count)
    has = list(map(is_not, map(_grad_of, params), repeat(None)))
    counts = b.steps_taken = (list(map(_plus_one, b.steps_taken)) if all(has) else
                              [c + 1 if h else c for c, h in zip(b.steps_taken, has)])
    at = b.refresh_at[1]
    if isinstance(at, tuple):
        k, shift = at
        if all(has) and counts.count(counts[0]) == len(counts):  # (the common case: one test)
            t = counts[0]
            return list(params) if t >= k and (t + shift) % k == 0 else []
        return [p for p, t, h in zip(params, counts, has) if h and t >= k and (t + shift) % k == 0]
    return [p for p, t, h, (k, shift) in zip(params, counts, has, at) if h and t >= k and (t + shift) % k == 0]


_grad_of, _plus_one = attrgetter("grad"), (1).__add__


def check_countable(b: Bucket) -> None:
    """Raises ``RuntimeError`` where a step of the "strength" bucket ``b``
    cannot be counted on the host (see :func:`strength_due`): traced by
    torch.compile or captured into a CUDA graph."""
    if torch.compiler.is_compiling() or capturing(b.device):
        raise RuntimeError("l1_strength refreshes each tensor's l1 every l1_refresh steps, counted on the host: "
                           "its step cannot be compiled by torch.compile or captured into a CUDA graph (use "
                           "a fused optimizer, whose step runs eagerly under torch.compile, without capture; "
                           "or a fixed l1)")


def strength_counter(works: Sequence[Work], state: Dict[Any, Dict[str, Any]]) -> Optional[Any]:
    """``pyreg._C.StrengthCounts`` of the params of the "strength" and
    "gstrength" ``works`` (csrc/strength_counts.cpp): it counts a step of
    each in ``state`` at C speed, as :func:`strength_due` and
    :func:`record_strength_step` do (after finding the state as it was: the
    same objects), where no refresh is due at the step, with the refresh
    phases that their last :func:`strength_due` set. For the steps where
    nothing else changed (an optimizer keeps it while it is so). None
    without the compiled module, or where the state is not as it takes it."""
    from .._lib import _C  # noqa: PLC0415

    if _C is None or not hasattr(_C, "StrengthCounts"):
        return None
    entries = []
    for w in works:
        b = w.bucket
        if b.refresh_at[0] is not b.values["l1_refresh"]:
            return None
        at = b.refresh_at[1]
        phase = dict(zip(map(id, b.params), [at] * len(b.params) if isinstance(at, tuple) else at))
        key = (STRENGTH_STATE if w.kind == "strength" else GSTRENGTH_STATE)[0]
        entries += [(p, *phase[id(p)], key) for p in w.params]
    try:
        return _C.StrengthCounts(state, STRENGTH_STATE[0], STRENGTH_STEP, entries,
                                 list({id(w.bucket): w.bucket for w in works}.values()))
    except ValueError:  # (a param without its state: the steps count in Python)
        return None


def record_strength_step(buckets: Sequence[Bucket], state: Dict[Any, Dict[str, Any]]) -> None:
    """After a step (after the inner optimizer's, which creates a param's
    state at its first step): each param's count of its steps (see
    :func:`strength_due`) into its state. A param with a grad and no state
    (an inner optimizer that keeps none, such as SGD without momentum) is
    given one, so that a state dict saved after any step holds every count."""
    for b in buckets:
        if b.kind in STRENGTH_KINDS and b.steps_taken is not None:
            for p, t in zip(b.params, b.steps_taken):
                s = state.get(p)
                if s:
                    s[STRENGTH_STEP] = t
                elif t and p.grad is not None:
                    state[p] = {STRENGTH_STEP: t}


def strength_pushes(w: Work, made: Callable[[Tensor], Optional[Tensor]]) -> Dict[int, Tensor]:
    """``{i: made(p)}`` for the params ``p = w.params[i]`` for which ``made``
    gives a push (None: not due this step, see :func:`strength_due`)."""
    out = {}
    for i, p in enumerate(w.params):
        v = made(p)
        if v is not None:
            out[i] = v
    return out


def step_quantiles(w: Work, before: Dict[int, Tensor]) -> Optional[Tuple[List[int], Tensor]]:
    """``l1_strength`` and ``group_strength`` where the push is the step
    itself (Regularized): for the tensors of ``w`` in ``before`` (by id, each
    as it was before the inner step), ``(their indices in w, the
    quantiles)`` that :func:`refresh_strength` selects from their steps
    ``before - p`` (in push units: not divided by an lr), in one call of the
    CPU kernel: ``push_kth``'s push ``m / s + wd * w`` with ``m`` the
    weights before, ``s`` 1, ``w`` the weights after and ``wd`` -1, the
    exact difference (the same bits as ``torch.sub``, then ``kth_abs``; for
    ``group_strength``, of its group norms, as ``group_norms`` gives them).
    None where the kernel does not take them (other devices or layouts:
    :func:`strength_pushes`, then :func:`refresh_strength`)."""
    idx = [i for i, p in enumerate(w.params) if id(p) in before]
    if (w.kind not in STRENGTH_KINDS or not idx or w.bucket.device.type != "cpu"
            or torch.compiler.is_compiling()):
        return None
    be = direct_backend()
    if be is None or not be.selects_pushes():
        return None
    olds = [before[id(w.params[i])] for i in idx]
    news = [w.params[i].detach() for i in idx]
    described = plain_list(olds + news)
    if described is None or news[0].dtype not in (torch.float32, torch.float64):  # (the kernel's types)
        return None
    n = len(idx)
    q = torch.empty(n, dtype=torch.float64)
    dims = None if w.kind == "strength" else [w.dims[i] for i in idx]
    sizes = described[1][n:] if dims is None else [t.shape[d] if t.dim() else 1 for t, d in zip(news, dims)]
    be.push_kth(olds, None, [0.0] * n, [1.0] * n, strength_ks(w, idx, sizes), q, news, [-1.0] * n,
                described=described, dims=dims)
    return idx, q


def refresh_strength(w: Work, pushes: Dict[int, Tensor], state: Dict[Any, Dict[str, Any]], lr=None,
                     vec: Optional[Tensor] = None) -> None:
    """``l1_strength``: sets the l1 of tensor i of ``w`` (each i of
    ``pushes``; ``group_strength``: its group_l1, from the L2 norms of its
    push over its groups in place of |P_i|) from its push P_i, the
    optimizer's step in the prox's metric,
    in l1's units (the step divided by each element's prox step size: by lr
    in the plain metric, by lr / (sqrt(v_hat) + eps) in Adam's, and so on;
    pass the raw steps and ``lr``, one number or one per tensor of ``w``,
    to have them divided here). With a_i the tensor's strength and n_i its
    size, l1_i is the k_i-th smallest |P_i|, k_i = ceil(a_i * n_i) (0 for
    a_i = 0; a_i = 1: the largest push):

        l1_i = quantile(|P_i|, a_i)

    A weight whose push stays below l1_i is driven to exact zero by the
    prox (the optimality condition of L1: |push| <= l1 at a zero), so at a
    refresh the fraction a_i of the tensor's weights is outweighed by the
    penalty, for any optimizer and metric, and any layer size and scale.
    One selection call (:func:`pyreg.ops.kth_abs`) for the tensors due, on
    the device: no host sync."""
    if not pushes:
        return
    group = w.kind == "gstrength"
    idx = list(pushes)
    steps = [pushes[i].detach() for i in idx]
    mags = ops.group_norms(steps, [w.dims[i] for i in idx]) if group else steps  # kth_abs takes |.|
    ks = strength_ks(w, idx, [a.numel() for a in mags])
    be = direct_backend() if w.bucket.device.type == "cpu" and not torch.compiler.is_compiling() else None
    # one selection call for the due tensors (plain CPU tensors: the kernel, with no op dispatch)
    q = (be.kth_abs(mags, ks) if be is not None and be.selects() and plain_cpu(mags)
         else ops.kth_abs(mags, ks))
    store_strength(w, idx, q, state, lr, vec)


def strength_ks(w: Work, idx: Sequence[int], sizes: Sequence[int]) -> List[int]:
    """The rank k_i = ceil(a_i * n_i) of the quantile of each tensor ``i`` of
    ``idx`` (``sizes``: n_i, its push's elements, or groups for
    ``group_strength``), a_i its strength (see :func:`refresh_strength`)."""
    values = w.bucket.values["group_strength" if w.kind == "gstrength" else "l1_strength"]
    if w.params is not w.bucket.params:  # (some params without a grad: by identity)
        at = dict(zip(map(id, w.bucket.params), values))
        values = [at[id(p)] for p in w.params]
    return [min(n, math.ceil(values[i] * n - 1e-9)) for i, n in zip(idx, sizes)]


def store_strength(w: Work, idx: List[int], q: Tensor, state: Dict[Any, Dict[str, Any]], lr=None,
                   vec: Optional[Tensor] = None) -> None:
    """The end of :func:`refresh_strength`: the selected quantiles ``q`` (float64,
    one per tensor of ``idx``, in push units; divided by ``lr`` if given)
    become those tensors' l1 (group_l1) in the state's vector, where they
    are finite (else the l1 stays as it was). An optimizer
    that selects its push's quantiles itself (without the pushes in memory)
    calls it directly, with :func:`strength_ks`' ranks (and ``vec``, the
    vector :func:`strength_l1` gave this step, if at hand)."""
    vec = strength_l1(w, state) if vec is None else vec
    if lr is not None and not isinstance(lr, Tensor) and lr <= 0:
        return  # a step of lr 0 shows no push: the l1 stays as the last refresh set it
    whole = len(idx) == len(w.params)
    if lr is not None:
        lr = lr if whole or not isinstance(lr, Tensor) else lr[idx]
        _per_lr(q, q, lr)
        if isinstance(lr, Tensor):  # (where a tensor's lr is 0, its l1 stays)
            q = torch.where(lr.to(device=q.device) > 0, q, vec if whole else vec[idx])
    # a quantile that is not finite (a push with NaN or inf, from such a grad) is no strength: the l1 stays
    # (a coefficient is finite; on the device without a sync, on the CPU from its few numbers)
    if q.device.type != "cpu":
        q = torch.where(q.isfinite(), q, vec if whole else vec[idx])
    elif not all(map(math.isfinite, q.tolist())):
        q = q.clone()
        keep_finite(q, (vec if whole else vec[idx]).tolist())
    if whole:  # into the float64 vector (its 0-dim views are in the state)
        vec.copy_(q)
    else:
        vec.index_copy_(0, torch.tensor(idx, device=vec.device), q)


def keep_finite(q: Tensor, old: List[float]) -> None:
    """In place, each entry of the float64 CPU vector ``q`` that is not
    finite becomes the one of ``old`` at its index (the coefficient a
    refresh leaves as it was, see :func:`store_strength`)."""
    vals = q.tolist()
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        q[bad] = torch.tensor([old[i] for i in bad], dtype=torch.float64)


def current_l1(w: Work) -> Tensor:
    """The l1 of ``w``'s params now: a "target" bucket's (as its last step
    set them), a "strength" bucket's (as its last refresh set them), else
    the group's."""
    return _own_vector(w) if w.kind in ("target", "strength") else w.coefs["l1"]


def _own_vector(w: Work) -> Tensor:
    """The first state vector of ``w``'s bucket for its params (the l1 a
    "target" or "strength" bucket last set, the group_l1 of a "gstrength"
    one), zeros if there is none yet."""
    st = w.bucket.own_state
    if st is not None and st[0] == tuple(map(id, w.params)):
        return st[1][0]
    return torch.zeros(len(w.params), dtype=torch.float64, device=w.bucket.device)


_dispatch_modes = torch._C._len_torch_dispatch_stack  # the user dispatch modes on the stack


def direct_backend():
    """The cpu backend when a step may call it directly (plain eager mode,
    no dispatch mode, no other backend forced), else None."""
    return None if _dispatch_modes() else backends.eager_cpu()


def max_norm_buckets(buckets: Sequence[Work]) -> None:
    """The max-norm projection of each "max_norm" bucket, in place."""
    eager = not torch.compiler.is_compiling()
    for w in buckets:
        ops.max_norm_(w.params, w.coef("max_norm", eager), w.dims)


def l2_bound_buckets(buckets: Sequence[Work], state: Dict[Any, Dict[str, Any]]) -> None:
    """Constrained Parameter Regularization (Franke et al., NeurIPS 2024) of
    each "l2_bound" bucket, after the optimizer's step, in place. Per tensor
    j with n_j elements and R_j = ||theta_j||^2 (from one fused
    ``weight_stats`` pass over the bucket)::

        lambda_j <- max(0, lambda_j + mu_j * (R_j - kappa_j))
        theta_j  <- theta_j - 2 * lambda_j * theta_j

    with mu_j = l2_mu / n_j (as in the paper's reference code: the rate of
    ``l2_mu`` does not depend on the tensor's size) and kappa_j the group's
    ``l2_bound``; with ``l2_bound="warm_start"``, kappa_j is +inf (no
    constraint, lambda_j = 0) until the tensor's ``l2_warmup``-th step, whose
    R_j becomes its bound (where ``l2_warmup`` is set below the steps already
    taken while no bound is set, or a given bound is switched to
    ``"warm_start"`` after that step, the next step's R_j; a bound a warm
    start took stays, through a given bound in between). The multipliers, bounds and step counts stay on
    the device, in the optimizer's state (:data:`BOUND_STATE`): no host sync.

    In eager mode on a compiled backend (CPU, CUDA, the emulator) the whole
    update is one call of its kernels (the rule written once in
    csrc/common/op_math.h, ``cpr_update``; R_j summed as ``weight_stats``
    sums: for 32- and 16-bit tensors float32 partial sums over blocks of
    elements, folded in float64, so R_j - kappa_j carries float32 rounding):
    on CUDA three launches, nothing on the host. On the torch backend and
    under torch.compile, the torch ops below (R_j from ``weight_stats``' norm)."""
    eager = not torch.compiler.is_compiling()
    be = direct_backend() if eager else None
    for w in buckets:
        lam, kappa, steps, numel = _bound_state(w, state)
        d = w.bucket.direct() if be is not None and w.params is w.bucket.params and be.bounds() else None
        if d is not None:  # the checks were made: straight to the CPU kernel
            be.l2_bound_ptrs(d[0], d[1], d[2], lam, kappa, steps,
                             *(w.coef(k, eager) for k in ("l2_bound", "l2_mu", "l2_warmup")))
            torch.autograd.graph.increment_version(w.params)
            continue
        kernels = (backends.for_tensors(w.params) if eager and not _dispatch_modes() and not has_dtensor(w.params)
                   and not any(map(Tensor.is_inference, w.params)) else None)
        if getattr(kernels, "bounds", bool)():  # a compiled backend (CUDA, the emulator): its kernels
            kernels.l2_bound_(w.params, lam, kappa, steps,
                              *(w.coef(k, eager) for k in ("l2_bound", "l2_mu", "l2_warmup")))
            torch.autograd.graph.increment_version(w.params)
            continue
        with torch.no_grad():  # the torch backend, torch.compile: the rule in torch ops
            c = w.coefs
            r = ops.weight_stats(w.params).l2.to(torch.float64).square_()
            steps.add_(1)
            if not any(w.bucket.values["l2_warmup"]):  # given bounds only: fewer ops, the same rule
                lam.addcmul_(c["l2_mu"] / numel, r.sub_(c["l2_bound"])).clamp_(min=0)
                torch._foreach_mul_(w.params, list(lam.mul(-2).add_(1).unbind(0)))
                continue
            warm = c["l2_warmup"] > 0
            bound = torch.where(warm, kappa, c["l2_bound"])
            new = (lam + c["l2_mu"] / numel * (r - bound)).clamp_(min=0)
            lam.copy_(torch.where(torch.isinf(bound), torch.zeros_like(new), new))
            torch._foreach_mul_(w.params, list((1 - 2 * lam).unbind(0)))
            kappa.copy_(torch.where(warm & torch.isinf(bound) & (steps.to(torch.float64) >= c["l2_warmup"]), r, kappa))


def _bound_state(w: Work, state: Dict[Any, Dict[str, Any]]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(multipliers, bounds, steps, numels) of ``w``'s params (see :func:`_own_state`)."""
    lam, kappa, steps, numel = _own_state(w, state, BOUND_STATE, (torch.float64, torch.float64, torch.int64),
                                          lambda: ([0.0] * len(w.params), [float("inf")] * len(w.params),
                                                   [0] * len(w.params)))
    return lam, kappa, steps, numel


def _own_state(w: Work, state: Dict[Any, Dict[str, Any]], names: Tuple[str, ...], dtypes: Tuple[torch.dtype, ...],
               defaults) -> List[Tensor]:
    """The vectors of the state ``names`` of ``w``'s params (one entry per
    param, on their device), plus their numels (float64; an empty tensor
    counts as 1, so that a rate per element stays finite). The optimizer's
    state holds 0-dim views of these vectors (so a step updates it in place);
    new vectors are made from it when the params with a grad change or the
    state was replaced (a state dict loaded); ``defaults()`` gives the values
    of params that have none yet (numbers or one-value tensors, per name)."""
    b = w.bucket
    ps = w.params
    ids = tuple(map(id, ps))
    cur = b.own_state
    if cur is not None and cur[0] == ids and all(map(is_, [state[p].get(names[0]) for p in ps], cur[2])):
        return cur[1]
    dev = b.device
    fresh = None
    vecs = []
    for k, (name, dt) in enumerate(zip(names, dtypes)):
        vals = []
        for i, p in enumerate(ps):
            v = state[p].get(name)
            if v is None:
                fresh = defaults() if fresh is None else fresh
                v = fresh[k][i]
            vals.append(v)
        vecs.append(_stack(vals, dt, dev))
    numel = to_device([float(max(p.numel(), 1)) for p in ps], torch.float64, dev)
    for name, vec in zip(names, vecs):
        for p, v in zip(ps, vec.unbind(0)):
            state[p][name] = v
    first = [state[p][names[0]] for p in ps]
    b.own_state = (ids, vecs + [numel], first)
    return vecs + [numel]


def _stack(values: List[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One vector of ``values`` (numbers, or one-value tensors anywhere)."""
    if not any(isinstance(v, Tensor) for v in values):
        return to_device(values, dtype, device).clone()
    return torch.stack([v.detach().reshape(()).to(device=device, dtype=dtype) if isinstance(v, Tensor)
                        else torch.tensor(v, dtype=dtype, device=device) for v in values])


def misfit_state(name: str, err: KeyError) -> ValueError:
    """The error for a state dict whose state torch's load of optimizer
    ``name`` could not read (``err``: the entry it missed), such as another
    optimizer's."""
    return ValueError(f"the state dict does not fit {name}: its state has no entry {err} (a state dict of "
                      "another optimizer?); nothing was loaded")


def pop_own_state(state_dict: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[Any, Dict[str, Any]]]:
    """A state dict without pyreg's own entries (:data:`OWN_STATE`; torch's
    ``load_state_dict`` would cast them to each parameter's dtype), and those
    entries by the state dict's parameter index."""
    st = state_dict.get("state")
    if not isinstance(st, dict):
        return state_dict, {}
    out, kept = {}, {}
    for k, v in st.items():
        if isinstance(v, dict) and STRENGTH_STEP in v:  # (a host number, which torch's load keeps as it is)
            _own_value(v[STRENGTH_STEP], f"state_dict['state'][{k!r}][{STRENGTH_STEP!r}]", STRENGTH_STEP)
        if isinstance(v, dict) and any(n in v for n in BOUND_STATE) and not all(n in v for n in BOUND_STATE):
            has, lacks = ([n for n in BOUND_STATE if (n in v) == b] for b in (True, False))
            raise ValueError(f"state_dict['state'][{k!r}] has {', '.join(has)} without {', '.join(lacks)}: "
                             "l2_bound's state is its multiplier, bound and count together; nothing was loaded")
        if isinstance(v, dict) and any(n in v for n in OWN_STATE):
            kept[k] = {n: _own_value(v[n], f"state_dict['state'][{k!r}][{n!r}]", n) for n in OWN_STATE if n in v}
            v = {n: x for n, x in v.items() if n not in OWN_STATE}
        out[k] = v
    return dict(state_dict, state=out), kept


#: The values each own state entry may hold: "count" an integer >= 0, "bound"
#: a number >= 0 or +inf (a warm-up's bound), any other a finite number >= 0.
_OWN_DOMAIN = {BOUND_STATE[1]: "bound", BOUND_STATE[2]: "count", STRENGTH_STEP: "count"}


def check_step_counts(state_dict: Dict[str, Any]) -> None:
    """The step counters (``step``) of a state dict to load into a fused
    optimizer, whose kernels read them as the step's t: each must be one
    real number, an integer >= 0, or ``load_state_dict`` raises (before
    anything is loaded), as for pyreg's own counts."""
    st = state_dict.get("state")
    for k, v in (st.items() if isinstance(st, dict) else ()):
        if isinstance(v, dict) and "step" in v:
            _own_value(v["step"], f"state_dict['state'][{k!r}]['step']", STRENGTH_STEP)


def _own_value(v: Any, where: str, name: str) -> Any:
    """One of pyreg's own state entries, checked before anything is loaded:
    one real number (a one-element tensor, or a number) in its entry's
    domain (:data:`_OWN_DOMAIN`)."""
    if isinstance(v, Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype is torch.bool or v.is_meta:
            raise ValueError(f"{where} must hold one real number, got a {v.dtype} tensor of shape {tuple(v.shape)}")
        x = float(v)
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        x = float(v)
    else:
        raise TypeError(f"{where} must be a number or a one-element tensor, got {type(v).__name__}")
    domain = _OWN_DOMAIN.get(name)
    if domain == "count":
        if not (math.isfinite(x) and x >= 0 and x == int(x)):
            raise ValueError(f"{where} is a count of steps: an integer >= 0, got {x}")
    elif not (x >= 0 and (math.isfinite(x) or (domain == "bound" and x > 0))):
        inf = " (or +inf, during a warm-up)" if domain == "bound" else ""
        raise ValueError(f"{where} must be finite and >= 0{inf}, got {x}")
    return v


def put_own_state(state: Dict[Any, Dict[str, Any]], groups: List[Dict[str, Any]],
                  saved_groups: List[Dict[str, Any]], kept: Dict[Any, Dict[str, Any]]) -> None:
    """Puts back what :func:`pop_own_state` took, after torch's
    ``load_state_dict`` (which maps the saved groups' parameters onto
    ``groups`` in order), as float64 / int64 tensors on each param's device."""
    if not kept:
        return
    ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in groups for p in g["params"]]
    for i, p in zip(ids, params):
        entry = kept.get(i)
        if entry:
            s = state[p]
            for n, v in entry.items():
                dt = torch.int64 if n == BOUND_STATE[2] else torch.float64
                s[n] = (v.detach().to(device=p.device, dtype=dt).reshape(()).clone() if isinstance(v, Tensor)
                        else torch.tensor(v, dtype=dt, device=p.device))


def add_penalty_grads(buckets: Sequence[Work]) -> Tensor:
    """Adds the gradient of each bucket's penalty to its params' grads
    (``l1 * sign(d) + 2 * l2 * d`` with d = w, or w - ref in a "ref" bucket;
    plus ``group_l1 * w_g / ||w_g||`` in a "group" bucket); returns the total
    penalty of the params (0-dim). With several buckets, every bucket's grads
    are checked before the first one is written, so a bad grad changes nothing."""
    grads = [[p.grad for p in w.params] for w in buckets]
    eager = not torch.compiler.is_compiling()
    be = direct_backend() if eager else None
    # Buckets whose params and grads pass the direct path's checks (see
    # _direct_grads) go straight to the kernels; the others through the op.
    direct = [_direct_grads(w, gs) if be is not None else None for w, gs in zip(buckets, grads)]
    if len(buckets) > 1 and eager:
        for w, gs, d in zip(buckets, grads, direct):
            if d is None:
                gs = tensor_list(gs, "grads")
                i = first_unpaired(w.params, gs)
                if i is not None:
                    p, g = w.params[i], gs[i]
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} {p.dtype} on {p.device} has a grad of "
                                     f"{tuple(g.shape)} {g.dtype} on {g.device}: a grad must have its parameter's "
                                     "shape, dtype and device")
                check_grads_apart(w.params, gs)
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
        value = ops.penalty(ps, current_l1(w), c["l2"], ref=w.refs)
        if w.kind in ("group", "gstrength"):
            gl1 = c["group_l1"] if w.kind == "group" else _own_vector(w)
            value = _sum(value, ops.group_penalty(ps, gl1, w.dims))
        total = value if total is None else _sum(total, value)
    return total if total is not None else torch.zeros(())


def _sum(a: Tensor, b: Tensor) -> Tensor:
    """a + b for 0-dim results of different buckets (dtype and device of the widest / first)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt) + b.to(device=a.device, dtype=dt)


def stats(plan: Plan) -> ParamStats:
    """:class:`ParamStats` of every parameter of the plan's groups (a dtype
    the kernels do not take, such as a complex one that torch's own step
    updates: the stats of its magnitudes, which are the same numbers)."""
    parts = [ops.weight_stats(ps if ps[0].dtype in SUPPORTED_DTYPES else [_magnitudes(p) for p in ps])
             for ps in plan.stat_buckets]
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


def _magnitudes(p: Tensor) -> Tensor:
    """|p| in a dtype the kernels take (float64 where |p|'s is not one)."""
    a = p.detach().abs()
    return a if a.dtype in SUPPORTED_DTYPES else a.double()


def sparsity(s: ParamStats) -> Sparsity:
    """Fraction of exact zeros, overall and per parameter, from ``s``."""
    numel = s.numel.to(torch.float64)
    zeros = numel - s.nnz.to(torch.float64)
    per = (zeros / numel.clamp_min(1)).to(torch.float32)
    overall = (zeros.sum() / numel.sum().clamp_min(1)).to(torch.float32)
    return Sparsity(overall, per, s.names)
