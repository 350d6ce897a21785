"""pyreg's backends: implementations of the four ops for one device kind each.

Every backend module exposes the same four functions, taking already validated
arguments (a non-empty list of tensors on one device; each coefficient a
float for every tensor, or a 1-D float64 tensor with one entry per tensor on
the tensors' device):

    weight_stats(tensors) -> (l1, l2, linf, nnz)
    penalty(tensors, l1, l2) -> 0-dim tensor
    add_penalty_grad_(tensors, grads, l1, l2) -> 0-dim tensor
    prox_(tensors, l1, l2, lr) -> 1-D int64 tensor

- ``torch``: pure PyTorch, the specification; runs on any device.
- ``cpu``: the compiled C++ kernels (csrc/cpu).
- ``cuda``: the compiled CUDA kernels (csrc/cuda).
"""
from __future__ import annotations

from types import ModuleType

from . import cpu, cuda, torch_ref

BACKENDS: dict[str, ModuleType] = {"torch": torch_ref, "cpu": cpu, "cuda": cuda}


def get(name: str) -> ModuleType:
    """The backend module called ``name`` ("torch", "cpu" or "cuda")."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
