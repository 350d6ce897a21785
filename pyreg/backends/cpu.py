"""The ``cpu`` backend: pyreg's compiled C++ kernels (csrc/cpu/kernels.cpp).

One call to pyreg._C per op covers the whole list. The kernels run on pyreg's
own thread pool, sized by ``torch.get_num_threads()``, with the GIL released.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .._common import DTYPE_CODES, WeightStats, result_dtype
from .._lib import LOAD_ERROR, _C
from . import _marshal as m
from ._marshal import Coef


NAME = "cpu"


def available() -> bool:
    return _C is not None


def why_not(device: torch.device) -> str:
    """Why this backend cannot take tensors on ``device``, or "" if it can."""
    if device.type != "cpu":
        return "it takes cpu tensors"
    return "" if available() else f"pyreg's compiled module is not loaded ({LOAD_ERROR})"


_CPU = torch.device("cpu")


def _coef(c: Coef, n: int):
    return m.coef(c, _CPU, n)


def weight_stats(tensors: List[Tensor]):
    ws = m.dense_list(tensors)
    rd = result_dtype(ws)
    n = len(ws)
    l1, l2, linf = (torch.empty(n, dtype=rd) for _ in range(3))
    nnz = torch.empty(n, dtype=torch.int64)
    _C.cpu_weight_stats(*m.describe(ws), l1.data_ptr(), l2.data_ptr(), linf.data_ptr(),
                        nnz.data_ptr(), DTYPE_CODES[rd], torch.get_num_threads())
    return WeightStats(l1, l2, linf, nnz)


def penalty(tensors: List[Tensor], l1: Coef, l2: Coef) -> Tensor:
    ws = m.dense_list(tensors)
    rd = result_dtype(ws)
    out = torch.empty((), dtype=rd)
    _C.cpu_penalty(*m.describe(ws), _coef(l1, len(ws)), _coef(l2, len(ws)), out.data_ptr(), DTYPE_CODES[rd],
                   torch.get_num_threads())
    return out


def add_penalty_grad_(tensors: List[Tensor], grads: List[Tensor], l1: Coef, l2: Coef) -> Tensor:
    ws, gs = m.paired(tensors, grads)
    rd = result_dtype(ws)
    out = torch.empty((), dtype=rd)
    _C.cpu_add_penalty_grad(*m.describe(ws), m.pointers(gs.work), _coef(l1, len(ws)), _coef(l2, len(ws)),
                            out.data_ptr(), DTYPE_CODES[rd], torch.get_num_threads())
    gs.commit()
    return out


def prox_(tensors: List[Tensor], l1: Coef, l2: Coef, lr: Coef) -> Tensor:
    ws = m.Writable(tensors)
    nnz = torch.empty(len(tensors), dtype=torch.int64)
    _C.cpu_prox(*m.describe(ws.work), _coef(l1, len(ws.work)), _coef(l2, len(ws.work)), _coef(lr, len(ws.work)), nnz.data_ptr(),
                torch.get_num_threads())
    ws.commit()
    return nnz
