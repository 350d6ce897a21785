"""Shared helpers for pyreg's tests: fresh random tensor lists and tolerances."""
from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]

# Elementwise results: the op's rounding.
ELEMENTWISE_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}
# Reductions report in float64 (fp64 inputs) or float32 (all others).
REDUCTION_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
}


def random_list(dtype, seed=0, device="cpu", scale=1.0, more_layouts=False):
    """A list exercising every layout case: odd sizes 1, 4097, 278011; empty
    tensors at the start, middle and end; a 0-dim tensor; a transposed (dense,
    non-contiguous) matrix and a strided (non-dense) view. Fresh random data,
    made on ``device`` before the views are taken. ``more_layouts`` adds a
    misaligned view (storage offset 1) and a permuted one before the last."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)  # noqa: E731
    ts = [
        r(0),
        r(1),
        r(4097),
        r(0, 7),
        r(278011),
        r(()),
        r(61, 37).t(),             # dense, not contiguous
        r(3, 2 * 333 + 1)[:, ::2],  # not dense: strided view
    ]
    if more_layouts:
        ts += [
            r(70001)[1:],                 # storage offset 1: not 16-byte aligned
            r(5, 6, 7).permute(2, 0, 1),  # dense, permuted
        ]
    return ts + [r(5, 0)]


def as_f64(tensors):
    return [t.detach().to(torch.float64) for t in tensors]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    import pyreg

    return f"pyreg {pyreg.__version__} from {pyreg.__file__}; cpu backend: {pyreg.backend_name('cpu')}"


def _emu_built() -> bool:
    from pyreg import backends

    return backends.cuda_emu.compiled()


#: Tests of the backend "cuda-emu" (the CUDA kernels under the emulator) need a
#: build with PYREG_CUDA_EMU=ON; CI makes one.
needs_emu = pytest.mark.skipif(not _emu_built(),
                               reason="pyreg built without PYREG_CUDA_EMU=ON (no cuda-emu backend)")
