"""Property tests (hypothesis): the laws the ops obey for any input, checked on
the compiled CPU kernels (and on the float64 torch reference where the law is
exact there too), for float32 and float64."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyreg
from pyreg.backends import torch_ref

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _values(width):
    return st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=width)


@st.composite
def tensor_lists(draw, dtype, max_tensors=4, max_size=40):
    width = 32 if dtype == torch.float32 else 64
    # zeros and values near a threshold show up often enough to matter
    elems = st.one_of(_values(width), st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0]))
    lists = draw(st.lists(st.lists(elems, max_size=max_size), min_size=1, max_size=max_tensors))
    return [torch.tensor(v, dtype=dtype) for v in lists]


coefs = st.floats(0.0, 2.0, allow_subnormal=False)


def _cpu(fn, *args, **kwargs):
    with pyreg.use_backend("cpu"):
        return fn(*args, **kwargs)


def _clone(ts):
    return [t.clone() for t in ts]


# --------------------------------------------------------------------------
# prox_
# --------------------------------------------------------------------------
@DTYPES
@SETTINGS
@given(data=st.data(), lr=coefs)
def test_prox_with_zero_coefficients_is_identity(dtype, data, lr):
    ts = data.draw(tensor_lists(dtype))
    before = _clone(ts)
    for backend in ("cpu", "torch"):
        with pyreg.use_backend(backend):
            nnz = pyreg.prox_(ts, l1=0.0, l2=0.0, lr=lr)
        for t, b in zip(ts, before):
            assert torch.equal(t, b)
        assert nnz.tolist() == [int(torch.count_nonzero(b)) for b in before]


@DTYPES
@SETTINGS
@given(data=st.data(), l1=coefs, l2=coefs, lr=coefs)
def test_prox_shrinks_keeps_sign_and_zeroes_exactly_below_threshold(dtype, data, l1, l2, lr):
    ts = data.draw(tensor_lists(dtype))
    t = lr * l1
    for backend in ("cpu", "torch"):
        out = _clone(ts)
        with pyreg.use_backend(backend):
            nnz = pyreg.prox_(out, l1=l1, l2=l2, lr=lr)
        for x, y in zip(ts, out):
            assert bool((y.abs() <= x.abs()).all())
            assert bool(((y == 0) | (torch.sign(y) == torch.sign(x))).all())
            # exactly 0 iff |x| <= lr * l1 (compared exactly, in float64)
            assert torch.equal(y == 0, x.double().abs() <= t)
        assert nnz.tolist() == [int(torch.count_nonzero(y)) for y in out]
        if backend == "cpu":
            cpu = out
    ref = [x.double() for x in ts]
    c = lambda v: torch.full((len(ts),), v, dtype=torch.float64)  # noqa: E731
    torch_ref.prox_(ref, c(l1), c(l2), c(lr))
    for y, r in zip(cpu, ref):
        torch.testing.assert_close(y, r.to(dtype), **TOL[dtype])


@DTYPES
@SETTINGS
@given(data=st.data(), alpha=st.floats(0.0, 2.0), lr=coefs)
def test_elastic_net_endpoints_are_pure_l1_and_pure_l2(dtype, data, alpha, lr):
    ts = data.draw(tensor_lists(dtype))
    x64 = [t.double() for t in ts]
    l1, l2 = pyreg.from_sklearn(alpha, 1.0)      # Lasso
    assert (l1, l2) == (alpha, 0.0)
    out = _clone(ts)
    _cpu(pyreg.prox_, out, l1, l2, lr)
    t = lr * alpha
    for y, x in zip(out, x64):  # soft thresholding
        torch.testing.assert_close(y, (torch.sign(x) * (x.abs() - t).clamp_min(0)).to(dtype), **TOL[dtype])
    l1, l2 = pyreg.from_sklearn(alpha, 0.0)      # ridge
    assert (l1, l2) == (0.0, alpha / 2)
    out = _clone(ts)
    _cpu(pyreg.prox_, out, l1, l2, lr)
    for y, x in zip(out, x64):  # pure scaling
        torch.testing.assert_close(y, (x / (1 + lr * alpha)).to(dtype), **TOL[dtype])
    # and the penalties
    n1 = sum(float(x.abs().sum()) for x in x64)
    n2 = sum(float(x.square().sum()) for x in x64)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert math.isclose(_cpu(pyreg.penalty, ts, *pyreg.from_sklearn(alpha, 1.0)).item(), alpha * n1,
                        rel_tol=tol, abs_tol=tol)
    assert math.isclose(_cpu(pyreg.penalty, ts, *pyreg.from_sklearn(alpha, 0.0)).item(), alpha / 2 * n2,
                        rel_tol=tol, abs_tol=tol)


# --------------------------------------------------------------------------
# Norms and penalty
# --------------------------------------------------------------------------
def _normal_or_zero(x: torch.Tensor) -> bool:
    """Whether 0-dim ``x`` is 0 or a normal number of its dtype (its bits then scale exactly by 2^k)."""
    return bool(x == 0) or bool(x.abs() >= torch.finfo(x.dtype).tiny)


@DTYPES
@SETTINGS
@given(data=st.data(), k=st.integers(-10, 10), negative=st.booleans(), c=st.floats(0.01, 100.0))
def test_norms_are_homogeneous(dtype, data, k, negative, c):
    ts = data.draw(tensor_lists(dtype))
    # Exact scaling needs every square to be a normal float64: below ~1.5e-154
    # w*w is subnormal and loses bits (in the float64 spec too), so such
    # values (found by Hypothesis: 1.29e-157) are out of this property's domain.
    ts = [torch.where(t.abs() < 1e-150, torch.zeros_like(t), t) for t in ts]
    s = (-1.0 if negative else 1.0) * 2.0**k
    base = _cpu(pyreg.weight_stats, ts)
    # a power of two scales every rounding step exactly: bitwise equal
    scaled = _cpu(pyreg.weight_stats, [t * s for t in ts])
    for f in ("l1", "l2", "linf"):
        assert torch.equal(getattr(scaled, f), getattr(base, f) * abs(s))
    assert torch.equal(scaled.nnz, base.nnz)
    # The penalty is stored in the inputs' dtype: where a result is subnormal there
    # (found by Hypothesis: 0.3 * 1.18e-38 in float32), it keeps fewer bits, and
    # scaling is no longer exact; such results are out of this property's domain.
    for (l1, l2), f in (((0.3, 0.0), abs(s)), ((0.0, 0.3), s * s)):
        a, b = _cpu(pyreg.penalty, [t * s for t in ts], l1, l2), _cpu(pyreg.penalty, ts, l1, l2)
        if _normal_or_zero(a) and _normal_or_zero(b):
            assert torch.equal(a, b * f)
    # any other factor: up to rounding
    other = _cpu(pyreg.weight_stats, [t * c for t in ts])
    for f in ("l1", "l2", "linf"):
        torch.testing.assert_close(getattr(other, f), getattr(base, f) * c, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6)


@DTYPES
@SETTINGS
@given(data=st.data(), l1=coefs, l2=coefs)
def test_add_penalty_grad_equals_autograd_of_penalty(dtype, data, l1, l2):
    ts = data.draw(tensor_lists(dtype))
    n = len(ts)
    per1 = data.draw(st.lists(coefs, min_size=n, max_size=n))  # per-tensor l1 as well
    for c1 in (l1, per1):
        xs = [t.clone().requires_grad_(True) for t in ts]
        pen = _cpu(pyreg.penalty, xs, c1, l2)
        auto = torch.autograd.grad(pen, xs, allow_unused=True)
        gs = [torch.zeros_like(t) for t in ts]
        value = _cpu(pyreg.add_penalty_grad_, ts, gs, c1, l2)
        assert torch.equal(value, pen.detach())
        for g, a in zip(gs, auto):
            assert torch.equal(g, a)
        # and both equal autograd of the formula in float64 (sign(0) = 0)
        x64 = [t.double().requires_grad_(True) for t in ts]
        cs = c1 if isinstance(c1, list) else [c1] * n
        formula = sum(ci * x.abs().sum() + l2 * x.square().sum() for ci, x in zip(cs, x64))
        ref = torch.autograd.grad(formula, x64, allow_unused=True)
        for g, r, x in zip(gs, ref, x64):
            r = torch.zeros_like(x) if r is None else r
            torch.testing.assert_close(g, r.to(dtype), **TOL[dtype])


# --------------------------------------------------------------------------
# Thread-count invariance (the lists must be big enough to use several threads)
# --------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@DTYPES
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       l1=coefs, l2=coefs, lr=coefs)
def test_results_identical_for_any_thread_count(restore_threads, dtype, sizes, seed, l1, l2, lr):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=g, dtype=dtype) for n in sizes + [140_000]]  # > 2 chunks in all
    grads = [torch.randn_like(t) for t in ts]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        with pyreg.use_backend("cpu"):
            st_ = pyreg.weight_stats(ts)
            pen = pyreg.penalty(ts, l1, l2)
            gs = _clone(grads)
            val = pyreg.add_penalty_grad_(ts, gs, l1, l2)
            ws = _clone(ts)
            nnz = pyreg.prox_(ws, l1, l2, lr)
        results.append((list(st_), pen, gs, val, ws, nnz))
    flat = [torch.utils._pytree.tree_leaves(r) for r in results]
    for other in flat[1:]:
        for a, b in zip(flat[0], other):
            assert torch.equal(a, b)
