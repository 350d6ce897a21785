"""The ``cuda`` backend: pyreg's compiled CUDA kernels (csrc/cuda/kernels.cu).

Kernels launch on torch's current stream of the tensors' device. Scratch memory
comes from torch's caching allocator. Nothing here synchronizes with the host
or copies from host memory, so these calls can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from .._common import DTYPE_CODES, result_dtype
from .._lib import _C
from . import _marshal as m
from ._marshal import Coef


def compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


_device_errors: Dict[int, str] = {}


def unavailable_reason(device: Optional[int] = None) -> str:
    """Why the kernels cannot run on CUDA device ``device`` (an index; None:
    torch's current device), or "" when they can. The first answer per device
    is kept: it probes every kernel (no kernel image for this GPU's compute
    capability, a driver older than the runtime...) and loads them all."""
    if not compiled():
        return "pyreg was built without CUDA" if _C is not None else "pyreg's compiled module is not loaded"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA"
    index = torch.cuda.current_device() if device is None else device
    err = _device_errors.get(index)
    if err is None:
        err = _device_errors[index] = _C.cuda_device_error(index)
    return err


def available(device: Optional[int] = None) -> bool:
    return not unavailable_reason(device)


def _coef(c: Coef):
    return m.coef(c, "cuda")


def _env(ws: List[Tensor], desc):
    """(workspace tensor, device index, stream handle) for one launch."""
    dev = ws[0].device
    nbytes = _C.cuda_workspace_bytes(len(ws), sum(desc[1]))
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    return workspace, dev.index, stream


def weight_stats(tensors: List[Tensor]):
    ws = m.dense_list(tensors)
    rd = result_dtype(ws)
    dev = ws[0].device
    n = len(ws)
    l1, l2, linf = (torch.empty(n, dtype=rd, device=dev) for _ in range(3))
    nnz = torch.empty(n, dtype=torch.int64, device=dev)
    desc = m.describe(ws)
    scratch, index, stream = _env(ws, desc)
    _C.cuda_weight_stats(*desc, l1.data_ptr(), l2.data_ptr(), linf.data_ptr(), nnz.data_ptr(),
                         DTYPE_CODES[rd], scratch.data_ptr(), index, stream)
    return l1, l2, linf, nnz


def penalty(tensors: List[Tensor], l1: Coef, l2: Coef) -> Tensor:
    ws = m.dense_list(tensors)
    rd = result_dtype(ws)
    out = torch.empty((), dtype=rd, device=ws[0].device)
    desc = m.describe(ws)
    scratch, index, stream = _env(ws, desc)
    _C.cuda_penalty(*desc, _coef(l1), _coef(l2), out.data_ptr(), DTYPE_CODES[rd],
                    scratch.data_ptr(), index, stream)
    return out


def add_penalty_grad_(tensors: List[Tensor], grads: List[Tensor], l1: Coef, l2: Coef) -> Tensor:
    ws, gs = m.paired(tensors, grads)
    rd = result_dtype(ws)
    out = torch.empty((), dtype=rd, device=ws[0].device)
    desc = m.describe(ws)
    scratch, index, stream = _env(ws, desc)
    _C.cuda_add_penalty_grad(*desc, m.pointers(gs.work), _coef(l1), _coef(l2),
                             out.data_ptr(), DTYPE_CODES[rd], scratch.data_ptr(), index, stream)
    gs.commit()
    return out


def prox_(tensors: List[Tensor], l1: Coef, l2: Coef, lr: Coef) -> Tensor:
    ws = m.Writable(tensors)
    nnz = torch.empty(len(tensors), dtype=torch.int64, device=ws.work[0].device)
    desc = m.describe(ws.work)
    scratch, index, stream = _env(ws.work, desc)
    _C.cuda_prox(*desc, _coef(l1), _coef(l2), _coef(lr), nnz.data_ptr(), scratch.data_ptr(),
                 index, stream)
    ws.commit()
    return nnz
