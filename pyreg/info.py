"""``python -m pyreg info``: what this installation of pyreg can do."""
from __future__ import annotations

import platform

import torch

from . import __version__, _lib
from .backends import cpu, cuda


def info() -> dict:
    C = _lib._C
    d = {
        "pyreg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiled module": "loaded" if C is not None else f"missing ({_lib.LOAD_ERROR})",
        "cpu backend": "compiled, usable" if cpu.available() else "not compiled (torch fallback)",
        "cpu isa": C.cpu_isa() if C is not None else "-",
        "threads": torch.get_num_threads(),
    }
    if not cuda.compiled():
        d["cuda backend"] = "not compiled"
    else:
        archs = C.cuda_archs()
        if cuda.available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            d["cuda backend"] = f"compiled ({archs}), usable on {names}"
        else:
            why = "torch has no CUDA" if not torch.cuda.is_available() else C.cuda_runtime_error()
            d["cuda backend"] = f"compiled ({archs}), not usable: {why}"
    return d


def main() -> int:
    for k, v in info().items():
        print(f"{k:>16}: {v}")
    return 0
