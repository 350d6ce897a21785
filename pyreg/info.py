"""``python -m pyreg info``: what this installation of pyreg can do."""
from __future__ import annotations

import platform

import torch

from . import __version__, _lib
from .backends import cpu, cuda, cuda_emu


def _launches(be) -> str:
    n = be.param_bytes()
    return (f"kernel arguments up to {n} bytes: one launch per kernel for a model's list" if n > 4096
            else f"kernel arguments up to {n} bytes: a launch per batch of 48-96 tensors")


def info() -> dict:
    C = _lib._C
    d = {
        "pyreg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiled module": "loaded" if C is not None else f"missing ({_lib.LOAD_ERROR})",
        "cpu backend": "compiled, usable" if cpu.available() else "not compiled (torch fallback)",
        "cpu isa": cpu.archs() or "-",
        "threads": torch.get_num_threads(),
    }
    if not cuda.compiled():
        d["cuda backend"] = "not compiled"
    else:
        archs = cuda.archs()
        why = cuda.unavailable_reason(0 if torch.cuda.is_available() else None)
        if why:
            d["cuda backend"] = f"compiled ({archs}), not usable: {why}"
        else:
            d["cuda backend"] = f"compiled ({archs}; {_launches(cuda)})"
            for i in range(torch.cuda.device_count()):
                cc = ".".join(map(str, torch.cuda.get_device_capability(i)))
                why = cuda.unavailable_reason(i)
                d[f"cuda:{i}"] = (f"{torch.cuda.get_device_name(i)} (compute capability {cc}): "
                                  + ("usable" if not why else f"not usable: {why}"))
    if not cuda_emu.compiled():
        d["cuda-emu backend"] = "not compiled (build with PYREG_CUDA_EMU=ON)"
    else:
        why = cuda_emu.unavailable_reason()
        d["cuda-emu backend"] = (f"compiled (the CUDA kernels on the CPU, for tests; {_launches(cuda_emu)})" if not why
                                 else f"compiled, not usable: {why}")
    return d


def main() -> int:
    for k, v in info().items():
        print(f"{k:>16}: {v}")
    return 0
