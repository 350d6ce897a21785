"""Shared helpers for pyreg's tests: fresh random tensor lists, tolerances,
and the check that a bad param-group value changes nothing."""
from __future__ import annotations

import pytest
import torch

from pyreg._tolerance import TOLERANCES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]

# The one tolerance table (pyreg/_tolerance.py), as the tests use it.
ELEMENTWISE_TOL = TOLERANCES["elementwise"]
REDUCTION_TOL = TOLERANCES["reduction"]
GRAD_TOL = TOLERANCES["grad"]
#: The same sums from two kernels (``penalty``, and the value ``add_penalty_grad_``
#: returns from its own pass): where multiply-adds are contracted (nvcc; the
#: emulator's FMA build) the compiler contracts each kernel's own code, so
#: their per-thread sums (float32 for 16- and 32-bit data) may round
#: differently: 1e-12 to 1e-11 relative over the op tests' mixed lists.
TWO_KERNEL_SUMS = dict(rtol=1e-9, atol=0)


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


def like_list(ts, dtype, seed):
    """Random tensors with the shapes and strides of ts (grads for ts)."""
    from pyreg.backends._marshal import is_dense

    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        x = torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)
        y = (torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device) if is_dense(t)
             else torch.empty(t.shape, dtype=dtype, device=t.device))
        out.append(y.copy_(x))
    return out


def coef_tensors(n, seed, device="cpu"):
    """Three fresh (n,) float64 coefficient tensors on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, generator=g, dtype=torch.float64).to(device) for _ in range(3))


def bits_equal(a, b):
    """Same dtype, shape and bits (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(iv), b.contiguous().view(iv))
    return torch.equal(a, b)


def as_f64(tensors):
    return [t.detach().to(torch.float64) for t in tensors]


def ieee_sqrt(t):
    """The square root correctly rounded, in ``t``'s dtype (numpy's, as the C++
    kernels compute it). torch's own CPU sqrt is not correctly rounded on
    every CPU (an AMD EPYC: about 1 in 6 float32 results and 1 in 80
    float64 ones off by an ulp), so a test that compares a kernel's bits
    with torch ops that take a sqrt gives them this one."""
    import numpy as np

    a = t.detach().cpu().numpy()
    return torch.from_numpy(np.asarray(np.sqrt(a), dtype=a.dtype)).to(t.device)  # (0-dim: an array too)


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


def _gpu_ready() -> bool:
    from pyreg import backends

    return torch.cuda.is_available() and backends.cuda.compiled()


# A GPU torch can use and a build with CUDA kernels, yet no usable cuda backend
# (driver too old for the runtime, no kernel image for this GPU...): that is a
# failure to report (the cuda tests then fail), not a reason to skip.
needs_gpu = pytest.mark.skipif(not _gpu_ready(), reason="no usable CUDA GPU / pyreg built without CUDA")

#: Every backend, with the device of the tensors it takes. Absent ones skip.
BACKEND_PARAMS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("cuda-emu", "cpu"), marks=needs_emu, id="cuda-emu"),
    pytest.param(("cuda", "cuda"), marks=needs_gpu, id="cuda"),
]


@pytest.fixture(params=BACKEND_PARAMS)
def B(request):
    """The backend under test: ``name``, the backend object ``be``, and ``dev``,
    the device of its tensors. Tests run the ops under ``use_backend(B.name)``
    or call ``B.be`` directly."""
    from types import SimpleNamespace

    from pyreg import backends

    name, dev = request.param
    return SimpleNamespace(name=name, be=backends.get(name), dev=dev)


def bad_key_changes_nothing(family: str, good: dict, bad: dict, words: str) -> None:
    """A bad param-group value (``bad``, over the good group ``good``) in
    ``pyreg.Regularized(torch.optim.AdamW)`` (family "Regularized") or
    ``pyreg.optim.AdamW``: refused at construction; and, set after a step,
    refused at the next step with the weights and the optimizer's state as
    they were."""
    import copy

    import pyreg
    from torch import nn

    m = nn.Linear(5, 3)
    make = ((lambda g: pyreg.Regularized(torch.optim.AdamW(g, lr=0.1))) if family == "Regularized"
            else (lambda g: pyreg.optim.AdamW(g, lr=0.1)))
    with pytest.raises((ValueError, TypeError), match=words):
        make([dict(bad, params=list(m.parameters()))])
    opt = make([dict(good, params=list(m.parameters()))])
    m(torch.randn(4, 5)).sum().backward()
    opt.step()
    m(torch.randn(4, 5)).sum().backward()
    weights = copy.deepcopy(m.state_dict())
    state = copy.deepcopy(opt.state_dict()["state"])
    for k in good:
        opt.param_groups[0].pop(k)
    opt.param_groups[0].update(bad)
    with pytest.raises((ValueError, TypeError), match=words):
        opt.step()
    for k, v in m.state_dict().items():
        assert torch.equal(v, weights[k])
    after = opt.state_dict()["state"]
    for i in state:
        for k in state[i]:
            assert torch.equal(torch.as_tensor(after[i][k]), torch.as_tensor(state[i][k]))
