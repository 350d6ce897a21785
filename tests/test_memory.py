"""No op allocates memory proportional to the model size.

Measured two ways on the CPU:
- torch's allocator, through ``torch.profiler`` with ``profile_memory=True``:
  every byte any torch op hands out during the call (kernels' outputs,
  coefficient tensors, copies). The compiled ops may allocate only their
  outputs: O(number of tensors).
- the process's peak resident memory (VmHWM after resetting it through
  /proc/self/clear_refs), in a fresh interpreter whose malloc serves every
  block >= 64 KiB with its own mmap: this also sees the C++ kernels' own
  allocations (their per-chunk partial sums).
The float64 ``torch`` backend (the specification) does copy each tensor; it
is checked here as the control that shows the measures see such copies.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pyreg

LIMIT = 64 * 1024  # bytes: O(number of tensors), far below the 50 MB list


def _model_tensors(dtype=torch.float32):
    """About 50 MB in 32 tensors of assorted shapes (dense layouts only)."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1_000_000, generator=g, dtype=dtype) for _ in range(12)]
    ts += [torch.randn(500, 300, generator=g, dtype=dtype) for _ in range(19)]
    ts.append(torch.randn(300, 500, generator=g, dtype=dtype).t())  # transposed: dense, not contiguous
    return ts


def _allocated(fn) -> int:
    """Bytes torch's CPU allocator handed out while fn ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.fixture(scope="module")
def tensors():
    ts = _model_tensors()
    assert sum(t.numel() * t.element_size() for t in ts) > 50e6
    return ts


OPS = {
    "weight_stats": lambda ts, gs: pyreg.weight_stats(ts),
    "penalty": lambda ts, gs: pyreg.penalty(ts, 1e-3, 1e-3),
    "penalty-per-tensor": lambda ts, gs: pyreg.penalty(ts, [1e-3] * len(ts), torch.full((len(ts),), 1e-3)),
    "add_penalty_grad_": lambda ts, gs: pyreg.add_penalty_grad_(ts, gs, 1e-3, 1e-3),
    "prox_": lambda ts, gs: pyreg.prox_(ts, 1e-3, 1e-3, 1e-2),
}


# The group ops on the model's matrices: their outputs and scratch are
# O(number of groups), here a few hundred per tensor.
GROUP_OPS = {
    "group_norms": lambda ws, gs, d: pyreg.group_norms(ws, dim=d),
    "group_penalty": lambda ws, gs, d: pyreg.group_penalty(ws, 1e-3, dim=d),
    "add_group_penalty_grad_": lambda ws, gs, d: pyreg.add_group_penalty_grad_(ws, gs, 1e-3, dim=d),
    "group_prox_": lambda ws, gs, d: pyreg.group_prox_(ws, 1e-3, 1e-2, dim=d, element_l1=1e-4, l2=1e-4),
    "max_norm_": lambda ws, gs, d: pyreg.max_norm_(ws, 10.0, dim=d),
    "prox_-ref": lambda ws, gs, d: pyreg.prox_(ws, 1e-3, 1e-3, 1e-2, ref=gs),
}


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("op", list(GROUP_OPS))
def test_structured_ops_allocate_o_number_of_groups(op, dim, tensors):
    ws = [t for t in tensors if t.dim() == 2]
    gs = [torch.zeros_like(t) for t in ws]
    with pyreg.use_backend("cpu"):
        GROUP_OPS[op](ws, gs, dim)
        used = _allocated(lambda: GROUP_OPS[op](ws, gs, dim))
    assert used < LIMIT, f"{op} allocated {used} bytes for {len(ws)} matrices"


@pytest.mark.parametrize("op", list(OPS))
def test_compiled_ops_allocate_o_number_of_tensors(op, tensors):
    gs = [torch.zeros_like(t) for t in tensors]
    with pyreg.use_backend("cpu"):
        OPS[op](tensors, gs)  # warm up (thread pool, lazy init)
        used = _allocated(lambda: OPS[op](tensors, gs))
    assert used < LIMIT, f"{op} allocated {used} bytes for a 50 MB list"


def test_the_measure_sees_copies(tensors):
    # control: the float64 reference copies every tensor, and a non-dense view
    # is worked on through a dense copy (documented); the measure sees both.
    with pyreg.use_backend("torch"):
        assert _allocated(lambda: pyreg.weight_stats(tensors[:2])) > 16e6
    with pyreg.use_backend("cpu"):
        assert _allocated(lambda: pyreg.prox_([tensors[0][::2]], 1e-3)) >= 2e6


class _NoStep(torch.optim.Optimizer):
    """An inner optimizer that allocates nothing, so the step measures pyreg alone."""

    def __init__(self, params):
        super().__init__(params, dict(lr=1e-2))

    def step(self, closure=None):
        return None


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_regularized_step_allocates_o_number_of_tensors(mode, tensors):
    params = [torch.nn.Parameter(t.detach().clone()) for t in tensors[:16]]
    params += [torch.nn.Parameter(t.detach().clone().double()) for t in tensors[16:]]  # two buckets
    for p in params:
        p.grad = torch.zeros_like(p)
    half = len(params) // 2
    opt = pyreg.Regularized(_NoStep([{"params": params[:half], "l1": 1e-3},
                                     {"params": params[half:], "l1": 1e-4, "l2": 1e-3, "lr": 1e-3}]),
                            l2=1e-4, mode=mode)
    opt.step()  # builds and caches the plan (coefficient tensors: O(number of tensors))
    used = _allocated(opt.step)
    assert used < LIMIT, f"Regularized.step ({mode}) allocated {used} bytes"
    used = _allocated(lambda: (opt.penalty, opt.sparsity()))
    assert used < LIMIT


_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch, pyreg
    sys.path.insert(0, {tests!r})
    from test_memory import _model_tensors

    def vm(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    def peak(fn):
        fn()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = vm("VmRSS:")
        fn()
        return vm("VmHWM:") - before

    ts = _model_tensors()
    gs = [torch.zeros_like(t) for t in ts]
    ws = [t for t in ts if t.dim() == 2]  # the group ops: on the matrices
    with pyreg.use_backend("cpu"):
        print("cpu",
              peak(lambda: pyreg.weight_stats(ts)),
              peak(lambda: pyreg.penalty(ts, 1e-3, 1e-3)),
              peak(lambda: pyreg.add_penalty_grad_(ts, gs, 1e-3, 1e-3)),
              peak(lambda: pyreg.prox_(ts, 1e-3, 1e-3, 1e-2)),
              peak(lambda: pyreg.group_prox_(ws, 1e-3, 1e-2, dim=1)),
              peak(lambda: pyreg.max_norm_(ws, 10.0, dim=0)))
    with pyreg.use_backend("torch"):  # the control
        print("torch", peak(lambda: pyreg.penalty(ts[:2], 1e-3, 1e-3)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_resident_memory_includes_kernel_scratch(tmp_path):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(pyreg.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    code = _RSS_SCRIPT.format(tests=os.path.dirname(__file__))
    # cwd away from the checkout: `python -c` puts the cwd first on sys.path, and the
    # source tree's pyreg/ has no compiled module when the package is installed.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    if r.returncode != 0 and "clear_refs" in r.stderr:  # pragma: no cover - restricted /proc
        pytest.skip("cannot reset the peak RSS here")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in r.stdout.splitlines()}
    assert all(v < 1 << 20 for v in rows["cpu"]), rows        # < 1 MiB each for 50 MB of weights
    assert max(rows["torch"]) > 8 << 20, rows                 # the control: float64 copies show
