"""pyreg's backends: implementations of the ops, each for one kind of device.

Every backend has a ``NAME``, ``why_not(device)`` (why it cannot take tensors
on ``device``, or ""), and the same functions, taking already validated
arguments (a non-empty list of tensors on one device; each coefficient a
float for every tensor, or a 1-D float64 tensor with one entry per tensor on
the tensors' device; ``ref`` None or a list like ``tensors``; ``dims`` one
normalized group dimension per tensor):

    weight_stats(tensors) -> WeightStats(l1, l2, linf, nnz)
    penalty(tensors, l1, l2, ref=None) -> 0-dim tensor
    add_penalty_grad_(tensors, grads, l1, l2, ref=None) -> 0-dim tensor
    prox_(tensors, l1, l2, lr, ref=None) -> 1-D int64 tensor
    group_norms(tensors, dims) -> 1-D tensor (every group's norm, concatenated)
    group_penalty(tensors, dims, group_l1) -> 0-dim tensor
    add_group_penalty_grad_(tensors, grads, dims, group_l1) -> 0-dim tensor
    group_prox_(tensors, dims, l1, group_l1, l2, lr) -> 1-D int64 tensor
    max_norm_(tensors, dims, max_value) -> 1-D int64 tensor

- ``torch`` (torch_ref.py): pure PyTorch, the specification; runs on any device.
- ``cpu``: the compiled C++ kernels (csrc/cpu).
- ``cuda``: the compiled CUDA kernels (csrc/cuda), on GPUs.
- ``cuda-emu``: the same CUDA kernels built against the CUDA emulator
  (csrc/cuda/emu), on CPU tensors: for testing the CUDA code without a GPU.
  Built only with the CMake option ``PYREG_CUDA_EMU=ON``; never chosen
  automatically, only by ``pyreg.use_backend("cuda-emu")``.

The three compiled ones are instances of one class (compiled.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from . import torch_ref
from .compiled import CompiledKernels, cpu_launch, cuda_launch, emulated_cuda_launch

cpu = CompiledKernels("cpu", "cpu", "cpu", cpu_launch)
cuda = CompiledKernels("cuda", "cuda", "cuda", cuda_launch)
cuda_emu = CompiledKernels("cuda-emu", "cuda_emu", "cpu", emulated_cuda_launch)

BACKENDS: dict[str, Any] = {"torch": torch_ref, "cpu": cpu, "cuda": cuda, "cuda-emu": cuda_emu}


def get(name: str):
    """The backend called ``name`` ("torch", "cpu", "cuda" or "cuda-emu")."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None


def compiled_for(device: torch.device) -> Optional[Any]:
    """The compiled backend chosen by default for tensors on ``device``, or None."""
    if device.type == "cpu" and cpu.available():
        return cpu
    if device.type == "cuda" and cuda.available(device.index):
        return cuda
    return None


# --------------------------------------------------------------------------
# The choice: automatic, or forced by use_backend
# --------------------------------------------------------------------------
_forced: Optional[str] = None


def for_tensors(tensors: Sequence[Tensor]):
    """The backend that runs an op on ``tensors`` (a non-empty list on one device)."""
    device = tensors[0].device
    if _forced is None:
        return compiled_for(device) or torch_ref
    be = BACKENDS[_forced]
    why = be.why_not(device)
    if why:
        raise RuntimeError(f"pyreg backend {_forced!r} is forced but cannot run on {device}: {why}")
    return be


def eager_cpu() -> Optional[CompiledKernels]:
    """The ``cpu`` backend when it runs ops on CPU tensors now (available, and
    no other backend forced), else None: the ops' fast path for CPU lists."""
    global _cpu_ok
    if _forced is not None and _forced != "cpu":
        return None
    if _cpu_ok is None:
        _cpu_ok = cpu.available()
    return cpu if _cpu_ok else None


_cpu_ok: Optional[bool] = None  # whether the cpu backend can run (fixed once loaded)


def eager_host() -> Optional[CompiledKernels]:
    """The compiled backend that runs ops on CPU tensors now when the ops
    may call it directly: ``cpu`` (as :func:`eager_cpu`), or ``cuda-emu``
    where it is forced and available; else None."""
    if _forced == "cuda-emu":
        return cuda_emu if cuda_emu.available() else None
    return eager_cpu()


def eager_cuda(index: int) -> Optional[CompiledKernels]:
    """The ``cuda`` backend when it runs ops on GPU ``index`` now (built for
    it and available there, no other backend forced), else None."""
    if _forced is not None and _forced != "cuda":
        return None
    ok = _cuda_ok.get(index)
    if ok is None:
        ok = _cuda_ok[index] = cuda.available(index)
    return cuda if ok else None


_cuda_ok: Dict[int, bool] = {}  # whether the cuda backend can run on each GPU (fixed once asked)


def backend_name(device: Union[str, torch.device]) -> str:
    """Name of the backend the ops use for tensors on ``device`` right now."""
    if _forced is not None:
        return _forced
    be = compiled_for(torch.device(device))
    return "torch" if be is None else be.NAME


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend ("torch", "cpu", "cuda", "cuda-emu") inside a ``with``
    block; ``None`` restores automatic choice."""
    global _forced
    if name is not None:
        get(name)  # validates the name
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
