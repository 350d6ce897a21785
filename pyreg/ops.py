"""pyreg's public ops. Each covers a whole list of tensors (all layers of a
model) in one call:

    weight_stats(tensors)                            -> WeightStats(l1, l2, linf, nnz)
    penalty(tensors, l1, l2, ref=None)               -> 0-dim tensor, differentiable
    add_penalty_grad_(tensors, grads, l1, l2, ref=None) -> 0-dim tensor (penalty value)
    prox_(tensors, l1, l2, lr, ref=None)             -> 1-D int64 (nonzeros per tensor)
    group_norms(tensors, dim=1)                      -> list of 1-D tensors (norm per group)
    group_penalty(tensors, l1, dim=1)                -> 0-dim tensor, differentiable
    add_group_penalty_grad_(tensors, grads, l1, dim=1) -> 0-dim tensor (penalty value)
    group_prox_(tensors, l1, lr, dim=1, element_l1=0, l2=0) -> 1-D int64 (nonzero groups)
    max_norm_(tensors, max_value, dim=0)             -> 1-D int64 (groups scaled)
    kth_abs(tensors, k, closest=False)               -> 1-D float64 (the k-th smallest |w| per tensor)

Each function validates its arguments (_validate.py), normalizes the
coefficients, and runs: lists of DTensors through pyreg.distributed; in plain
eager mode the backend directly (``_eager``); otherwise the custom op
(_ops.py), which works under ``torch.compile`` and the dispatcher's modes.
"""
from __future__ import annotations

import numbers
from itertools import repeat
from operator import attrgetter
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

_tracing = torch._C._get_tracing_state  # torch.jit.trace records the custom ops, not the kernels' writes

from . import backends
from ._common import WeightStats, coef_tensor, has_dtensor
from .backends._marshal import plain_cuda_list, plain_list
from ._ops import (add_group_penalty_grad_op, add_penalty_grad_op, group_norms_op, group_penalty_op,
                   group_prox_op, kth_abs_op, max_norm_op, penalty_op, prox_op, weight_stats_op)
from ._validate import (PLAIN_TYPES, Coefficient, check_coefs_apart, check_grads_apart, check_no_overlap,
                        check_refs_apart, flag,
                        coefficient, fast_coefficient, group_dims, partner_list, tensor_list)

_dtype_of, _shape_of, _requires_grad = attrgetter("dtype"), attrgetter("shape"), attrgetter("requires_grad")
_PLAIN_TYPES = PLAIN_TYPES
_LISTS = (list, tuple)


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
            or _tracing() is not None
            or _forward_ad._current_level >= 0
            or not set(map(type, inputs)) <= _PLAIN_TYPES
            or not set(map(type, mutated)) <= _PLAIN_TYPES
            or (not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, mutated)))):
        return None
    out = call(backends.for_tensors(inputs or mutated))
    if mutated:
        torch.autograd.graph.increment_version(list(mutated))
    return out


# --------------------------------------------------------------------------
# Fast path: the common case, checked and run with the fewest Python steps
# --------------------------------------------------------------------------
def _fast(ts, written: bool = False):
    """``(backend, (data pointers, numels, dtype codes), device)`` when a call
    on ``ts`` is the common case that needs no further tensor check and no
    dispatcher: plain eager mode, a list or tuple of plain contiguous tensors
    of one supported dtype, all on the CPU (device None: the ``cpu`` backend,
    or ``cuda-emu`` where it is forced) or all on one GPU that the ``cuda``
    backend runs on, and, for an op that ``written`` them, pairwise disjoint
    in memory and no inference tensor among them outside inference mode.
    None otherwise: the general path then checks (and explains) all. Every
    input it accepts passes the general path's checks, with the same result
    (the same kernels run). The test is one call into pyreg._C
    (``plain_list``; a GPU list is told from a CPU one by its first tensor)."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or _tracing() is not None
            or _forward_ad._current_level >= 0):
        return None
    be = backends.eager_host()
    d = None if be is None else plain_list(ts, written)
    if d is not None:
        return be, d, None
    g = plain_cuda_list(ts, written)
    if g is None:
        return None
    be = backends.eager_cuda(g[0])
    return None if be is None else (be, g[1], _cuda_device(g[0]))


def _cuda_device(index: int) -> torch.device:
    dev = _CUDA_DEVICES.get(index)
    if dev is None:
        dev = _CUDA_DEVICES[index] = torch.device("cuda", index)
    return dev


_CUDA_DEVICES: Dict[int, torch.device] = {}


def _fast_coefs(n: int, device: Optional[torch.device], *cs, written: Sequence[Tensor] = ()):
    """The coefficients in the kernels' form, or None unless all are in the
    common form (``fast_coefficient``; on a GPU (``device``), numbers only:
    a CPU tensor would need a copy there) and no coefficient tensor shares
    memory with a ``written`` one (the checked path refuses it)."""
    out = tuple(fast_coefficient(c, n) for c in cs)
    if any(c is None for c in out) or (device is not None and not all(type(c) is float for c in out)):
        return None
    for c in out:
        if type(c) is Tensor:  # (contiguous float64: its bytes; the written tensors' are contiguous too)
            lo = c.data_ptr()
            hi = lo + 8 * n
            for t in written:
                at = t.data_ptr()
                if at < hi and lo < at + t.numel() * t.element_size():
                    return None
    return out


def _fast_dims(dim, ts) -> Optional[List[int]]:
    """The group dimension of each tensor, normalized, from one int for
    every tensor or a list or tuple of ints, one per tensor; or None (then
    ``group_dims`` decides and explains)."""
    tp = type(dim)
    if tp is int:
        dims = repeat(dim, len(ts))
    elif (tp is list or tp is tuple) and len(dim) == len(ts) and all(type(d) is int for d in dim):
        dims = dim
    else:
        return None
    out = []
    for t, d in zip(ts, dims):
        nd = t.dim() or 1
        if not -nd <= d < nd:
            return None
        out.append(d % nd)
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
    fast = _fast(tensors)
    if fast is not None:
        be, desc, dev = fast
        n = len(tensors)
        rd = torch.float64 if tensors[0].dtype is torch.float64 else torch.float32
        out = WeightStats(*(torch.empty(n, dtype=rd, device=dev) for _ in range(3)),
                          torch.empty(n, dtype=torch.int64, device=dev))
        be.weight_stats_ptrs(*desc, out)
        return out
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


def _no_dtensor(ts: Sequence[Tensor], what: str) -> None:
    if has_dtensor(ts):
        raise TypeError(f"{what} does not take DTensors (sharded parameters); pass the full tensors")


def _refs(ref, ts: List[Tensor]) -> Optional[List[Tensor]]:
    """Validated, detached refs (constants: no gradient flows into them), or None."""
    if ref is None:
        return None
    rs = partner_list(ref, ts, "ref", "ref tensors")
    _no_dtensor(rs, "ref=")
    _no_dtensor(ts, "ref=")
    return [r.detach() for r in rs]


def penalty(tensors: Iterable[Tensor], l1: Coefficient = 0.0, l2: Coefficient = 0.0,
            ref: Optional[Iterable[Tensor]] = None) -> Tensor:
    """sum_i l1_i * ||w_i||_1 + l2_i * ||w_i||_2^2 as a 0-dim tensor.

    Differentiable with respect to the tensors: the gradient is
    l1 * sign(w) + 2 * l2 * w, with sign(0) = 0. ``l1`` and ``l2`` are numbers
    (all tensors) or one value per tensor (a sequence or 1-D tensor); they are
    constants for autograd.

    ``ref``: reference tensors (one per tensor, e.g. the pre-trained weights):
    the penalty of w - ref instead (L1-SP / L2-SP); refs are constants.
    """
    if ref is None and not torch.compiler.is_compiling():
        fast = _fast(tensors)  # first: it takes only lists of tensors
        if fast is not None and torch.is_grad_enabled() and any(map(_requires_grad, tensors)):
            fast = None  # the differentiable op
        cs = None if fast is None else _fast_coefs(len(tensors), fast[2], l1, l2)
        if cs is not None:
            be, desc, dev = fast
            out = torch.empty((), dtype=torch.float64 if tensors[0].dtype is torch.float64 else torch.float32,
                              device=dev)
            be.penalty_ptrs(*desc, *cs, out)
            return out
    ts = tensor_list(tensors)
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2 = coefficient(l1, n, dev, "l1"), coefficient(l2, n, dev, "l2")
    rs = _refs(ref, ts)
    if not ts:
        return torch.zeros(())
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(map(_requires_grad, ts))):
        out = _eager(ts + (rs or []), (), lambda be: be.penalty(ts, c1, c2, rs))
        if out is not None:
            return out
    c1, c2 = coef_tensor(c1, n, dev), coef_tensor(c2, n, dev)
    if has_dtensor(ts):
        return _distributed().penalty(ts, c1, c2)
    return penalty_op(ts, c1, c2, rs or [])


def add_penalty_grad_(tensors: Iterable[Tensor], grads: Iterable[Tensor],
                      l1: Coefficient = 0.0, l2: Coefficient = 0.0,
                      ref: Optional[Iterable[Tensor]] = None) -> Tensor:
    """In place, g_i += l1_i * sign(w_i) + 2 * l2_i * w_i for every pair
    (with ``ref``: of d_i = w_i - ref_i).

    Returns the penalty value (as ``penalty``), computed in the same pass.
    """
    if (ref is None and not torch.compiler.is_compiling() and type(tensors) in _LISTS and type(grads) in _LISTS
            and len(tensors) == len(grads)):
        both = [*grads, *tensors]
        fast = _fast(both, True)  # (the tensors too: one test of the whole list)
        if fast is not None and list(map(_shape_of, grads)) != list(map(_shape_of, tensors)):
            fast = None
        cs = None if fast is None else _fast_coefs(len(tensors), fast[2], l1, l2, written=grads)
        if cs is not None:
            be, (ptrs, numels, codes), dev = fast
            n = len(grads)
            out = torch.empty((), dtype=torch.float64 if tensors[0].dtype is torch.float64 else torch.float32,
                              device=dev)
            be.add_penalty_grad_ptrs(ptrs[n:], numels[n:], codes[n:], ptrs[:n], *cs, out)
            torch.autograd.graph.increment_version(grads)
            return out
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
    rs = _refs(ref, ts)
    if not ts:
        return torch.zeros(())
    if rs is not None:
        _no_dtensor(gs, "ref=")
        check_refs_apart(gs, rs, "grads")
    if has_dtensor(ts) or has_dtensor(gs):
        return _distributed().add_penalty_grad_(ts, gs, coef_tensor(c1, n, dev), coef_tensor(c2, n, dev))
    check_grads_apart(ts, gs)
    check_coefs_apart(gs, (("l1", c1), ("l2", c2)), "grads")
    with torch.no_grad():
        out = _eager(ts + (rs or []), gs, lambda be: be.add_penalty_grad_(ts, gs, c1, c2, rs))
        if out is not None:
            return out
        return add_penalty_grad_op([t.detach() for t in ts], gs, coef_tensor(c1, n, dev),
                                   coef_tensor(c2, n, dev), rs or [])


def prox_(tensors: Iterable[Tensor], l1: Coefficient = 0.0, l2: Coefficient = 0.0, lr: Coefficient = 1.0,
          ref: Optional[Iterable[Tensor]] = None) -> Tensor:
    """In place, the proximal step of lr * (l1 * ||w||_1 + l2 * ||w||_2^2):

        w <- sign(w) * max(|w| - lr * l1, 0) / (1 + 2 * lr * l2)

    Weights with |w| <= lr * l1 become exactly 0. Returns the count of nonzeros
    of each tensor after the step (1-D int64), from the same pass.

    ``ref``: reference tensors (one per tensor): the prox of the penalty
    around them, ``w <- ref + prox(w - ref)`` (each of the three steps rounded
    to w's dtype, bit for bit as the three tensor ops); weights within lr * l1
    of their reference become exactly the reference. The count is then of the
    weights that differ from their reference.
    """
    if ref is None:
        fast = _fast(tensors, True)
        cs = None if fast is None else _fast_coefs(len(tensors), fast[2], l1, l2, lr, written=tensors)
        if cs is not None:
            be, desc, dev = fast
            out = torch.empty(len(tensors), dtype=torch.int64, device=dev)
            be.prox_ptrs(*desc, *cs, out)
            torch.autograd.graph.increment_version(tensors)
            return out
    ts = tensor_list(tensors)
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2, clr = (coefficient(c, n, dev, name) for c, name in ((l1, "l1"), (l2, "l2"), (lr, "lr")))
    rs = _refs(ref, ts)
    if not ts:
        return torch.zeros(0, dtype=torch.int64)
    if has_dtensor(ts):
        return _distributed().prox_(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)))
    check_no_overlap(ts, "tensors")
    check_coefs_apart(ts, (("l1", c1), ("l2", c2), ("lr", clr)))
    if rs is not None:
        check_refs_apart(ts, rs)
    with torch.no_grad():
        out = _eager(rs or (), ts, lambda be: be.prox_(ts, c1, c2, clr, rs))
        if out is not None:
            return out
        return prox_op(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)), rs or [])


# --------------------------------------------------------------------------
# Group ops: group g of a tensor along ``dim`` is every element with index g
# in that dimension (for an nn.Linear weight [out, in]: dim=1, one input's
# column; dim=0, one output's row); its norm is over all other dimensions.
# ``dim`` is one int for every tensor or one per tensor.
# --------------------------------------------------------------------------
def _group_args(tensors, dim, what: str):
    ts = tensor_list(tensors)
    _no_dtensor(ts, what)
    return ts, group_dims(dim, ts), len(ts), (ts[0].device if ts else torch.device("cpu"))


def group_norms(tensors: Iterable[Tensor], dim=1) -> List[Tensor]:
    """||w_g||_2 of every group of every tensor: one 1-D tensor per tensor,
    with one entry per group (float64 if any tensor is float64, else float32)."""
    ts, dims, n, dev = _group_args(tensors, dim, "group_norms")
    if not ts:
        return []
    with torch.no_grad():
        flat = _eager(ts, (), lambda be: be.group_norms(ts, dims))
        if flat is None:
            flat = group_norms_op([t.detach() for t in ts], dims)
    sizes = [t.shape[d] if t.dim() else 1 for t, d in zip(ts, dims)]
    return list(torch.split(flat, sizes))


def group_penalty(tensors: Iterable[Tensor], l1: Coefficient = 0.0, dim=1) -> Tensor:
    """The group lasso penalty sum_i l1_i * sum_g ||w_ig||_2 as a 0-dim tensor.

    Differentiable with respect to the tensors: the gradient of a group is
    l1 * w_g / ||w_g||_2, and 0 (a subgradient) for a zero group.
    """
    ts, dims, n, dev = _group_args(tensors, dim, "group_penalty")
    c = coefficient(l1, n, dev, "l1")
    if not ts:
        return torch.zeros(())
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(map(_requires_grad, ts))):
        out = _eager(ts, (), lambda be: be.group_penalty(ts, dims, c))
        if out is not None:
            return out
    return group_penalty_op(ts, dims, coef_tensor(c, n, dev))


def add_group_penalty_grad_(tensors: Iterable[Tensor], grads: Iterable[Tensor], l1: Coefficient = 0.0,
                            dim=1) -> Tensor:
    """In place, g_i += l1_i * w_ig / ||w_ig||_2 for every group (0 for a zero
    group). Returns the group penalty, from the same call."""
    ts, dims, n, dev = _group_args(tensors, dim, "add_group_penalty_grad_")
    gs = partner_list(grads, ts, "grads", "grads")
    _no_dtensor(gs, "add_group_penalty_grad_")
    c = coefficient(l1, n, dev, "l1")
    if not ts:
        return torch.zeros(())
    check_grads_apart(ts, gs, "add_group_penalty_grad_")
    check_coefs_apart(gs, (("l1", c),), "grads")
    with torch.no_grad():
        out = _eager(ts, gs, lambda be: be.add_group_penalty_grad_(ts, gs, dims, c))
        if out is not None:
            return out
        return add_group_penalty_grad_op([t.detach() for t in ts], gs, dims, coef_tensor(c, n, dev))


def group_prox_(tensors: Iterable[Tensor], l1: Coefficient = 0.0, lr: Coefficient = 1.0, dim=1, *,
                element_l1: Coefficient = 0.0, l2: Coefficient = 0.0) -> Tensor:
    """In place, the group soft-threshold (the proximal step of lr * l1 * sum_g ||w_g||_2):

        w_g <- w_g * max(0, 1 - lr * l1 / ||w_g||_2)

    A group with ||w_g||_2 <= lr * l1 becomes exactly zero. Returns the number
    of groups of each tensor not set to zero (1-D int64).

    With ``element_l1`` and ``l2``: the exact prox of
    lr * (element_l1 * ||w||_1 + l1 * sum_g ||w_g||_2 + l2 * ||w||_2^2) (sparse
    group lasso with weight decay) in the same two passes: the element
    soft-threshold (lr * element_l1), then the group soft-threshold, then the
    division by (1 + 2 * lr * l2).
    """
    fast = _fast(tensors, True)
    dims = None if fast is None else _fast_dims(dim, tensors)
    cs = None if dims is None else _fast_coefs(len(tensors), fast[2], element_l1, l1, l2, lr, written=tensors)
    if cs is not None:
        out = fast[0].group_prox_(list(tensors), dims, *cs)
        torch.autograd.graph.increment_version(tensors)
        return out
    ts, dims, n, dev = _group_args(tensors, dim, "group_prox_")
    cs = [coefficient(c, n, dev, name)
          for c, name in ((element_l1, "element_l1"), (l1, "l1"), (l2, "l2"), (lr, "lr"))]
    if not ts:
        return torch.zeros(0, dtype=torch.int64)
    check_no_overlap(ts, "tensors")
    check_coefs_apart(ts, tuple(zip(("element_l1", "l1", "l2", "lr"), cs)))
    with torch.no_grad():
        out = _eager((), ts, lambda be: be.group_prox_(ts, dims, *cs))
        if out is not None:
            return out
        return group_prox_op(ts, dims, *(coef_tensor(c, n, dev) for c in cs))


def max_norm_(tensors: Iterable[Tensor], max_value: Coefficient, dim=0) -> Tensor:
    """In place, each group onto the ball of radius ``max_value``:

        w_g <- w_g * min(1, max_value / ||w_g||_2)

    For an nn.Linear weight, ``dim=0`` (each output neuron's incoming weights)
    is Keras' ``MaxNorm(max_value, axis=0)`` on a Dense kernel. Returns the
    number of groups of each tensor that were scaled (1-D int64).
    """
    fast = _fast(tensors, True)
    dims = None if fast is None else _fast_dims(dim, tensors)
    cs = None if dims is None else _fast_coefs(len(tensors), fast[2], max_value, written=tensors)
    if cs is not None:
        out = fast[0].max_norm_(list(tensors), dims, *cs)
        torch.autograd.graph.increment_version(tensors)
        return out
    ts, dims, n, dev = _group_args(tensors, dim, "max_norm_")
    c = coefficient(max_value, n, dev, "max_value")
    if not ts:
        return torch.zeros(0, dtype=torch.int64)
    check_no_overlap(ts, "tensors")
    check_coefs_apart(ts, (("max_value", c),))
    with torch.no_grad():
        out = _eager((), ts, lambda be: be.max_norm_(ts, dims, c))
        if out is not None:
            return out
        return max_norm_op(ts, dims, coef_tensor(c, n, dev))


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------
def kth_abs(tensors: Iterable[Tensor], k, closest: bool = False) -> Tensor:
    """The k-th smallest magnitude of each tensor, exactly: for tensor i,
    the ``k[i]``-th smallest of its |w| (1-based, NaN counting as the
    largest; 0 for ``k[i] = 0``), as 1-D float64 on the tensors' device. ``k``
    is one int for every tensor or one per tensor, each in [0, numel].

    A prox with ``lr * l1`` equal to it leaves at least ``k[i]`` exact zeros
    (every weight with |w| <= it). ``closest=True``: where weights tie at it
    (common in 16-bit tensors), so that #(|w| <= it) overshoots ``k[i]`` by
    more than the largest magnitude below it would fall short, that one
    instead (0 if there is none): the threshold whose count of zeros is
    closest to ``k[i]``.

    One call for the whole list, on the device, no host sync: a radix
    selection on the magnitudes' bit patterns (on the CPU, 11 bits at a
    time, branch-free; on CUDA, 8 bits per level, two launches each).
    """
    closest = flag(closest, "closest")
    if type(tensors) in _LISTS and type(k) in _LISTS and len(k) == len(tensors):
        fast = _fast(tensors)
        if fast is not None and fast[0].selects() and _ks_ok(k, tensors):
            out = torch.empty(len(tensors), dtype=torch.float64, device=fast[2])
            fast[0].kth_abs_ptrs(*fast[1], list(k), closest, out)
            return out
    ts = tensor_list(tensors)
    _no_dtensor(ts, "kth_abs")
    ks = _ks(k, ts)
    if not ts:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        out = _eager(ts, (), lambda be: be.kth_abs(ts, ks, closest))
        if out is not None:
            return out
        return kth_abs_op([t.detach() for t in ts], ks, closest)


def _ks_ok(k, ts) -> bool:
    """True when ``k`` holds one plain int in [0, numel] per tensor."""
    return all(type(v) is int and 0 <= v <= t.numel() for v, t in zip(k, ts))


def _ks(k, ts: List[Tensor]) -> List[int]:
    """``k`` as one int per tensor, each in [0, numel], or a clear error."""
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, list, tuple)) and not (
            isinstance(k, Tensor) and k.dtype in (torch.int32, torch.int64) and k.dim() <= 1):
        raise TypeError(f"k must be an int or a sequence of ints (one per tensor), got {type(k).__name__}")
    if isinstance(k, Tensor):
        k = k.tolist()
    ks = [k] * len(ts) if isinstance(k, numbers.Integral) else list(k)
    if len(ks) != len(ts):
        raise ValueError(f"k has {len(ks)} values for {len(ts)} tensors")
    for i, (v, t) in enumerate(zip(ks, ts)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # (numpy's ints too)
            raise TypeError(f"k[{i}] must be an int, got {type(v).__name__}")
        if not 0 <= v <= t.numel():
            raise ValueError(f"k[{i}] = {v} is outside [0, {t.numel()}] (the size of tensor {i})")
    return [int(v) for v in ks]
