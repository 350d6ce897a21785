"""Argument checks shared by every layer of pyreg: the public ops, Regularized,
the conventions and the CLIs. Each raises TypeError (wrong kind of thing) or
ValueError (wrong value) with a message naming the argument, and returns the
value normalized. The list checks take the common case at C speed (``map``
over tensor attributes) and fall back to a per-tensor loop only to explain an
error.
"""
from __future__ import annotations

import math
import numbers
import sys
from operator import attrgetter, itemgetter, le
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from ._common import SUPPORTED_DTYPES, capturing, has_dtensor, local_tensors, to_device

#: A coefficient as users give it: one number for every tensor, one number per
#: tensor (a sequence), or a tensor (0-dim, or 1-D with one value per tensor).
Coefficient = Union[float, Sequence[float], Tensor]

_dtype_of, _device_of, _layout_of = attrgetter("dtype"), attrgetter("device"), attrgetter("layout")
_shape_of = attrgetter("shape")
_is_nested = attrgetter("is_nested")
_start_of, _end_of = itemgetter(0), itemgetter(1)  # of (start, end) byte spans
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------
def _as_float(x, where: str, rule: str) -> float:
    """float(x), or a ValueError saying ``rule`` where x is beyond a float's range."""
    try:
        return float(x)
    except OverflowError:
        r = repr(x)
        raise ValueError(f"{where} must be {rule}, got {r if len(r) <= 40 else r[:20] + '...'} "
                         "(beyond a float's range)") from None


def flag(value, where: str) -> bool:
    """value, which must be True or False (not a truthy object)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, got {value!r}")
    return value


def real(x, where: str) -> float:
    """x as a float: a finite real number (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(x).__name__}")
    x = _as_float(x, where, "finite")
    if not math.isfinite(x):
        raise ValueError(f"{where} must be finite, got {x}")
    return x


def nonneg_real(x, where: str) -> float:
    """x as a float: a finite real number >= 0 (a coefficient, an lr, an alpha).
    (The test is written in comparisons, which torch.compile can trace on a
    symbolic float: a number Dynamo made an input of the graph, such as an lr
    that changed between calls.)"""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(x).__name__}")
    x = _as_float(x, where, "finite and >= 0")
    if not 0.0 <= x <= _FLOAT_MAX:  # (NaN fails both)
        raise ValueError(f"{where} must be finite and >= 0, got {x}")
    return x


def fast_coefficient(c, n: int) -> Union[float, Tensor, None]:
    """``c`` in the kernels' form when it already is in the common, valid
    form, else None (then :func:`coefficient` decides, and explains an error):
    a Python float (or int) that is finite and >= 0, or a contiguous 1-D
    float64 CPU tensor of ``n`` values, all finite and >= 0. For eager CPU
    calls; the same values are accepted as :func:`coefficient` accepts."""
    tp = type(c)
    if tp is float:
        return c if 0.0 <= c <= _FLOAT_MAX else None  # NaN fails both tests
    if tp is int:
        return float(c) if 0 <= c <= _INT_MAX else None
    if (tp is Tensor and c.dtype is torch.float64 and c.device.type == "cpu" and c.shape == (n,)
            and c.is_contiguous() and not c.requires_grad and not c.is_neg() and not c._is_zerotensor()):
        vals = c.tolist()
        return c if min(vals) >= 0 and math.isfinite(sum(vals)) else None
    return None


_FLOAT_MAX = float.fromhex("0x1.fffffffffffffp+1023")
_INT_MAX = 1 << 53


def with_values(t: Tensor, where: str) -> Tensor:
    """``t``, a tensor standing for numbers (a coefficient, an lr), checked to
    hold them: dense (strided) and not on the meta device."""
    if t.layout != torch.strided:
        raise TypeError(f"{where} is a tensor of layout {t.layout}; a coefficient is a number, a sequence of "
                        "numbers or a dense (strided) tensor")
    if t.is_meta:
        raise ValueError(f"{where} is a meta tensor: it has no values")
    return t


def one_value_tensor(t: Tensor, where: str) -> Tensor:
    """A tensor standing for one coefficient or lr: one element of a real dtype,
    dense, and, on the CPU, finite and >= 0. A device tensor's value is not read
    (that would sync the host): it is trusted as given."""
    with_values(t, where)
    if t.numel() != 1:
        raise ValueError(f"{where} is a tensor of shape {tuple(t.shape)}; expected one value")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{where} has dtype {t.dtype}; expected a real dtype")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        nonneg_real(float(t), where)
    return t


# --------------------------------------------------------------------------
# Tensor lists
# --------------------------------------------------------------------------
def _no_tangents(tensors: List[Tensor], what: str) -> None:
    """Forward-mode AD is not supported: the ops compute no tangent (a dual
    tensor's would be dropped)."""
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"{what}[{i}] carries a forward-mode AD tangent (torch.autograd.forward_ad, "
                                      "torch.func.jvp): pyreg's ops compute no tangent")


def tensor_list(tensors, what: str = "tensors") -> List[Tensor]:
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    elif isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{what} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    if _forward_ad._current_level >= 0:  # (inside a dual_level: a tensor may carry a tangent)
        _no_tangents(out, what)
    if not torch.compiler.is_compiling() and uniform(out):
        return out
    device = None  # explain why not (or accept an empty list)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; pyreg supports "
                            "float32, float64, float16 and bfloat16")
        if t.layout != torch.strided:
            raise TypeError(f"{what}[{i}] has layout {t.layout}; pyreg needs dense (strided) tensors")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device} but {what}[0] is on {device}; "
                             "one call takes tensors on one device")
        if t.is_meta:
            raise ValueError(f"{what}[{i}] is a meta tensor: it has no data to regularize")
        if t.is_nested:
            raise TypeError(f"{what}[{i}] is a nested tensor; pyreg takes its components as separate "
                            f"tensors: pass {what}[{i}].unbind()")
        if not torch.compiler.is_compiling() and t._is_zerotensor():  # (a tracer's tensors have memory)
            raise TypeError(f"{what}[{i}] is a ZeroTensor (torch's zeros without memory, which cannot be read "
                            f"in place or written): pass a materialized tensor, e.g. {what}[{i}].clone()")
    return out


#: Tensor types whose data the kernels may read directly in eager mode:
#: torch.Tensor and nn.Parameter (which adds no torch_function behaviour).
PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
#: (type, dtype, device, layout) of the tensors the CPU fast path takes.
_PLAIN_CPU = frozenset((cls, d, torch.device("cpu"), torch.strided) for cls in PLAIN_TYPES for d in SUPPORTED_DTYPES)
_plain_kind = attrgetter("__class__", "dtype", "device", "layout")
_second = itemgetter(1)


def plain_cpu(ts: Sequence[Tensor]) -> bool:
    """True for the common case of a CPU op, decided at C speed: a non-empty
    list of plain tensors (``PLAIN_TYPES``), all contiguous, on the CPU, of
    one supported dtype, none with the negative bit (its memory holds the
    negated values), none a ZeroTensor (no memory) and none nested. It passes every check
    of :func:`tensor_list`, and the kernels take each tensor as a flat run
    of its elements."""
    try:
        kinds = set(map(_plain_kind, ts))
    except AttributeError:  # not a tensor
        return False
    return (bool(kinds) and kinds <= _PLAIN_CPU and len(set(map(_second, kinds))) == 1
            and all(map(Tensor.is_contiguous, ts)) and not any(map(Tensor.is_neg, ts))
            and not any(map(Tensor._is_zerotensor, ts)) and not any(map(_is_nested, ts)))


def uniform(ts: List[Tensor]) -> bool:
    """The checks of ``_tensor_list`` for a non-empty list, at C speed: dense
    strided tensors of supported dtypes, all on one (non-meta) device, none a
    ZeroTensor or nested (those the full checks decide)."""
    if not ts or not all(issubclass(cls, Tensor) for cls in set(map(type, ts))):
        return False
    devices = set(map(_device_of, ts))
    return (len(devices) == 1 and next(iter(devices)).type != "meta"
            and set(map(_dtype_of, ts)) <= _SUPPORTED
            and set(map(_layout_of, ts)) == {torch.strided}
            and not any(map(Tensor._is_zerotensor, ts)) and not any(map(_is_nested, ts)))


# --------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------
def _host_copy_error(name: str, what: str) -> ValueError:
    return ValueError(f"{name} is {what}: it cannot be copied to the GPU during CUDA graph capture "
                      "(each replay would copy one stale host buffer); pass a Python number or a "
                      "tensor on the device")


def coefficient(c: Coefficient, n: int, device: torch.device, name: str) -> Union[float, Tensor]:
    """A coefficient, validated, as the backends take it: a float (one value
    for every tensor; the kernels get it by value, so it needs no memory and
    no fill on the device) or a 1-D float64 tensor of n entries on ``device``."""
    if isinstance(c, Tensor):
        with_values(c, name)
        if c.device != device and c.device.type == "cpu" and capturing(device):
            raise _host_copy_error(name, "a CPU tensor")
        if c.dim() > 1 or (c.dim() == 1 and c.numel() != n):
            raise ValueError(f"{name} has shape {tuple(c.shape)}; expected a number or "
                             f"one value per tensor ({n})")
        if not (c.is_floating_point() or c.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} has dtype {c.dtype}; expected a real dtype")
        if not torch.compiler.is_compiling() and c._is_zerotensor():
            c = c.clone()  # memory holding the zeros (a ZeroTensor has none)
        if c.device.type == "cpu" and not torch.compiler.is_compiling():
            # Cheap here (no device sync); device tensors are trusted as given.
            # Fast accept: min over the non-NaN values (or NaN) >= 0, and a
            # finite sum (no NaN, no inf); else find the first bad value.
            vals = c.detach().reshape(-1).tolist()
            if vals and not (min(vals) >= 0 and math.isfinite(sum(vals))):
                bad = ~torch.isfinite(c) | (c < 0)
                if bad.any():
                    i = int(bad.reshape(-1).nonzero()[0])
                    raise ValueError(f"{name}[{i}] must be finite and >= 0, got {float(c.reshape(-1)[i])}")
        # (a view with the negative bit holds the negated values in memory)
        return to_device(c.resolve_neg(), torch.float64, device).expand(n).contiguous()
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return nonneg_real(c, name)
    if isinstance(c, (str, bytes)) or not isinstance(c, Iterable):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, "
                        f"got {type(c).__name__}")
    if capturing(device):
        raise _host_copy_error(name, "a sequence of numbers")
    vals = list(c)
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values but there are {n} tensors")
    vals = [nonneg_real(v, f"{name}[{i}]") for i, v in enumerate(vals)]
    if torch.compiler.is_compiling() and vals:  # (floats that Dynamo made symbolic stay graph inputs;
        one = torch.ones((), dtype=torch.float64, device=device)  # torch.tensor would make them constants)
        return torch.stack([one * v for v in vals])
    return to_device(vals, torch.float64, device)


# --------------------------------------------------------------------------
# Memory overlap (in-place ops)
# --------------------------------------------------------------------------
def check_writable(tensors: Sequence[Tensor], what: str) -> None:
    """No inference tensor among the tensors an op writes, outside inference
    mode: torch refuses to write one there (the kernels would, silently). In
    grad mode, none that autograd records (the result of ops on tensors that
    require grad): pyreg's in-place ops are not recorded, so gradients
    through it would leave them out."""
    if torch.is_grad_enabled():
        i = next((i for i, t in enumerate(tensors) if t.grad_fn is not None), None)
        if i is not None:
            raise ValueError(f"{what}[{i}] is the result of ops that autograd records (it requires grad and has a "
                             "grad_fn): pyreg's in-place ops are not recorded, so gradients through it would be "
                             "wrong; write a leaf (a parameter), or call the op under torch.no_grad()")
    if torch.is_inference_mode_enabled() or not any(map(Tensor.is_inference, tensors)):
        return
    i = next(i for i, t in enumerate(tensors) if t.is_inference())
    raise ValueError(f"{what}[{i}] is an inference tensor (made under torch.inference_mode()), which cannot be "
                     "written in place outside inference mode: clone it, or call the op inside inference mode")


def check_no_overlap(tensors: Sequence[Tensor], what: str) -> None:
    """In-place ops must be able to write the tensors (:func:`check_writable`)
    and must not write one memory location twice. Tensors without memory to
    compare (fake tensors, as torch.compile's tracing makes; the functional
    tensors of make_fx) are not compared, as under torch.compile."""
    if torch.compiler.is_compiling():
        return
    check_writable(tensors, what)
    if not has_dtensor(tensors) and _without_memory(tensors):
        return
    bad = first_overlap(tensors)
    if bad is None:
        return
    a, b = bad
    if a == b:
        raise ValueError(f"{what}[{a}] has overlapping memory (an expanded view?); "
                         "it cannot be updated in place")
    raise ValueError(f"{what}[{a}] and {what}[{b}] share memory; "
                     "an in-place op needs distinct tensors")


def check_grads_apart(tensors: Sequence[Tensor], grads: Sequence[Tensor], op: str = "add_penalty_grad_") -> None:
    """``op`` writes the grads while it reads the tensors: the grads writable,
    no grad sharing memory with another grad (or itself), nor with any tensor.
    Tensors may share memory with each other (they are only read). No device
    sync."""
    if torch.compiler.is_compiling():
        return
    check_writable(grads, "grads")
    if not has_dtensor(grads) and not has_dtensor(tensors) and disjoint(list(grads) + list(tensors)):
        return  # the common case, at C speed
    check_no_overlap(grads, "grads")
    if has_dtensor(grads) or has_dtensor(tensors):  # a DTensor's local shard holds its memory
        grads, tensors = local_tensors(grads), local_tensors(tensors)
    bad = overlap_between(grads, tensors)
    if bad is not None:
        raise ValueError(f"grads[{bad[0]}] shares memory with tensors[{bad[1]}]; {op} "
                         "writes the grads while it reads the tensors, so they must be distinct")


def check_coefs_apart(written: Sequence[Tensor], coefs: Sequence[Tuple[str, Any]], what: str = "tensors") -> None:
    """A coefficient tensor (as :func:`coefficient` returns it: the given
    tensor where it needed no copy) that shares memory with a tensor the op
    writes is refused: the op would read it while writing it. No device sync."""
    for name, c in coefs:
        if isinstance(c, Tensor) and not torch.compiler.is_compiling() and not _without_memory([c]):
            bad = overlap_between(local_tensors(written) if has_dtensor(written) else written, [c])
            if bad is not None:
                raise ValueError(f"{name} shares memory with {what}[{bad[0]}]; the op writes {what} while it "
                                 f"reads {name}, so they must be distinct")


def _without_memory(tensors: Sequence[Tensor]) -> bool:
    """Whether some tensor of a list of subclasses has no memory whose
    addresses could be compared: a fake tensor (FakeTensorMode), or one
    whose data pointer cannot be read."""
    if set(map(type, tensors)) <= PLAIN_TYPES:
        return False
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # (loaded wherever a fake tensor exists)
    if fake is not None and any(isinstance(t, fake.FakeTensor) for t in tensors):
        return True
    try:
        for t in tensors:
            t.data_ptr()
    except RuntimeError:
        return True
    return False


def first_overlap(tensors: Sequence[Tensor]) -> Optional[Tuple[int, int]]:
    """(i, i) for the first tensor whose elements overlap each other, (a, b)
    (a < b) for two tensors whose memory ranges overlap, else None."""
    if has_dtensor(tensors):  # a DTensor's local shard holds its memory
        tensors = local_tensors(tensors)
    if disjoint(tensors):
        return None
    for i, t in enumerate(tensors):
        if not t.is_contiguous() and _has_internal_overlap(t):
            return i, i
    return overlap_between(tensors, tensors)


def disjoint(tensors: Sequence[Tensor]) -> bool:
    """True if the tensors are contiguous and no two share a byte, decided at C
    speed; False means "not shown" (the exact checks then decide). Each tensor
    is its byte range; sorted by start, ranges are disjoint exactly when each
    ends at or before the next one starts (empty tensors are empty ranges)."""
    if not all(map(Tensor.is_contiguous, tensors)):
        return False
    starts = list(map(Tensor.data_ptr, tensors))
    spans = sorted(zip(starts, map(int.__add__, starts, map(attrgetter("nbytes"), tensors))))
    return all(map(le, map(_end_of, spans), map(_start_of, spans[1:])))



def disjoint_pointers(tensors: Sequence[Tensor]) -> Optional[List[int]]:
    """The data pointers of contiguous ``tensors`` when no two share a byte
    (as :func:`disjoint`, whose contiguity test the caller has made), else
    None ("not shown")."""
    starts = list(map(Tensor.data_ptr, tensors))
    if len(starts) > 1:
        spans = sorted(zip(starts, map(int.__add__, starts, map(_nbytes_of, tensors))))
        if not all(map(le, map(_end_of, spans), map(_start_of, spans[1:]))):
            return None
    return starts


_nbytes_of = attrgetter("nbytes")


def overlap_between(written: Sequence[Tensor], read: Sequence[Tensor]) -> Optional[Tuple[int, int]]:
    """(i, j) with written[i] and read[j] (i != j when both lists are the same)
    overlapping in memory, else None; for one list, i < j. Each tensor is the
    address range from its first to its last element (conservative for
    interleaved views); one sort over all of them, since live allocations never
    overlap unless they share memory."""
    same = written is read
    spans = []
    for kind, ts in ((0, written),) + (() if same else ((1, read),)):
        for i, t in enumerate(ts):
            n = t.numel()
            if n:
                start = t.data_ptr()
                spans.append((start, start + (n if t.is_contiguous() else extent(t)) * t.element_size(),
                              kind, i))
    spans.sort()
    reach = [None, None]  # (end, index) of the furthest-reaching span of each kind so far
    for start, end, kind, i in spans:
        r = reach[0 if same else 1 - kind]
        if r is not None and start < r[0]:
            if same:
                return (r[1], i) if r[1] < i else (i, r[1])
            return (i, r[1]) if kind == 0 else (r[1], i)
        if reach[kind] is None or end > reach[kind][0]:
            reach[kind] = (end, i)
    return None


def _has_internal_overlap(t: Tensor) -> bool:
    """True if two elements of t are one memory location (exact). Decided from
    sizes and strides alone for every common layout; only interleaved strides
    (which the kernels handle on a dense copy anyway) enumerate offsets."""
    if t.numel() <= 1 or t.is_contiguous():
        return False
    reach = 0  # largest offset the smaller-stride dims reach
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if st <= reach or st == 0:
            break
        reach += (n - 1) * st
    else:
        return False
    if any(st == 0 for n, st in zip(t.shape, t.stride()) if n > 1):
        return True
    offsets = torch.arange(extent(t), device="cpu").as_strided(t.shape, t.stride())
    return int(offsets.unique().numel()) < t.numel()


def extent(t: Tensor) -> int:
    """Elements from t's first to its last element in memory (inclusive)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


# --------------------------------------------------------------------------
# References (ops toward a reference) and group dimensions (group ops)
# --------------------------------------------------------------------------
def partner_list(others, tensors: Sequence[Tensor], name: str, plural: str, base: str = "tensors",
                 like: Optional[tuple] = None) -> List[Tensor]:
    """``others`` (grads, refs, an optimizer's state buffers): one tensor per
    tensor, each of its tensor's shape, dtype and device. ``name`` indexes
    them in messages, ``plural`` counts them ("grads", "ref tensors"),
    ``base`` names ``tensors`` ("params"); ``like``: :func:`like_tensors`
    of ``tensors``, where at hand (then checked by :func:`first_unpaired`)."""
    os_ = tensor_list(others, name)
    if len(os_) != len(tensors):
        raise ValueError(f"got {len(tensors)} {base} but {len(os_)} {plural}")
    if like is not None:  # (the optimizers' lists: one pass per attribute)
        bad = first_unpaired(tensors, os_, like)
        pairs: Iterable = () if bad is None else ((bad, (tensors[bad], os_[bad])),)
    else:  # (the ops: this loop, which Dynamo traces in a compiled step)
        pairs = enumerate(zip(tensors, os_))
    for i, (t, o) in pairs:
        if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device:
            raise ValueError(f"{name}[{i}] is {tuple(o.shape)} {o.dtype} on {o.device} but "
                             f"{base}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}")
    return os_


def like_tensors(tensors: Sequence[Tensor]) -> Tuple[list, list, list]:
    """The tensors' shapes, dtypes and devices (what :func:`first_unpaired` compares)."""
    return list(map(_shape_of, tensors)), list(map(_dtype_of, tensors)), list(map(_device_of, tensors))


def first_unpaired(tensors: Sequence[Tensor], others: Sequence[Tensor], like: Optional[tuple] = None
                   ) -> Optional[int]:
    """The index of the first of ``others`` without its tensor's shape, dtype
    and device (the kernels pair their elements by position and read them as
    the tensor's dtype), ``len`` of the shorter list where the lengths
    differ, or None where every one matches. ``like``: :func:`like_tensors`
    of ``tensors``, if at hand. In one pass per attribute (C speed)."""
    shapes, dtypes, devices = like_tensors(tensors) if like is None else like
    if (not torch.compiler.is_compiling()  # (Dynamo traces the loop below, not map())
            and len(others) == len(shapes) and list(map(_shape_of, others)) == shapes
            and list(map(_dtype_of, others)) == dtypes and list(map(_device_of, others)) == devices):
        return None
    for i, (t, o) in enumerate(zip(tensors, others)):
        if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device:
            return i
    return None if len(tensors) == len(others) else min(len(tensors), len(others))


def check_refs_apart(tensors: Sequence[Tensor], refs: Sequence[Tensor], what: str = "tensors") -> None:
    """An op that writes ``what`` (the tensors, or the grads) while it reads
    the refs: no ref may share memory with any of them."""
    if torch.compiler.is_compiling() or disjoint(list(tensors) + list(refs)):
        return
    bad = overlap_between(tensors, refs)
    if bad is not None:
        raise ValueError(f"{what}[{bad[0]}] shares memory with ref[{bad[1]}]; the op writes the "
                         f"{what} while it reads the refs, so they must be distinct")


def dim_values(dim, n: int, name: str = "dim") -> List[int]:
    """One int per tensor (of ``n``) from one int for every tensor or a
    sequence of ints, one per tensor; a bool, a float or a tensor is a
    TypeError (not read as a dimension)."""
    if isinstance(dim, bool):
        raise TypeError(f"{name} must be an int or a sequence of ints, got bool")
    if isinstance(dim, numbers.Integral):
        return [int(dim)] * n
    if isinstance(dim, Iterable) and not isinstance(dim, (str, bytes, Tensor)):
        dims = list(dim)
        if len(dims) != n:
            raise ValueError(f"{name} has {len(dims)} values but there are {n} tensors")
        for i, d in enumerate(dims):
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise TypeError(f"{name}[{i}] must be an int, got {type(d).__name__}")
        return [int(d) for d in dims]
    raise TypeError(f"{name} must be an int or a sequence of ints, got {type(dim).__name__}")


def group_dims(dim, tensors: Sequence[Tensor], name: str = "dim") -> List[int]:
    """The group dimension of each tensor, normalized to 0 <= d < max(ndim, 1):
    one int for every tensor, or a sequence of ints (one per tensor). A 0-dim
    tensor (one group) takes 0 or -1."""
    dims = dim_values(dim, len(tensors), name)
    out = []
    for i, (t, d) in enumerate(zip(tensors, dims)):
        if t.is_nested:
            raise TypeError(f"tensors[{i}] is a nested tensor: its groups along {name} are not defined "
                            "(its components differ in shape); pass its components (.unbind())")
        nd = max(t.dim(), 1)
        if not -nd <= d < nd:
            raise ValueError(f"{name}={d} is out of range for tensors[{i}] of shape {tuple(t.shape)} "
                             f"(expected {-nd} <= {name} < {nd})")
        out.append(d % nd)
    return out
