"""The ``cuda`` and ``cuda-emu`` backends: pyreg's CUDA kernels
(csrc/cuda/kernels.cu), as built by nvcc for GPUs, or as built against the CUDA
emulator (csrc/cuda/emu/, the CMake option ``PYREG_CUDA_EMU=ON``), which runs
the same kernels on the CPU so that they are tested without a GPU.

Both go through this one class: the same marshalling, the same workspace from
torch's allocator, the same calls into pyreg._C (``cuda_*`` or ``cuda_emu_*``).
Only the device they take and the stream differ. On a GPU, kernels launch on
torch's current stream of the tensors' device, and nothing here synchronizes
with the host or copies from host memory, so these calls can be captured in a
CUDA graph. The emulator takes CPU tensors and runs each launch to completion.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .._common import DTYPE_CODES, WeightStats, result_dtype
from .._lib import _C
from . import _marshal as m
from ._marshal import Coef


class CudaKernels:
    """One build of the CUDA kernels as a backend.

    name: the backend's name; prefix: its functions' prefix in pyreg._C;
    device_type: the torch device type of the tensors it takes.
    """

    def __init__(self, name: str, prefix: str, device_type: str):
        self.NAME = name
        self.device_type = device_type
        self._prefix = prefix
        self._device_errors: Dict[int, str] = {}

    def _fn(self, what: str):
        return getattr(_C, f"{self._prefix}_{what}")

    def compiled(self) -> bool:
        return _C is not None and bool(self._fn("compiled")())

    def archs(self) -> str:
        return self._fn("archs")() if self.compiled() else ""

    def _device_index(self, device: Optional[int]) -> int:
        return torch.cuda.current_device() if device is None else device

    def unavailable_reason(self, device: Optional[int] = None) -> str:
        """Why the kernels cannot run on device index ``device`` (None: the
        current one), or "" when they can. The first answer per device is
        kept: it probes every kernel (no kernel image for this GPU's compute
        capability, a driver older than the runtime...) and loads them all."""
        if _C is None:
            return "pyreg's compiled module is not loaded"
        if not self.compiled():
            return self._fn("runtime_error")()
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "torch has no usable CUDA"
        index = self._device_index(device)
        err = self._device_errors.get(index)
        if err is None:
            err = self._device_errors[index] = self._fn("device_error")(index)
        return err

    def available(self, device: Optional[int] = None) -> bool:
        return not self.unavailable_reason(device)

    def why_not(self, device: torch.device) -> str:
        """Why this backend cannot take tensors on ``device``, or "" if it can."""
        if device.type != self.device_type:
            return f"it takes {self.device_type} tensors"
        return self.unavailable_reason(device.index)

    def _launch(self, ws: List[Tensor], desc) -> Tuple[Tensor, int, int]:
        """(workspace tensor, device index, stream handle) for one call."""
        dev = ws[0].device
        nbytes = self._fn("workspace_bytes")(len(ws), sum(desc[1]))
        # 16-byte aligned: torch's allocators return at least that.
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
        return workspace, self._launch_device(dev), self._stream(dev)

    def _launch_device(self, dev: torch.device) -> int:
        return dev.index

    def _stream(self, dev: torch.device) -> int:
        return torch.cuda.current_stream(dev).cuda_stream

    # ---- the four ops ------------------------------------------------------------
    def weight_stats(self, tensors: List[Tensor]) -> WeightStats:
        ws = m.dense_list(tensors)
        rd = result_dtype(ws)
        dev = ws[0].device
        n = len(ws)
        l1, l2, linf = (torch.empty(n, dtype=rd, device=dev) for _ in range(3))
        nnz = torch.empty(n, dtype=torch.int64, device=dev)
        desc = m.describe(ws)
        scratch, index, stream = self._launch(ws, desc)
        self._fn("weight_stats")(*desc, l1.data_ptr(), l2.data_ptr(), linf.data_ptr(),
                                 nnz.data_ptr(), DTYPE_CODES[rd], scratch.data_ptr(), index, stream)
        return WeightStats(l1, l2, linf, nnz)

    def penalty(self, tensors: List[Tensor], l1: Coef, l2: Coef) -> Tensor:
        ws = m.dense_list(tensors)
        rd = result_dtype(ws)
        dev = ws[0].device
        out = torch.empty((), dtype=rd, device=dev)
        desc = m.describe(ws)
        scratch, index, stream = self._launch(ws, desc)
        self._fn("penalty")(*desc, m.coef(l1, dev, len(tensors)), m.coef(l2, dev, len(tensors)), out.data_ptr(),
                            DTYPE_CODES[rd], scratch.data_ptr(), index, stream)
        return out

    def add_penalty_grad_(self, tensors: List[Tensor], grads: List[Tensor], l1: Coef,
                          l2: Coef) -> Tensor:
        ws, gs = m.paired(tensors, grads)
        rd = result_dtype(ws)
        dev = ws[0].device
        out = torch.empty((), dtype=rd, device=dev)
        desc = m.describe(ws)
        scratch, index, stream = self._launch(ws, desc)
        self._fn("add_penalty_grad")(*desc, m.pointers(gs.work), m.coef(l1, dev, len(tensors)), m.coef(l2, dev, len(tensors)),
                                     out.data_ptr(), DTYPE_CODES[rd], scratch.data_ptr(), index,
                                     stream)
        gs.commit()
        return out

    def prox_(self, tensors: List[Tensor], l1: Coef, l2: Coef, lr: Coef) -> Tensor:
        ws = m.Writable(tensors)
        dev = ws.work[0].device
        nnz = torch.empty(len(tensors), dtype=torch.int64, device=dev)
        desc = m.describe(ws.work)
        scratch, index, stream = self._launch(ws.work, desc)
        self._fn("prox")(*desc, *(m.coef(c, dev, len(tensors)) for c in (l1, l2, lr)), nnz.data_ptr(),
                         scratch.data_ptr(), index, stream)
        ws.commit()
        return nnz


class EmulatedCudaKernels(CudaKernels):
    """The CUDA kernels under the emulator: CPU tensors, emulated device 0, and
    no stream (each launch completes before the call returns)."""

    def _device_index(self, device: Optional[int]) -> int:
        return 0

    def _launch_device(self, dev: torch.device) -> int:
        return 0

    def _stream(self, dev: torch.device) -> int:
        return 0


GPU = CudaKernels("cuda", "cuda", "cuda")
EMULATED = EmulatedCudaKernels("cuda-emu", "cuda_emu", "cpu")
