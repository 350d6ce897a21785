"""The eager hot path reads tensor metadata for whole lists at C speed and only
falls back to per-tensor loops to explain an error. These tests pin down that
each fast check accepts exactly what the exact check accepts (never more), and
that nn.Parameter lists take the fast path (no custom-op dispatch)."""
from __future__ import annotations

import math
import random

import pytest
import torch

import pyreg
from pyreg import _ops, _validate, ops


def _bytes_overlap(ts):
    """Brute force: do two tensors (or one with itself) share a byte?"""
    seen = {}
    for i, t in enumerate(ts):
        n = t.numel()
        if n == 0:
            continue
        esz = t.element_size()
        offs = torch.arange(_validate.extent(t)).as_strided(t.shape, t.stride()).reshape(-1).tolist()
        for o in offs:
            for b in range(esz):
                addr = t.data_ptr() + o * esz + b
                if addr in seen:
                    return True
                seen[addr] = i
    return False


def _random_views(rng: random.Random, buf: torch.Tensor, count: int):
    """Contiguous views of one buffer at random offsets and lengths (empty
    ones included), in random order: some lists overlap, some do not."""
    ts = []
    for _ in range(count):
        start = rng.randrange(buf.numel())
        length = rng.choice([0, 1, 2, rng.randrange(1, 12)])
        ts.append(buf[start:start + length])
    rng.shuffle(ts)
    return ts


@pytest.mark.parametrize("seed", range(300))
def test_disjoint_never_accepts_an_overlap(seed):
    rng = random.Random(seed)
    buf = torch.randn(40, dtype=rng.choice([torch.float32, torch.float16, torch.float64]))
    ts = _random_views(rng, buf, rng.randrange(1, 7))
    fast = _validate.disjoint(ts)
    exact = _bytes_overlap(ts)
    if fast:
        assert not exact
    # "not shown" only for lists the exact check then settles; a list of
    # nonempty views is exactly decided by the fast check
    if all(t.numel() for t in ts):
        assert fast == (not exact)
    # and the public check agrees with the brute force either way
    assert (_validate.first_overlap(ts) is not None) == exact


def test_disjoint_sees_separate_allocations_and_views_across_dtypes():
    a, b = torch.randn(10), torch.randn(10, dtype=torch.float64)
    assert _validate.disjoint([a, b, a[:0]])
    assert not _validate.disjoint([a, a])
    buf = torch.randn(8)
    # a float64 view of 4 float32 elements overlaps the next float32 element
    assert not _validate.disjoint([buf[:4].view(torch.float64)[:2], buf[3:5]])
    assert _validate.disjoint([buf[:4].view(torch.float64)[:2], buf[4:6]])
    assert not _validate.disjoint([buf.view(2, 4).t()])  # not contiguous: not shown


@pytest.mark.parametrize("case", [
    [torch.randn(3), torch.randn(2, dtype=torch.float64)],
    [torch.randn(3), torch.arange(2)],
    [torch.randn(3), torch.randn(2).to_sparse()],
    [torch.randn(3), torch.empty(2, device="meta")],
    [torch.empty(2, device="meta")],
    [torch.randn(3), torch.nn.Parameter(torch.randn(2))],
    [torch.randn(3), 3.0],
    [torch.randn(3, dtype=torch.bfloat16), torch.randn(1, dtype=torch.float16)],
], ids=["mixed-float", "int", "sparse", "meta", "only-meta", "param", "number", "16-bit"])
def test_uniform_accepts_exactly_what_the_loop_accepts(case):
    fast = _validate.uniform(case)
    try:
        _validate.tensor_list(case)
        slow = True
    except (TypeError, ValueError):
        slow = False
    assert fast == slow


@pytest.mark.parametrize("values, ok", [
    ([0.0, 1e-3, 2.0], True),
    ([-0.0, 0.0], True),
    ([1e308, 1e308], True),  # finite values whose float sum overflows
    ([1.0, float("nan")], False),
    ([float("nan"), 1.0], False),
    ([float("nan"), -1.0], False),
    ([1.0, float("inf")], False),
    ([1.0, -1e-300], False),
    ([float("-inf"), float("inf")], False),
])
def test_cpu_coefficient_tensor_check(values, ok):
    c = torch.tensor(values, dtype=torch.float64)
    if ok:
        assert torch.equal(_validate.coefficient(c, len(values), torch.device("cpu"), "l1"), c)
        return
    bad = next(i for i, v in enumerate(values) if not (math.isfinite(v) and v >= 0))
    with pytest.raises(ValueError, match=rf"l1\[{bad}\] must be finite and >= 0"):
        _validate.coefficient(c, len(values), torch.device("cpu"), "l1")


def test_parameters_take_the_eager_path_and_match_the_op(monkeypatch):
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 0, 4097)]
    ref = [p.detach().clone() for p in ps]
    expected = _ops.prox_op(ref, *(torch.full((3,), v, dtype=torch.float64) for v in (0.3, 0.1, 0.5)), [])
    calls = []
    for name in ("prox_op", "weight_stats_op", "add_penalty_grad_op", "penalty_op"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    versions = [p._version for p in ps]
    nnz = pyreg.prox_(ps, 0.3, 0.1, 0.5)
    assert calls == []
    assert torch.equal(nnz, expected)
    for p, r in zip(ps, ref):
        assert torch.equal(p.detach(), r)
    assert all(p._version > v for p, v in zip(ps, versions))  # autograd sees the write
    pyreg.weight_stats(ps)
    grads = [torch.zeros_like(p) for p in ps]
    pyreg.add_penalty_grad_(ps, grads, 0.1, 0.2)
    with torch.no_grad():
        pyreg.penalty(ps, 0.1, 0.2)
    assert calls == []
    pyreg.penalty(ps, 0.1, 0.2)  # requires_grad: the differentiable op
    assert calls == ["penalty_op"]


def test_parameter_saved_for_backward_then_changed_by_prox_is_detected():
    p = torch.nn.Parameter(torch.randn(5))
    loss = (p * p).sum()  # saves p for backward
    pyreg.prox_([p], 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_grads_of_another_shape_but_same_numel_are_rejected():
    w, g = torch.randn(3, 4), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"grads\[0\] is \(4, 3\)"):
        pyreg.add_penalty_grad_([w], [g], 0.1)
    assert torch.equal(g, torch.zeros(4, 3))
