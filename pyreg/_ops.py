"""pyreg's ops: schemas, fake kernels, autograd and backend dispatch in one place,
plus the public functions that validate and normalize arguments.

Each op covers a whole list of tensors (all layers of a model) in one call:

    weight_stats(tensors)                       -> WeightStats(l1, l2, linf, nnz)
    penalty(tensors, l1, l2)                    -> 0-dim tensor, differentiable
    add_penalty_grad_(tensors, grads, l1, l2)   -> 0-dim tensor (penalty value)
    prox_(tensors, l1, l2, lr)                  -> 1-D int64 (nonzeros per tensor)

The ops are registered with ``torch.library.custom_op`` (namespace ``pyreg``),
so they run under ``torch.compile``. At run time each op picks a backend from
the tensors' device: the compiled kernels when there are some for it, else the
pure-torch reference; ``use_backend`` forces one. In plain eager mode (not
tracing, no dispatch mode, plain tensors) the public functions call that
backend directly: same kernels, without the dispatcher's per-tensor cost.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from operator import attrgetter, itemgetter, le
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from ._common import SUPPORTED_DTYPES, WeightStats, capturing, coef_tensor, result_dtype, to_device

try:  # DTensor inputs (FSDP2) go to pyreg.distributed; torch builds without it have none
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover - torch built without distributed
    _DTensor = None


def _has_dtensor(ts: Sequence[Tensor]) -> bool:
    if _DTensor is None:
        return False
    if torch.compiler.is_compiling():  # Dynamo traces plain loops, not map()
        return any(isinstance(t, _DTensor) for t in ts)
    return any(issubclass(cls, _DTensor) for cls in set(map(type, ts)))


def _distributed():
    from . import distributed
    return distributed

Coef = Union[float, Sequence[float], Tensor]

# Per-tensor attribute reads for whole lists at C speed (``map`` over these
# costs well under a microsecond per tensor, a Python loop several): the hot
# path of every public op reads each tensor's metadata this way, and only a
# list that fails a check takes the per-tensor loop that explains the error.
_dtype_of, _device_of, _layout_of = attrgetter("dtype"), attrgetter("device"), attrgetter("layout")
_shape_of, _requires_grad = attrgetter("shape"), attrgetter("requires_grad")
_start_of, _end_of = itemgetter(0), itemgetter(1)  # of (start, end) byte spans
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
#: Types whose tensors the kernels may read through data_ptr() in plain eager
#: mode: torch.Tensor and nn.Parameter (which adds no torch_function behaviour).
_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})

# --------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------
_forced: Optional[str] = None


def backend_name(device: Union[str, torch.device]) -> str:
    """Name of the backend the ops use for tensors on ``device`` right now."""
    device = torch.device(device)
    if _forced is not None:
        return _forced
    be = backends.compiled_for(device)
    return "torch" if be is None else be.NAME


def _backend(tensors: Sequence[Tensor]):
    device = tensors[0].device
    if _forced is None:
        return backends.compiled_for(device) or backends.torch_ref
    be = backends.get(_forced)
    why = be.why_not(device)
    if why:
        raise RuntimeError(f"pyreg backend {_forced!r} is forced but cannot run on {device}: {why}")
    return be


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend ("torch", "cpu", "cuda", "cuda-emu") inside a ``with``
    block; ``None`` restores automatic choice."""
    global _forced
    if name is not None:
        backends.get(name)  # validates the name
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


# --------------------------------------------------------------------------
# The custom ops (schemas, fake kernels, autograd)
# --------------------------------------------------------------------------
@torch.library.custom_op("pyreg::weight_stats", mutates_args=())
def _weight_stats_op(tensors: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_backend(tensors).weight_stats(tensors))


@_weight_stats_op.register_fake
def _(tensors):
    n, rd, dev = len(tensors), result_dtype(tensors), tensors[0].device
    f = lambda dt: torch.empty(n, dtype=dt, device=dev)  # noqa: E731
    return f(rd), f(rd), f(rd), f(torch.int64)


@torch.library.custom_op("pyreg::penalty", mutates_args=())
def _penalty_op(tensors: List[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    return _backend(tensors).penalty(tensors, l1, l2)


@_penalty_op.register_fake
def _(tensors, l1, l2):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


def _penalty_setup(ctx, inputs, output):
    tensors, l1, l2 = inputs
    ctx.save_for_backward(l1, l2, *tensors)


def _penalty_backward(ctx, grad_out):
    l1, l2, *tensors = ctx.saved_tensors
    grads = [torch.zeros_like(t) for t in tensors]
    go = grad_out.to(l1.dtype)
    _add_penalty_grad_op(tensors, grads, l1 * go, l2 * go)
    return grads, None, None


_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)


@torch.library.custom_op("pyreg::add_penalty_grad_", mutates_args=("grads",))
def _add_penalty_grad_op(tensors: List[Tensor], grads: List[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    return _backend(tensors).add_penalty_grad_(tensors, grads, l1, l2)


@_add_penalty_grad_op.register_fake
def _(tensors, grads, l1, l2):
    return torch.empty((), dtype=result_dtype(tensors), device=tensors[0].device)


@torch.library.custom_op("pyreg::prox_", mutates_args=("tensors",))
def _prox_op(tensors: List[Tensor], l1: Tensor, l2: Tensor, lr: Tensor) -> Tensor:
    return _backend(tensors).prox_(tensors, l1, l2, lr)


@_prox_op.register_fake
def _(tensors, l1, l2, lr):
    return torch.empty(len(tensors), dtype=torch.int64, device=tensors[0].device)


# --------------------------------------------------------------------------
# Eager fast path: the same backend call, without the dispatcher
# --------------------------------------------------------------------------
def _plain_eager(ts: Sequence[Tensor], mutated: Sequence[Tensor] = ()) -> bool:
    """True when a public function may call the backend directly instead of
    the custom op: not tracing, no dispatch mode active, plain tensors
    (``Tensor`` or ``nn.Parameter``), and no inference tensor to mutate outside
    inference mode (the op raises for that). There the dispatcher adds only
    cost (about 1.5 us per tensor): the backend, kernels and results are the
    same."""
    return (not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None
            and set(map(type, ts)) <= _PLAIN_TYPES
            and set(map(type, mutated)) <= _PLAIN_TYPES
            and (torch.is_inference_mode_enabled() or not any(map(Tensor.is_inference, mutated))))


def _bump_versions(ts: Sequence[Tensor]) -> None:
    """What the dispatcher does for a mutated input: autograd then sees the
    change to any of them saved for backward."""
    if _VERSION_LIST:
        torch.autograd.graph.increment_version(ts)
    else:  # torch < 2.5 takes one tensor
        for t in ts:
            torch.autograd.graph.increment_version(t)


try:
    torch.autograd.graph.increment_version([])
    _VERSION_LIST = True
except Exception:  # pragma: no cover - older torch
    _VERSION_LIST = False


# --------------------------------------------------------------------------
# Argument checks and normalization
# --------------------------------------------------------------------------
def _tensor_list(tensors, what: str = "tensors") -> List[Tensor]:
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    elif isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{what} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    if not torch.compiler.is_compiling() and _uniform(out):
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
    return out


def _uniform(ts: List[Tensor]) -> bool:
    """The checks of ``_tensor_list`` for a non-empty list, at C speed: dense
    strided tensors of supported dtypes, all on one (non-meta) device."""
    if not ts or not all(issubclass(cls, Tensor) for cls in set(map(type, ts))):
        return False
    devices = set(map(_device_of, ts))
    return (len(devices) == 1 and next(iter(devices)).type != "meta"
            and set(map(_dtype_of, ts)) <= _SUPPORTED
            and set(map(_layout_of, ts)) == {torch.strided})


def _check_value(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return x


def _host_copy_error(name: str, what: str) -> ValueError:
    return ValueError(f"{name} is {what}: it cannot be copied to the GPU during CUDA graph capture "
                      "(each replay would copy one stale host buffer); pass a Python number or a "
                      "tensor on the device")


def _coef(c: Coef, n: int, device: torch.device, name: str) -> Union[float, Tensor]:
    """A coefficient, validated, as the backends take it: a float (one value
    for every tensor; the kernels get it by value, so it needs no memory and
    no fill on the device) or a 1-D float64 tensor of n entries on ``device``."""
    if isinstance(c, Tensor):
        if c.device != device and c.device.type == "cpu" and capturing(device):
            raise _host_copy_error(name, "a CPU tensor")
        if c.dim() > 1 or (c.dim() == 1 and c.numel() != n):
            raise ValueError(f"{name} has shape {tuple(c.shape)}; expected a number or "
                             f"one value per tensor ({n})")
        if not (c.is_floating_point() or c.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} has dtype {c.dtype}; expected a real dtype")
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
        return to_device(c, torch.float64, device).expand(n).contiguous()
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return _check_value(c, name)
    if isinstance(c, (str, bytes)) or not isinstance(c, Iterable):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, "
                        f"got {type(c).__name__}")
    if capturing(device):
        raise _host_copy_error(name, "a sequence of numbers")
    vals = list(c)
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values but there are {n} tensors")
    vals = [_check_value(v, f"{name}[{i}]") for i, v in enumerate(vals)]
    return to_device(vals, torch.float64, device)


def _check_no_overlap(tensors: Sequence[Tensor], what: str) -> None:
    """In-place ops must not write one memory location twice."""
    if torch.compiler.is_compiling():
        return
    bad = _first_overlap(tensors)
    if bad is None:
        return
    a, b = bad
    if a == b:
        raise ValueError(f"{what}[{a}] has overlapping memory (an expanded view?); "
                         "it cannot be updated in place")
    raise ValueError(f"{what}[{a}] and {what}[{b}] share memory; "
                     "an in-place op needs distinct tensors")


def _check_grads_apart(tensors: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """add_penalty_grad_ writes the grads while it reads the tensors: no grad may
    share memory with another grad (or itself), nor with any tensor. Tensors may
    share memory with each other (they are only read). No device sync."""
    if torch.compiler.is_compiling():
        return
    if not _has_dtensor(grads) and not _has_dtensor(tensors) and _disjoint(list(grads) + list(tensors)):
        return  # the common case, at C speed
    _check_no_overlap(grads, "grads")
    bad = _overlap(grads, tensors)
    if bad is not None:
        raise ValueError(f"grads[{bad[0]}] shares memory with tensors[{bad[1]}]; add_penalty_grad_ "
                         "writes the grads while it reads the tensors, so they must be distinct")


def _first_overlap(tensors: Sequence[Tensor]) -> Optional[Tuple[int, int]]:
    """(i, i) for the first tensor whose elements overlap each other, (a, b)
    (a < b) for two tensors whose memory ranges overlap, else None."""
    if _has_dtensor(tensors):  # a DTensor's local shard holds its memory
        tensors = [t.to_local() if isinstance(t, _DTensor) else t for t in tensors]
    if _disjoint(tensors):
        return None
    for i, t in enumerate(tensors):
        if not t.is_contiguous() and _has_internal_overlap(t):
            return i, i
    return _overlap(tensors, tensors)


def _disjoint(tensors: Sequence[Tensor]) -> bool:
    """True if the tensors are contiguous and no two share a byte, decided at C
    speed; False means "not shown" (the exact checks then decide). Each tensor
    is its byte range; sorted by start, ranges are disjoint exactly when each
    ends at or before the next one starts (empty tensors are empty ranges)."""
    if not all(map(Tensor.is_contiguous, tensors)):
        return False
    starts = list(map(Tensor.data_ptr, tensors))
    spans = sorted(zip(starts, map(int.__add__, starts, map(attrgetter("nbytes"), tensors))))
    return all(map(le, map(_end_of, spans), map(_start_of, spans[1:])))



def _overlap(written: Sequence[Tensor], read: Sequence[Tensor]) -> Optional[Tuple[int, int]]:
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
                spans.append((start, start + (n if t.is_contiguous() else _extent(t)) * t.element_size(),
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
    offsets = torch.arange(_extent(t), device="cpu").as_strided(t.shape, t.stride())
    return int(offsets.unique().numel()) < t.numel()


def _extent(t: Tensor) -> int:
    """Elements from t's first to its last element in memory (inclusive)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def weight_stats(tensors: Iterable[Tensor]) -> WeightStats:
    """Per-tensor sum|w|, sqrt(sum w^2), max|w| and count of w != 0, in one pass.

    Returns ``WeightStats(l1, l2, linf, nnz)``: four 1-D tensors on the tensors'
    device with one entry per tensor (float64 if any tensor is float64, else
    float32; nnz is int64).
    """
    ts = _tensor_list(tensors)
    if not ts:
        e = torch.zeros(0)
        return WeightStats(e, e.clone(), e.clone(), torch.zeros(0, dtype=torch.int64))
    if _has_dtensor(ts):
        return _distributed().weight_stats(ts)
    if _plain_eager(ts):
        with torch.no_grad():
            return WeightStats(*_backend(ts).weight_stats(ts))
    return WeightStats(*_weight_stats_op([t.detach() for t in ts]))


def penalty(tensors: Iterable[Tensor], l1: Coef = 0.0, l2: Coef = 0.0) -> Tensor:
    """sum_i l1_i * ||w_i||_1 + l2_i * ||w_i||_2^2 as a 0-dim tensor.

    Differentiable with respect to the tensors: the gradient is
    l1 * sign(w) + 2 * l2 * w, with sign(0) = 0. ``l1`` and ``l2`` are numbers
    (all tensors) or one value per tensor (a sequence or 1-D tensor); they are
    constants for autograd.
    """
    ts = _tensor_list(tensors)
    if not ts:
        _coef(l1, 0, torch.device("cpu"), "l1"), _coef(l2, 0, torch.device("cpu"), "l2")
        return torch.zeros(())
    dev = ts[0].device
    c1, c2 = _coef(l1, len(ts), dev, "l1"), _coef(l2, len(ts), dev, "l2")
    if _plain_eager(ts) and not (torch.is_grad_enabled() and any(map(_requires_grad, ts))):
        return _backend(ts).penalty(ts, c1, c2)
    c1, c2 = coef_tensor(c1, len(ts), dev), coef_tensor(c2, len(ts), dev)
    if _has_dtensor(ts):
        return _distributed().penalty(ts, c1, c2)
    return _penalty_op(ts, c1, c2)


def add_penalty_grad_(tensors: Iterable[Tensor], grads: Iterable[Tensor],
                      l1: Coef = 0.0, l2: Coef = 0.0) -> Tensor:
    """In place, g_i += l1_i * sign(w_i) + 2 * l2_i * w_i for every pair.

    Returns the penalty value (as ``penalty``), computed in the same pass.
    """
    ts = _tensor_list(tensors)
    gs = _tensor_list(grads, "grads")
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
    c1, c2 = _coef(l1, n, dev, "l1"), _coef(l2, n, dev, "l2")
    if not ts:
        return torch.zeros(())
    if _has_dtensor(ts) or _has_dtensor(gs):
        return _distributed().add_penalty_grad_(ts, gs, coef_tensor(c1, n, dev), coef_tensor(c2, n, dev))
    _check_grads_apart(ts, gs)
    with torch.no_grad():
        if _plain_eager(ts, gs):
            out = _backend(ts).add_penalty_grad_(ts, gs, c1, c2)
            _bump_versions(gs)
            return out
        return _add_penalty_grad_op([t.detach() for t in ts], gs, coef_tensor(c1, n, dev),
                                    coef_tensor(c2, n, dev))


def prox_(tensors: Iterable[Tensor], l1: Coef = 0.0, l2: Coef = 0.0, lr: Coef = 1.0) -> Tensor:
    """In place, the proximal step of lr * (l1 * ||w||_1 + l2 * ||w||_2^2):

        w <- sign(w) * max(|w| - lr * l1, 0) / (1 + 2 * lr * l2)

    Weights with |w| <= lr * l1 become exactly 0. Returns the count of nonzeros
    of each tensor after the step (1-D int64), from the same pass.
    """
    ts = _tensor_list(tensors)
    n, dev = len(ts), (ts[0].device if ts else torch.device("cpu"))
    c1, c2, clr = _coef(l1, n, dev, "l1"), _coef(l2, n, dev, "l2"), _coef(lr, n, dev, "lr")
    if not ts:
        return torch.zeros(0, dtype=torch.int64)
    if _has_dtensor(ts):
        return _distributed().prox_(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)))
    _check_no_overlap(ts, "tensors")
    with torch.no_grad():
        if _plain_eager((), ts):
            out = _backend(ts).prox_(ts, c1, c2, clr)
            _bump_versions(ts)
            return out
        return _prox_op(ts, *(coef_tensor(c, n, dev) for c in (c1, c2, clr)))
