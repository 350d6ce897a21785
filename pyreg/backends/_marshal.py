"""Turns lists of tensors into what pyreg._C takes: data pointers, element
counts and dtype codes, shared by the ``cpu`` and ``cuda`` backends.

Kernels see each tensor as a flat run of ``numel`` elements starting at its data
pointer. That is exact for any dense, non-overlapping layout (contiguous,
channels-last, transposed...), because every op treats elements independently
or reduces over all of them. Other views are handled on a dense copy; in-place
ops then copy the result back. So is a view with torch's negative bit set
(``torch._neg_view``, or the imaginary part of a conjugated complex tensor):
its memory holds the negated values, which the kernels would read as they are.
"""
from __future__ import annotations

from operator import attrgetter
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._common import DTYPE_CODES


def is_dense(t: Tensor) -> bool:
    """True if t's elements fill [data_ptr, data_ptr + numel) with no gaps,
    each as its value (no negative bit)."""
    if t.is_neg():
        return False
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    return t.permute(order).is_contiguous()


def dense(t: Tensor) -> Tensor:
    return t if is_dense(t) else t.resolve_neg().contiguous()


def all_contiguous(tensors: Sequence[Tensor]) -> bool:
    """All contiguous, and none with the negative bit (see the module's docstring)."""
    return all(map(Tensor.is_contiguous, tensors)) and not any(map(Tensor.is_neg, tensors))


def dense_list(tensors: Sequence[Tensor]) -> List[Tensor]:
    """The tensors, each replaced by a contiguous copy unless dense."""
    if all_contiguous(tensors):  # the common case, checked at C speed
        return list(tensors)
    return [dense(t) for t in tensors]


_dtype_of = attrgetter("dtype")


def describe(tensors: Sequence[Tensor]) -> Tuple[List[int], List[int], List[int]]:
    """(data pointers, numels, dtype codes); the tensors must be dense. Read
    with ``map`` (C speed): this runs on every call of every op."""
    dtypes = list(map(_dtype_of, tensors))
    if dtypes and dtypes.count(dtypes[0]) == len(dtypes):
        codes = [DTYPE_CODES[dtypes[0]]] * len(dtypes)
    else:
        codes = list(map(DTYPE_CODES.__getitem__, dtypes))
    return pointers(tensors), list(map(Tensor.numel, tensors)), codes


def plain_description(tensors: Sequence[Tensor], ptrs: Optional[List[int]] = None
                      ) -> Tuple[List[int], List[int], List[int]]:
    """``describe`` for a list already checked to be plain contiguous tensors of
    one dtype (``_validate.plain_cpu``), with its pointers if known."""
    n = len(tensors)
    return (pointers(tensors) if ptrs is None else ptrs, list(map(Tensor.numel, tensors)),
            [DTYPE_CODES[tensors[0].dtype]] * n)


def _plain_lister():
    """pyreg._C.plain_list, with the types, layout and dtypes it compares
    with registered; None without the compiled module."""
    from .._lib import _C  # noqa: PLC0415

    if _C is None or not hasattr(_C, "plain_list"):
        return None
    _C.register_plain(Tensor, torch.nn.Parameter, torch.strided, dict(DTYPE_CODES),
                      {d: d.itemsize for d in DTYPE_CODES})
    return _C.plain_list


_plain_list = _plain_lister()


def plain_list(ts: Sequence[Tensor], written: bool = False) -> Optional[Tuple[List[int], List[int], List[int]]]:
    """``(data pointers, numels, dtype codes)`` of ``ts``, as the kernels
    take them, when it is the common case of a CPU op: a list or tuple that
    ``_validate.plain_cpu`` takes and, with ``written`` (an op that writes
    them), no inference tensor outside inference mode, none that autograd
    records in grad mode (``_validate.check_writable``) and no two sharing a
    byte (``_validate.disjoint_pointers``). None otherwise, and without the
    compiled module. One pass in C (csrc/fast_list.cpp)."""
    if _plain_list is None:
        return None
    return _plain_list(ts, written, written and not torch.is_inference_mode_enabled(), False,
                       written and torch.is_grad_enabled())


def plain_cuda_list(ts: Sequence[Tensor], written: bool = False
                    ) -> Optional[Tuple[int, Tuple[List[int], List[int], List[int]]]]:
    """``(device index, (data pointers, numels, dtype codes))`` for what
    :func:`plain_list` takes, but with every tensor on one GPU instead of the
    CPU; else None."""
    if _plain_list is None:
        return None
    d = _plain_list(ts, written, written and not torch.is_inference_mode_enabled(), True,
                    written and torch.is_grad_enabled())
    return None if d is None else (d[3], d[:3])


def pointers(tensors: Sequence[Tensor]) -> List[int]:
    return list(map(Tensor.data_ptr, tensors))


def memoryless(tensors: Sequence[Tensor], ptrs: Optional[List[int]] = None) -> bool:
    """Whether a tensor of the list has elements but no memory (a null data
    pointer: torch's ZeroTensor, all zeros by construction)."""
    ptrs = pointers(tensors) if ptrs is None else ptrs
    return any(p == 0 and t.numel() > 0 for p, t in zip(ptrs, tensors))


#: A coefficient as the backends take it: one value for every tensor, or a
#: 1-D float64 tensor with one value per tensor.
KernelCoef = Union[float, Tensor]


def coef(c: KernelCoef, device: torch.device, n: int) -> Tuple[int, float]:
    """A coefficient as pyreg._C takes it: (pointer to one float64 per tensor,
    0.0), or (0, value) for one value passed by value. A tensor must already be
    in the kernels' form (the ops make it so); anything else is a caller's bug,
    reported before a kernel could read the wrong memory."""
    if isinstance(c, float):
        return 0, c
    if not (isinstance(c, Tensor) and c.dtype == torch.float64 and c.device == device
            and c.shape == (n,) and c.is_contiguous()):
        got = (f"{tuple(c.shape)} {c.dtype} on {c.device}" if isinstance(c, Tensor)
               else type(c).__name__)
        raise ValueError(f"a coefficient for the kernels must be a float or a contiguous ({n},) "
                         f"float64 tensor on {device}; got {got}")
    return c.data_ptr(), 0.0


def host_coef(c: KernelCoef) -> Tuple[int, float]:
    """``coef`` for a coefficient already checked to be in the kernels' form on
    the CPU (a float, or a contiguous float64 tensor of one value per tensor)."""
    return (0, c) if type(c) is float else (c.data_ptr(), 0.0)


class Writable:
    """Dense stand-ins for tensors an op writes: the tensor itself when it is
    dense, else a contiguous copy that ``commit()`` copies back."""

    def __init__(self, tensors: Sequence[Tensor], like: Sequence[Tensor] | None = None):
        # ``like``: tensors whose memory order these must share (params, for grads).
        self.targets = list(tensors)
        # Same shapes (checked by the ops) and all contiguous: same layouts.
        if all_contiguous(self.targets) and (like is None or all_contiguous(like)):
            self.work = self.targets
            return
        self.work = []
        for i, t in enumerate(self.targets):
            if like is None:
                self.work.append(dense(t))
            elif is_dense(t) and (t.numel() <= 1 or t.stride() == like[i].stride()):
                self.work.append(t)
            else:  # a copy laid out exactly like its (dense) partner, element for element
                ref = like[i]
                self.work.append(torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype,
                                                     device=t.device).copy_(t))

    def commit(self) -> None:
        if self.work is self.targets:
            return
        for t, w in zip(self.targets, self.work):
            if w is not t:
                t.copy_(w)


def paired(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> Tuple[List[Tensor], Writable]:
    """Dense params and grads that share one memory order, element for element."""
    ws = dense_list(tensors)
    return ws, Writable(grads, like=ws)


def like(tensors: Sequence[Tensor], partners: Sequence[Tensor]) -> List[Tensor]:
    """Read-only tensors (refs) laid out exactly like their dense partners,
    element for element: each as is when it already is, else a copy."""
    return Writable(tensors, like=partners).work


def memory_order(t: Tensor) -> List[int]:
    """t's dimensions from the outermost in memory to the innermost (a dense
    tensor permuted this way is contiguous). Ties (size-1 dims) keep their order."""
    if t.is_contiguous():
        return list(range(t.dim()))
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def group_shape(t: Tensor, dim: int) -> Tuple[int, int, int]:
    """(outer, groups, inner) of dense t for groups along ``dim`` (normalized,
    0 <= dim < max(t.dim(), 1)): in memory order, the elements before, along and
    after that dimension. A 0-dim tensor is one group of one element."""
    if t.dim() == 0:
        return 1, 1, 1
    order = memory_order(t)
    pos = order.index(dim)
    outer = inner = 1
    for d in order[:pos]:
        outer *= t.shape[d]
    for d in order[pos + 1:]:
        inner *= t.shape[d]
    return outer, t.shape[dim], inner


def group_shapes(tensors: Sequence[Tensor], dims: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
    """Three lists, (outer, groups, inner) per tensor, as pyreg._C takes them."""
    shapes = [group_shape(t, d) for t, d in zip(tensors, dims)]
    return [s[0] for s in shapes], [s[1] for s in shapes], [s[2] for s in shapes]


def step_ticket(device: torch.device) -> Tensor:
    """A zeroed int32 on ``device`` for the CUDA optimizer kernel's ticket
    (``compiled.CompiledKernels.optim_step``): the kernel leaves it zero, so one
    ticket serves every step of an optimizer on that device."""
    return torch.zeros(1, dtype=torch.int32, device=device)
