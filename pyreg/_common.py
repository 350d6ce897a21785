"""Small facts shared by the op definitions, every backend and the fake kernels."""
from __future__ import annotations

import functools
import sys
from operator import attrgetter
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor



def _dtensor_class():
    """torch's DTensor class once its module is loaded, else None. A DTensor
    (FSDP2's sharded parameters) exists only after torch.distributed.tensor
    was imported, so pyreg never imports it itself: it costs as much as
    torch's own import."""
    global _DTensor
    dt = _DTensor
    if dt is None:
        dt = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if not torch.compiler.is_compiling():  # (kept only outside a trace: a trace that set it
            _DTensor = dt                      # would fail its own guard, and compile again)
    return dt


_DTensor = None


def outside_graph(fn):
    """``fn`` run eagerly under torch.compile (a clean graph break), without
    importing torch._dynamo before it is needed: while it is not loaded no
    graph is being compiled, and ``fn`` is called directly. It is called
    directly too where no frame is being evaluated by torch.compile (no
    eval-frame callback installed, outside a trace): an eager step, torch's
    optimizers having loaded torch._dynamo, pays no disabling wrapper."""
    disabled = torch._disable_dynamo(fn)  # imports torch._dynamo at its first call

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules or (not torch.compiler.is_compiling() and _no_frame_callback()):
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    return call


def _no_frame_callback() -> bool:
    """Whether torch.compile's frame evaluation is off on this thread (its
    eval-frame callback None or False, as torch's own set_stance tests it);
    False where this torch cannot tell."""
    get = _EVAL_FRAME_CALLBACK
    return get is not None and get() in (None, False)


_EVAL_FRAME_CALLBACK = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None),
                               "get_eval_frame_callback", None)

#: dtypes every backend supports. Codes match csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


class WeightStats(NamedTuple):
    """Per-tensor statistics, one entry per tensor of the list.

    l1: sum |w|; l2: sqrt(sum w^2); linf: max |w| (0 for an empty tensor, NaN if
    any w is NaN); nnz: count of w != 0 (int64; NaN counts as nonzero).
    """

    l1: Tensor
    l2: Tensor
    linf: Tensor
    nnz: Tensor


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """dtype of the floating-point results (norms, penalty): float64 if any input
    is float64, else float32 (16-bit inputs accumulate and report in float32)."""
    return torch.float64 if torch.float64 in set(map(attrgetter("dtype"), tensors)) else torch.float32


def has_dtensor(ts: Sequence[Tensor]) -> bool:
    """True if any of ts is a DTensor (a sharded parameter)."""
    dt = _dtensor_class()
    if dt is None:
        return False
    if torch.compiler.is_compiling():  # Dynamo traces plain loops, not map()
        return any(isinstance(t, dt) for t in ts)
    return any(issubclass(cls, dt) for cls in set(map(type, ts)))


def local_tensors(ts: Sequence[Tensor]) -> list:
    """ts with each DTensor replaced by its local shard (which holds its memory)."""
    dt = _dtensor_class()
    if dt is None:
        return list(ts)
    return [t.to_local() if isinstance(t, dt) else t for t in ts]


def coef_tensor(c: Union[float, Tensor], n: int, device: torch.device) -> Tensor:
    """A validated coefficient (a float for every tensor, or one value per
    tensor) as a 1-D float64 tensor of n entries: the custom ops' form."""
    if not isinstance(c, float):
        return c
    if torch.compiler.is_compiling():  # (a float that Dynamo made symbolic stays a graph input; torch.full
        return torch.ones((n,), dtype=torch.float64, device=device) * c  # would make it a constant again)
    return torch.full((n,), c, dtype=torch.float64, device=device)


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream, for a
    tensor bound for ``device`` (never on other devices or while tracing)."""
    return (device.type == "cuda" and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def to_device(values: Union[Sequence[float], Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host data (numbers, or a tensor) as a tensor of ``dtype`` on ``device``,
    with no host sync: pyreg's one way to move small host data to a GPU.

    A plain copy from pageable memory to a GPU makes the host wait until the
    GPU has finished all the work queued before it (torch synchronizes the
    stream): in a training step that stalls the pipeline. Here the values go
    to pinned memory first (torch's caching host allocator, which keeps the
    buffer until the copy is done) and then copy asynchronously on the current
    stream; the values are read when this is called (into a buffer of pyreg's
    own, so the caller may change them right after). On the CPU, a CPU tensor
    of ``dtype`` comes back as is. A tensor on a GPU moves device to device.
    During CUDA graph capture host data cannot be copied (the graph would keep
    one host buffer and replay stale values): that raises ValueError, and
    callers that take such data from users check earlier, with its name.
    """
    device = torch.device(device)
    if isinstance(values, Tensor):
        host = values.detach()
        if host.device.type != "cpu":
            return host.to(device=device, dtype=dtype)
    else:
        host = None
    if device.type != "cuda" or torch.compiler.is_compiling():
        return (torch.tensor(values, dtype=dtype) if host is None else host.to(dtype)).to(device)
    if capturing(device):
        raise ValueError("pyreg cannot copy host values to the GPU during CUDA graph capture: the "
                         "graph would replay one stale host buffer; create them before capture")
    # Always a fresh pinned buffer: the copy runs later, on the stream, so it
    # must not read the caller's memory (even a tensor that is already pinned
    # and of this dtype), which the caller may change right after this call.
    if host is None:
        pinned = torch.tensor(values, dtype=dtype, pin_memory=True)
    else:
        pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True).copy_(host)
    return pinned.to(device, non_blocking=True)
