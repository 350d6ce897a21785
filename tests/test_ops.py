"""The four fused ops against the float64 reference, on every backend and dtype."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

import pyreg
from pyreg import backends
from pyreg.backends import torch_ref

from pyreg._tolerance import TOLERANCES

from conftest import (BACKEND_PARAMS, bits_equal, coef_tensors, like_list, DTYPE_IDS, DTYPES, ELEMENTWISE_TOL, GRAD_TOL, REDUCTION_TOL, TWO_KERNEL_SUMS,
                      as_f64, needs_emu, random_list)

# The op matrix runs on every backend (the fixture B: torch, cpu, cuda-emu,
# cuda; absent ones skip), against the float64 spec and the CPU kernels.
# A coefficient as a number (all tensors), a list, or a tensor (one per tensor).
KINDS = ["number", "list", "tensor"]


def test_cpu_backend_is_compiled():
    # The foundation ships compiled CPU kernels: never pass by falling back.
    assert backends.cpu.available(), pyreg._lib.LOAD_ERROR
    assert pyreg.backend_name("cpu") == "cpu"


def test_info_reports_compiled_cpu(tmp_path):
    # From a neutral directory: the installed pyreg, not the source tree.
    out = subprocess.run([sys.executable, "-m", "pyreg", "info"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    assert "cpu backend: compiled, usable" in out
    assert f"torch: {torch.__version__}" in out
    assert "threads:" in out and "cuda backend:" in out
    be = backends.get("cuda-emu")
    emu = (f"compiled (the CUDA kernels on the CPU, for tests; kernel arguments up to {be.param_bytes()} bytes"
           if be.compiled() else "not compiled (build with PYREG_CUDA_EMU=ON)")
    assert f"cuda-emu backend: {emu}" in out
    assert be.param_bytes() in ((4096, 32764) if be.compiled() else (0,))


def coefs(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "number":
        return 0.37, 0.11, 0.7
    l1, l2, lr = (torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "list":
        return l1.tolist(), l2.tolist(), lr.tolist()
    return l1, l2, lr


def as_tensor(c, n):
    if isinstance(c, torch.Tensor):
        return c
    if isinstance(c, list):
        return torch.tensor(c, dtype=torch.float64)
    return torch.full((n,), float(c), dtype=torch.float64)


def coef_on(c, n, dev):
    """A coefficient as the ops take it, on the backend's device (tensors moved)."""
    return c.to(dev) if isinstance(c, torch.Tensor) else c


def to_cpu(ts):
    return [t.detach().to("cpu", copy=True) for t in ts]  # always a copy


def rdtype(ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32








def elem_tol(B, dtype):
    # CUDA kernels on a GPU may fuse a multiply and an add (nvcc's default)
    return TOLERANCES["elementwise_fma" if B.name == "cuda" else "elementwise"][dtype]


EMPTY = (0, 3, 10)  # indices of the empty tensors in random_list(..., more_layouts=True)


# --------------------------------------------------------------------------- weight_stats
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_stats(B, dtype):
    # Every layout (storage offset 1 included) against the float64 spec and the CPU kernels.
    ts = random_list(dtype, seed=1, device=B.dev, more_layouts=True)
    with pyreg.use_backend(B.name):
        st = pyreg.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    cpu = backends.cpu.weight_stats(to_cpu(ts))
    rd = rdtype(ts)
    assert isinstance(st, pyreg.WeightStats)
    for got, want, c in zip(st[:3], ref[:3], cpu[:3]):
        assert got.dtype == rd and got.shape == (len(ts),) and got.device.type == B.dev
        torch.testing.assert_close(got.cpu(), want.cpu().to(rd), **REDUCTION_TOL[dtype])
        torch.testing.assert_close(got.cpu(), c, **REDUCTION_TOL[dtype])
    assert st.nnz.dtype == torch.int64
    assert torch.equal(st.nnz.cpu(), ref.nnz.cpu()) and torch.equal(st.nnz.cpu(), cpu.nnz)
    assert torch.equal(st.linf.cpu(), ref.linf.cpu().to(rd))  # a max of exactly converted values
    for i in EMPTY:  # empty tensors report zeros
        assert st.l1[i] == 0 and st.l2[i] == 0 and st.linf[i] == 0 and st.nnz[i] == 0


def test_weight_stats_nan_inf_and_zeros(B):
    x = torch.tensor([0.0, -0.0, 1.0, float("nan"), -3.0], device=B.dev)
    y = torch.tensor([0.0, float("-inf"), 2.0], device=B.dev)
    z = torch.zeros(70000, device=B.dev)
    z[12345] = -5.0
    st = B.be.weight_stats([x, y, z])
    assert torch.isnan(st[0][0]) and torch.isnan(st[1][0]) and torch.isnan(st[2][0])
    assert st[0][1] == float("inf") and st[2][1] == float("inf")
    assert st[2][2] == 5.0 and st[0][2] == 5.0 and st[1][2] == 5.0
    assert st[3].tolist() == [3, 2, 1]  # NaN counts as nonzero, -0.0 does not


# --------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_penalty(B, dtype, kind):
    ts = random_list(dtype, seed=2, device=B.dev, more_layouts=True)
    n = len(ts)
    l1, l2, _ = coefs(kind, n, 3)
    with pyreg.use_backend(B.name):
        got = pyreg.penalty(ts, coef_on(l1, n, B.dev), coef_on(l2, n, B.dev))
    L1, L2 = as_tensor(l1, n), as_tensor(l2, n)
    want = torch_ref.penalty(as_f64(to_cpu(ts)), L1, L2)
    cpu = backends.cpu.penalty(to_cpu(ts), L1, L2)
    assert got.shape == () and got.dtype == rdtype(ts) and got.device.type == B.dev
    torch.testing.assert_close(got.cpu(), want.to(got.dtype), **REDUCTION_TOL[dtype])
    torch.testing.assert_close(got.cpu(), cpu, **REDUCTION_TOL[dtype])


def test_penalty_big_fp32_norm_is_accurate(B):
    g = torch.Generator(device=B.dev).manual_seed(0)
    x = torch.randn(30_000_000, device=B.dev, generator=g) * 3 + 1
    l1 = torch.tensor([0.5], dtype=torch.float64, device=B.dev)
    l2 = torch.tensor([0.25], dtype=torch.float64, device=B.dev)
    got = B.be.penalty([x], l1, l2)
    want = torch_ref.penalty([x.double()], l1, l2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    st = B.be.weight_stats([x])
    xd = x.double()
    torch.testing.assert_close(st[0][0].double(), xd.abs().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(st[1][0].double(), xd.square().sum().sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_penalty_backward(B, dtype):
    ts = [t.requires_grad_() for t in random_list(dtype, seed=4, device=B.dev)]
    l1, l2, _ = coefs("tensor", len(ts), 5)
    with pyreg.use_backend(B.name):
        (3.0 * pyreg.penalty(ts, l1.to(B.dev), l2.to(B.dev))).backward()
    for i, t in enumerate(ts):
        x = t.detach().double().cpu()
        want = 3.0 * (l1[i] * torch.sign(x) + 2 * l2[i] * x)
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        torch.testing.assert_close(t.grad.double().cpu(), want.to(dtype).double(), **elem_tol(B, dtype))


def test_penalty_gradcheck(B):
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(7, generator=g, dtype=torch.float64).to(B.dev).requires_grad_(),
          torch.randn(3, 4, generator=g, dtype=torch.float64).to(B.dev).t().requires_grad_(),
          torch.randn((), generator=g, dtype=torch.float64).to(B.dev).requires_grad_()]
    l1 = torch.tensor([0.3, 0.0, 1.2], dtype=torch.float64, device=B.dev)
    with pyreg.use_backend(B.name):
        assert torch.autograd.gradcheck(lambda *w: pyreg.penalty(list(w), l1, 0.25), ts)


@pytest.mark.parametrize("op", ["penalty", "group_penalty"])
def test_penalty_grad_is_not_differentiated_again_silently(B, op):
    """A penalty's grad comes from its kernel: with create_graph=True it is the right first derivative,
    and a second derivative through it raises (it silently left the penalty's term out)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).to(B.dev).requires_grad_()
    with pyreg.use_backend(B.name):
        pen = pyreg.penalty([w], 0.3, 0.5) if op == "penalty" else pyreg.group_penalty([w], 0.3, dim=1)
        (grad,) = torch.autograd.grad((w ** 3).sum() + pen, w, create_graph=True)
    x = w.detach()
    want = 3 * x ** 2 + (0.3 * torch.sign(x) + x if op == "penalty" else 0.3 * x / x.norm(dim=0))
    torch.testing.assert_close(grad.detach(), want)
    with pytest.raises(RuntimeError, match=f"pyreg.{op}'s gradient is computed by its kernel"):
        torch.autograd.grad(grad.sum(), w)
    with pyreg.use_backend(B.name):  # first order only: no change
        pyreg.penalty([w], 0.3, 0.5).backward()
    torch.testing.assert_close(w.grad, 0.3 * torch.sign(x) + x)


# --------------------------------------------------------------------------- add_penalty_grad_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_add_penalty_grad(B, dtype, kind):
    ts = random_list(dtype, seed=7, device=B.dev, more_layouts=True)
    gs = like_list(ts, dtype, seed=8)
    n = len(ts)
    l1, l2, _ = coefs(kind, n, 9)
    L1, L2 = as_tensor(l1, n), as_tensor(l2, n)
    want_g = [g.double().cpu() + (L1[i] * torch.sign(w.double().cpu()) + 2 * L2[i] * w.double().cpu())
              for i, (w, g) in enumerate(zip(ts, gs))]
    want_v = torch_ref.penalty(as_f64(to_cpu(ts)), L1, L2)
    cpu_ts, cpu_gs = to_cpu(ts), to_cpu(gs)
    cpu_v = backends.cpu.add_penalty_grad_(cpu_ts, cpu_gs, L1, L2)
    before = [w.clone() for w in ts]
    with pyreg.use_backend(B.name):
        v = pyreg.add_penalty_grad_(ts, gs, coef_on(l1, n, B.dev), coef_on(l2, n, B.dev))
    assert v.shape == () and v.dtype == rdtype(ts)
    torch.testing.assert_close(v.cpu(), want_v.to(v.dtype), **REDUCTION_TOL[dtype])
    torch.testing.assert_close(v.cpu(), cpu_v, **REDUCTION_TOL[dtype])
    for g, wg, cg in zip(gs, want_g, cpu_gs):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), wg.to(dtype).double(), **GRAD_TOL[dtype])
        torch.testing.assert_close(g.cpu(), cg, **GRAD_TOL[dtype])
    for w, b in zip(ts, before):  # weights are read, never written
        assert torch.equal(w, b)


def test_sign_of_zero_is_zero(B):
    w = torch.tensor([0.0, -0.0, 1.5, -2.0, 0.0], device=B.dev)
    g = torch.full_like(w, 0.25)
    with pyreg.use_backend(B.name):
        pyreg.add_penalty_grad_([w], [g], l1=1.0)
    assert g.tolist() == [0.25, 0.25, 1.25, -0.75, 0.25]
    wr = w.clone().requires_grad_()
    with pyreg.use_backend(B.name):
        pyreg.penalty([wr], l1=1.0).backward()
    assert wr.grad.tolist() == [0.0, 0.0, 1.0, -1.0, 0.0]
    # -0.0 weight and grad: the same bits as the float64 spec
    w, g = torch.tensor([-0.0, 0.0, -0.0]), torch.tensor([-0.0, -0.0, 0.0])
    ref_g, got = g.clone(), g.to(B.dev)
    one = torch.ones(1, dtype=torch.float64)
    B.be.add_penalty_grad_([w.to(B.dev)], [got], one.to(B.dev), one.to(B.dev))
    torch_ref.add_penalty_grad_([w], [ref_g], one, one)
    assert bits_equal(got.cpu(), ref_g), (got, ref_g)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_grads_and_weights(B, dtype):
    # weights aligned, grads at storage offset 1 (and the reverse): scalar paths
    n = 300_001
    g0 = torch.Generator().manual_seed(40)
    r = lambda k: torch.randn(k, generator=g0, dtype=torch.float64).to(dtype).to(B.dev)  # noqa: E731
    w_al, w_mis, g_mis, g_al = r(n), r(n + 1)[1:], r(n + 1)[1:], r(n)
    ts, gs = [w_al, w_mis], [g_mis, g_al]
    l1, l2, _ = (c.to(B.dev) for c in coefs("tensor", 2, 41))
    want_g = [g.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
              for i, (w, g) in enumerate(zip(ts, gs))]
    v = B.be.add_penalty_grad_(ts, gs, l1, l2)
    torch.testing.assert_close(v.double(), torch_ref.penalty(as_f64(ts), l1, l2), **REDUCTION_TOL[dtype])
    for g, wg in zip(gs, want_g):
        torch.testing.assert_close(g.double(), wg.to(dtype).double(), **GRAD_TOL[dtype])


# --------------------------------------------------------------------------- prox_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_prox(B, dtype, kind):
    ts = random_list(dtype, seed=10, device=B.dev, more_layouts=True)
    n = len(ts)
    l1, l2, lr = coefs(kind, n, 11)
    L1, L2, LR = as_tensor(l1, n), as_tensor(l2, n), as_tensor(lr, n)
    want = as_f64(to_cpu(ts))
    torch_ref.prox_(want, L1, L2, LR)  # float64 spec
    want = [w.to(dtype) for w in want]  # rounded once to the dtype
    cpu_ts = to_cpu(ts)
    cpu_nnz = backends.cpu.prox_(cpu_ts, L1, L2, LR)
    bases = [t._base for t in ts]
    with pyreg.use_backend(B.name):
        nnz = pyreg.prox_(ts, *(coef_on(c, n, B.dev) for c in (l1, l2, lr)))
    assert nnz.dtype == torch.int64 and nnz.shape == (n,) and nnz.device.type == B.dev
    zeros = 0
    for i, (w, ww, cw) in enumerate(zip(ts, want, cpu_ts)):
        assert w.dtype == dtype
        assert torch.equal((w == 0).cpu(), ww == 0), f"zero pattern differs from the spec in tensor {i}"
        assert torch.equal((w == 0).cpu(), cw == 0), f"zero pattern differs from cpu in tensor {i}"
        torch.testing.assert_close(w.double().cpu(), ww.double(), **elem_tol(B, dtype))
        torch.testing.assert_close(w.cpu(), cw, **elem_tol(B, dtype))
        assert nnz[i] == torch.count_nonzero(w)
        zeros += int((w == 0).sum())
    assert torch.equal(nnz.cpu(), cpu_nnz)
    assert zeros > 50_000  # the threshold really cut: the test is not vacuous
    # views were updated through to their bases
    assert bases[7] is not None and torch.equal(bases[7][:, ::2], ts[7])


def test_prox_threshold_boundary_and_specials(B):
    # |w| == lr*l1 exactly -> 0; just above stays nonzero; NaN and inf propagate.
    t = 0.5
    w = torch.tensor([0.5, -0.5, 0.5000001, -0.4999999, float("nan"), float("inf"), -float("inf"), 0.0],
                     device=B.dev)
    with pyreg.use_backend(B.name):
        nnz = pyreg.prox_([w], l1=t, lr=1.0)
    assert w[0] == 0 and w[1] == 0 and w[3] == 0 and w[7] == 0
    assert 0 < w[2] < 1e-6
    assert torch.isnan(w[4]) and w[5] == float("inf") and w[6] == -float("inf")
    assert int(nnz[0]) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_prox_threshold_not_representable(B, dtype):
    # t = lr*l1 between two representable values: |w| <= t in float64 decides.
    t = 0.1  # not representable in any of these dtypes
    vals = torch.tensor([0.1], dtype=torch.float64).to(dtype)
    lo = torch.nextafter(vals, torch.tensor([0.0]).to(dtype)) if dtype == torch.float32 else vals
    x = torch.cat([vals, -vals, lo, torch.linspace(0.05, 0.15, 5001, dtype=torch.float64).to(dtype)]).to(B.dev)
    ref = x.double()
    c = lambda v: torch.tensor([v], dtype=torch.float64, device=B.dev)  # noqa: E731
    torch_ref.prox_([ref], c(t), c(0.0), c(1.0))
    B.be.prox_([x], c(t), c(0.0), c(1.0))
    assert torch.equal(x == 0, ref.to(dtype) == 0)


def test_zero_dim_tensor():
    w = torch.tensor(-3.0)
    st = pyreg.weight_stats([w])
    assert st.l1.tolist() == [3.0] and st.linf.tolist() == [3.0] and st.nnz.tolist() == [1]
    pyreg.prox_([w], l1=1.0, lr=1.0)
    assert w.item() == -2.0 and w.shape == ()


@pytest.mark.parametrize("op", ["weight_stats", "penalty", "add_penalty_grad_", "prox_"])
def test_noncontiguous_equals_contiguous(op):
    base = torch.randn(301, 203, dtype=torch.float32)
    views = {"transposed": base.t(), "strided": base[:, ::3], "expanded_rows": base[::2]}
    for name, v in views.items():
        c = v.contiguous()
        if op == "weight_stats":
            a, b = pyreg.weight_stats([v]), pyreg.weight_stats([c])
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=name)
        elif op == "penalty":
            torch.testing.assert_close(pyreg.penalty([v], 0.3, 0.2), pyreg.penalty([c], 0.3, 0.2), rtol=1e-6, atol=0)
        elif op == "add_penalty_grad_":
            gv = torch.randn(v.shape)
            gc = gv.clone()
            pyreg.add_penalty_grad_([v], [gv], 0.3, 0.2)
            pyreg.add_penalty_grad_([c], [gc], 0.3, 0.2)
            assert torch.equal(gv, gc), name
        else:
            vv = v.clone() if name == "transposed" else v
            pyreg.prox_([vv], 0.5, 0.1, 0.9)
            pyreg.prox_([c], 0.5, 0.1, 0.9)
            assert torch.equal(vv, c), name


def _neg(t):
    """A view with torch's negative bit whose values are ``t``'s (its memory holds -t)."""
    v = torch._neg_view(t.neg().clone())
    assert v.is_neg() and v.is_contiguous() and torch.equal(v, t)
    return v


def test_views_with_the_negative_bit_are_read_as_their_values(B):
    """A contiguous view with the negative bit (torch._neg_view; the
    imaginary part of a conjugated complex tensor of one element) holds the
    negated values in memory: every op, on tensors, grads, refs and
    coefficients of that kind, gives what it gives on the same values in
    ordinary tensors, and writes through the view."""
    g = torch.Generator().manual_seed(3)
    plain = [torch.randn(5, generator=g).to(B.dev), torch.randn(4, 3, generator=g).to(B.dev),
             torch.randn(1, generator=g).to(B.dev)]
    grads = [torch.randn(t.shape, generator=g).to(B.dev) for t in plain]
    refs = [torch.randn(t.shape, generator=g).to(B.dev) for t in plain]
    c = torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64, device=B.dev)
    z = torch.randn(1, dtype=torch.complex64, generator=g).to(B.dev).conj().imag
    assert z.is_neg() and z.is_contiguous()  # the public way to one
    negs = [_neg(plain[0]), plain[1], _neg(plain[2])]
    neg_grads = [grads[0], _neg(grads[1]), _neg(grads[2])]
    with pyreg.use_backend(B.name):
        for a, b in zip(pyreg.weight_stats(negs + [z]), pyreg.weight_stats(plain + [z.resolve_neg()])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        for ts in (negs, plain):  # (ordinary tensors: the CPU fast path takes the coefficient)
            torch.testing.assert_close(pyreg.penalty(ts, _neg(c), 0.1), pyreg.penalty(plain, c, 0.1),
                                       rtol=1e-6, atol=0)
        gn, gp = [_neg(x) if x.is_neg() else x.clone() for x in neg_grads], [x.clone() for x in grads]
        pyreg.add_penalty_grad_(negs, gn, 0.3, 0.2)
        pyreg.add_penalty_grad_(plain, gp, 0.3, 0.2)
        assert all(torch.equal(x, y) for x, y in zip(gn, gp))
        for kw in (dict(l1=0.3, l2=0.1), dict(l1=_neg(c), l2=0.1), dict(l1=0.3, ref=[_neg(r) for r in refs])):
            wn, wp = [_neg(t) for t in plain], [t.clone() for t in plain]
            pyreg.prox_(wn, lr=2.0, **kw)
            kp = dict(kw, l1=c) if isinstance(kw["l1"], torch.Tensor) else dict(kw)
            if "ref" in kw:
                kp["ref"] = refs
            pyreg.prox_(wp, lr=2.0, **kp)
            assert all(torch.equal(x, y) for x, y in zip(wn, wp)), kw
            pinned = [x == r for x, r in zip(wp, refs)] if "ref" in kw else [x == 0 for x in wp]
            assert any(bool(m.any()) for m in pinned)  # the threshold cut
        gn, gp = [_neg(x) for x in grads[1:2]], [x.clone() for x in grads[1:2]]
        pyreg.add_group_penalty_grad_([_neg(plain[1])], gn, 0.3, dim=1)
        pyreg.add_group_penalty_grad_([plain[1]], gp, 0.3, dim=1)
        assert torch.equal(gn[0], gp[0])


@pytest.mark.parametrize("op", ["weight_stats", "penalty", "add_penalty_grad_", "prox_"])
def test_deterministic_across_thread_counts(op, restore_threads):
    # Several chunks per tensor, mixed dtypes: results must be bitwise equal
    # whatever the thread count (and from run to run).
    def run(threads):
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(12)
        ts = [torch.randn(n, generator=g).to(dt) for n, dt in
              [(300_001, torch.float32), (70_000, torch.bfloat16), (131_073, torch.float16), (5, torch.float32)]]
        gs = [torch.randn(t.shape, generator=g).to(t.dtype) for t in ts]
        l1 = [0.5, 0.1, 0.3, 0.2]
        if op == "weight_stats":
            return list(pyreg.weight_stats(ts))
        if op == "penalty":
            return [pyreg.penalty(ts, l1, 0.05)]
        if op == "add_penalty_grad_":
            return [pyreg.add_penalty_grad_(ts, gs, l1, 0.05), *gs]
        return [pyreg.prox_(ts, l1, 0.05, 0.9), *ts]

    first = run(1)
    for threads in (2, 3, 1):
        for a, b in zip(first, run(threads)):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                                                      b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8))


def test_coefficient_forms_agree():
    ts = random_list(torch.float32, seed=13)
    n = len(ts)
    forms = [0.25, [0.25] * n, tuple([0.25] * n), torch.full((n,), 0.25), torch.tensor(0.25), torch.full((n,), 0.25, dtype=torch.float16)]
    vals = [pyreg.penalty(ts, l1=f, l2=f) for f in forms]
    for v in vals[1:]:
        assert torch.equal(v, vals[0])


def test_mixed_dtypes_in_one_call():
    ts = [torch.randn(100, dtype=dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    st = pyreg.weight_stats(ts)
    assert st.l1.dtype == torch.float32
    ref = torch_ref.weight_stats(as_f64(ts))
    torch.testing.assert_close(st.l1, ref.l1.float(), rtol=1e-5, atol=1e-5)
    st64 = pyreg.weight_stats(ts + [torch.randn(3, dtype=torch.float64)])
    assert st64.l1.dtype == torch.float64


def test_norm_of_1e8_ones():
    # pytorch#65815: a norm of 1e8 ones was once computed as 4096.
    x = torch.ones(100_000_000)
    with pyreg.use_backend("cpu"):
        st = pyreg.weight_stats([x])
    assert abs(st.l2.item() - 1e4) <= 1e-6 * 1e4
    assert st.l1.item() == 1e8 and st.nnz.item() == 100_000_000


def test_more_than_2_31_elements():
    # 64-bit indexing: a bf16 tensor of 2^31 + 1 elements (4 GiB).
    n = 2**31 + 1
    try:
        x = torch.ones(n, dtype=torch.bfloat16)
    except RuntimeError as e:  # pragma: no cover - machine without 4 GiB to spare
        pytest.skip(f"cannot allocate 4 GiB: {e}")
    x[-1] = 2.0
    with pyreg.use_backend("cpu"):  # the compiled kernel: the float64 reference would need 16 GiB
        st = pyreg.weight_stats([x, torch.zeros(1, dtype=torch.float64)])  # float64 results
    assert st.l1[0].item() == n + 1
    assert st.nnz[0].item() == n
    assert st.linf[0].item() == 2.0
    del x


def test_kernel_coefficients_are_checked_before_any_kernel_reads_them():
    # The ops hand the kernels a float or a contiguous (n,) float64 tensor on the
    # tensors' device; anything else is refused with an error (never an assert,
    # which python -O removes) before a kernel could read past it.
    from pyreg.backends import _marshal as m
    cpu = torch.device("cpu")
    assert m.coef(0.5, cpu, 3) == (0, 0.5)
    c = torch.zeros(3, dtype=torch.float64)
    assert m.coef(c, cpu, 3) == (c.data_ptr(), 0.0)
    for bad in (torch.zeros(3), torch.zeros(2, dtype=torch.float64),
                torch.zeros(6, dtype=torch.float64)[::2], torch.zeros(3, dtype=torch.float64, device="meta")):
        with pytest.raises(ValueError, match="a coefficient for the kernels must be"):
            m.coef(bad, cpu, 3)


def test_use_backend_forces_and_validates():
    calls = []
    orig = backends.torch_ref.weight_stats
    try:
        backends.torch_ref.weight_stats = lambda ts: (calls.append(1), orig(ts))[1]
        with pyreg.use_backend("torch"):
            assert pyreg.backend_name("cpu") == "torch"
            pyreg.weight_stats([torch.randn(3)])
        assert calls == [1]
        pyreg.weight_stats([torch.randn(3)])  # automatic choice: compiled cpu
        assert calls == [1]
    finally:
        backends.torch_ref.weight_stats = orig
    with pytest.raises(ValueError, match="unknown backend"):
        with pyreg.use_backend("tpu"):
            pass
    with pyreg.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run on cpu: it takes cuda tensors"):
            pyreg.weight_stats([torch.randn(3)])


# --------------------------------------------------------------------------- torch.library
def _opcheck_cases(dev="cpu"):
    ts = random_list(torch.float32, seed=14, device=dev)[1:8]
    n = len(ts)
    c = torch.rand(n, dtype=torch.float64).to(dev)
    gs = [torch.randn_like(t) for t in ts]
    return [
        (torch.ops.pyreg.weight_stats.default, (ts,)),
        (torch.ops.pyreg.penalty.default, ([t.clone().requires_grad_() for t in ts], c, c, [])),
        (torch.ops.pyreg.add_penalty_grad_.default, (ts, gs, c, c, [])),
        (torch.ops.pyreg.prox_.default, ([t.clone() for t in ts], c, c, c, [])),
    ]


@pytest.mark.parametrize("case", range(4), ids=["weight_stats", "penalty", "add_penalty_grad_", "prox_"])
def test_opcheck(B, case):
    op, args = _opcheck_cases(B.dev)[case]
    with pyreg.use_backend(B.name):
        torch.library.opcheck(op, args)


def test_torch_compile_matches_eager():
    def step(ws, gs):
        v = pyreg.add_penalty_grad_(ws, gs, 0.01, 0.02)
        for w, g in zip(ws, gs):
            w.sub_(0.1 * g)
        nnz = pyreg.prox_(ws, 0.3, 0.0, 0.5)
        return v + pyreg.penalty(ws, 0.01, 0.02), nnz

    def data():
        g = torch.Generator().manual_seed(15)
        ws = [torch.randn(37, 5, generator=g), torch.randn(11, generator=g)]
        return ws, [torch.randn(w.shape, generator=g) for w in ws]

    we, ge = data()
    wc, gc = data()
    ve, ne = step(we, ge)
    vc, nc = torch.compile(step, backend="aot_eager", fullgraph=True)(wc, gc)
    torch.testing.assert_close(vc, ve)
    assert torch.equal(nc, ne)
    for a, b in zip(wc, we):
        assert torch.equal(a, b)


_COEF_OPS = {
    "prox_": lambda ws, c: pyreg.prox_(ws, l1=0.5, lr=c),
    "penalty": lambda ws, c: pyreg.penalty(ws, l2=c),
    "group_prox_": lambda ws, c: pyreg.group_prox_(ws, l1=c),
    "max_norm_": lambda ws, c: pyreg.max_norm_(ws, c),
    "add_penalty_grad_": lambda ws, c: pyreg.add_penalty_grad_(ws, [w * 2 for w in ws], l1=c),
    "prox_ list": lambda ws, c: pyreg.prox_(ws, l1=[c, c]),
}


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("name", list(_COEF_OPS))
def test_a_float_coefficient_that_changes_between_compiled_calls(name, dynamic):
    """Dynamo makes a float that changes between calls (an lr from a scheduler) a symbolic input of
    the graph: the coefficient checks trace on it, every call equals eager, and with AOTAutograd's
    backend (inductor's front end) too, new values compile nothing after the second graph (the
    op's coefficient tensor was made with torch.full, which made the float a constant again: one
    graph per value, and fullgraph=True failed at torch's recompile limit)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    op = _COEF_OPS[name]
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        count = CompileCounterWithBackend(backend)
        compiled = torch.compile(op, backend=count, fullgraph=True, dynamic=dynamic)
        for c in (0.1, 0.05, 0.7, 0.35, 0.2, 0.9, 0.45, 0.6, 0.15, 0.25):
            g = torch.Generator().manual_seed(17)
            we, wc = [torch.randn(9, 4, generator=g), torch.randn(3, 5, generator=g)], None
            wc = [w.clone() for w in we]
            assert torch.equal(compiled(wc, c), op(we, c)), (backend, c)
            assert all(torch.equal(a, b) for a, b in zip(wc, we)), (backend, c)
        assert count.frame_count <= 2, (backend, count.frame_count)


def test_the_first_compiled_call_of_an_op_compiles_once():
    """In a fresh process (torch.distributed.tensor loaded by Dynamo's import,
    after pyreg's), a compiled function that calls an op compiles once for
    the same inputs (pyreg cached torch's DTensor class during the first
    trace, which failed that trace's own guard: every first graph compiled twice)."""
    code = (
        "import torch, pyreg\n"
        "from torch._dynamo.testing import CompileCounterWithBackend\n"
        "ws, l1 = [torch.randn(4, 3), torch.randn(5)], torch.tensor(0.1)\n"
        "count = CompileCounterWithBackend('aot_eager')\n"
        "f = torch.compile(lambda ws, l1: pyreg.penalty(ws, l1=l1), backend=count, fullgraph=True)\n"
        "for _ in range(3):\n"
        "    f(ws, l1)\n"
        "print(count.frame_count)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "1", r.stdout


def test_jit_trace_records_the_ops():
    """torch.jit.trace records pyreg's custom ops (the eager fast path, which writes through data
    pointers that the tracer cannot see, is not taken while tracing)."""
    g = torch.Generator().manual_seed(18)
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, generator=g)
    with warnings.catch_warnings():  # (TracerWarning: the coefficients are traced as constants)
        warnings.simplefilter("ignore")
        pen = torch.jit.trace(lambda x, y: pyreg.penalty([x, y], l1=0.3, l2=0.2), (a, b))
        prox = torch.jit.trace(lambda x, y: pyreg.prox_([x, y], l1=0.3), (a.clone(), b.clone()))
        l1 = torch.jit.trace(lambda x: pyreg.weight_stats([x]).l1, (a,))
    assert "pyreg::penalty" in str(pen.graph) and "pyreg::prox_" in str(prox.graph)
    assert torch.equal(pen(a * 3, b), pyreg.penalty([a * 3, b], l1=0.3, l2=0.2))
    x, y, xe, ye = a.clone(), b.clone(), a.clone(), b.clone()
    assert torch.equal(prox(x, y), pyreg.prox_([xe, ye], l1=0.3)) and torch.equal(x, xe) and torch.equal(y, ye)
    assert not torch.equal(x, a)
    assert torch.equal(l1(a * 10), pyreg.weight_stats([a * 10]).l1)


def test_in_place_ops_under_fake_tensors_and_make_fx():
    """Fake tensors have no memory to compare: the in-place ops do not call two of them one memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        a, b = torch.randn(3, 4), torch.randn(5)
        assert pyreg.prox_([a, b], l1=0.1).shape == (2,)
        pyreg.max_norm_([a], 1.0)

    def step(x, y):
        pyreg.prox_([x, y], l1=0.1)
        return x, y

    for mode in ("real", "fake", "symbolic"):
        gm = make_fx(step, tracing_mode=mode)(torch.randn(3, 4), torch.randn(5))
        assert any("pyreg.prox_" in str(n.target) for n in gm.graph.nodes), mode


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # (torch.func's own use)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_forward_mode_ad_is_refused(backend):
    """The ops compute no tangent: a tensor that carries one is refused (it would be dropped)."""
    import torch.autograd.forward_ad as fwad

    w, v = torch.randn(4, 3), torch.randn(4, 3)
    with pyreg.use_backend(backend):
        with fwad.dual_level():
            d = fwad.make_dual(w, v)
            for op in (lambda: pyreg.penalty([d], l1=0.1, l2=0.2), lambda: pyreg.weight_stats([d]),
                       lambda: pyreg.group_penalty([d], l1=0.1)):
                with pytest.raises(NotImplementedError, match="forward-mode AD tangent"):
                    op()
            assert torch.equal(pyreg.penalty([w], l1=0.1), pyreg.penalty([w.clone()], l1=0.1))  # no tangent: fine
        with pytest.raises(NotImplementedError, match="forward-mode AD tangent"):
            torch.func.jvp(lambda x: pyreg.penalty([x], l2=0.5), (w,), (v,))


@pytest.mark.parametrize("name", ["prox_", "max_norm_", "group_prox_", "add_penalty_grad_"])
def test_in_place_ops_refuse_a_tensor_that_autograd_records(name):
    """A result of ops on a tensor that requires grad, written in grad mode: pyreg's in-place op is
    not recorded, so the gradient through it would be wrong (prox_ of 2a would still give 2 where it
    zeroed an element): refused, nothing changed. A leaf (a parameter), or any tensor under no_grad,
    is written."""
    ops = {"prox_": lambda ts: pyreg.prox_(ts, l1=0.5), "max_norm_": lambda ts: pyreg.max_norm_(ts, 0.5),
           "group_prox_": lambda ts: pyreg.group_prox_(ts, l1=0.5),
           "add_penalty_grad_": lambda ts: pyreg.add_penalty_grad_([t.detach().clone() for t in ts], ts, l1=0.5)}
    a = torch.randn(4, 3, requires_grad=True)
    c = a * 2
    before = c.detach().clone()
    for contiguous in (True, False):  # (the fast path and the general one)
        t = c if contiguous else c.t()
        with pytest.raises(ValueError, match=r"\[0\] is the result of ops that autograd records"):
            ops[name]([t])
        assert torch.equal(c.detach(), before)
    leaf = torch.randn(4, 3, requires_grad=True)
    ops[name]([leaf])
    with torch.no_grad():
        ops[name]([c])


# --------------------------------------------------------------------------- conventions
def test_from_sklearn_matches_elasticnet_objective():
    g = torch.Generator().manual_seed(16)
    X, y, w = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    alpha, r = 0.3, 0.7
    sk = ((y - X @ w) ** 2).sum() / (2 * 50) + alpha * r * w.abs().sum() + 0.5 * alpha * (1 - r) * (w ** 2).sum()
    l1, l2 = pyreg.from_sklearn(alpha, r)
    ours = 0.5 * ((X @ w - y) ** 2).mean() + pyreg.penalty([w], l1, l2)
    torch.testing.assert_close(ours, sk)
    assert pyreg.from_sklearn(0.5) == (0.5, 0.0)  # Lasso
    with pytest.raises(ValueError, match="l1_ratio"):
        pyreg.from_sklearn(0.1, 1.5)


def test_from_weight_decay_matches_torch_sgd():
    w0 = torch.randn(20, dtype=torch.float64)
    g = torch.randn(20, dtype=torch.float64)
    a = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([a], lr=0.1, weight_decay=0.05)
    a.grad = g.clone()
    opt.step()
    b = w0.clone()
    gb = g.clone()
    pyreg.add_penalty_grad_([b], [gb], l2=pyreg.from_weight_decay(0.05))
    b -= 0.1 * gb
    torch.testing.assert_close(a.detach(), b)
    with pytest.raises(ValueError, match="weight_decay"):
        pyreg.from_weight_decay(-1)


# --------------------------------------------------------------------------- bad input (basics; test_errors.py has the full matrix)
def test_bad_input_is_rejected_and_changes_nothing():
    w = [torch.randn(10), torch.randn(5)]
    g = [torch.randn(10), torch.randn(5)]
    before_w, before_g = [x.clone() for x in w], [x.clone() for x in g]
    with pytest.raises(ValueError, match="l1 must be finite and >= 0"):
        pyreg.prox_(w, l1=-1.0)
    with pytest.raises(ValueError, match=r"lr\[1\] must be finite"):
        pyreg.prox_(w, l1=0.1, lr=[0.1, float("nan")])
    with pytest.raises(ValueError, match="l2 has 3 values but there are 2 tensors"):
        pyreg.add_penalty_grad_(w, g, l2=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"got 2 tensors but 1 grads"):
        pyreg.add_penalty_grad_(w, g[:1], l1=0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] is \(4,\)"):
        pyreg.add_penalty_grad_(w, [g[0], torch.randn(4)], l1=0.1)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        pyreg.prox_([w[0], torch.arange(3)], l1=0.1)
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        pyreg.prox_([w[0], w[0][2:]], l1=0.1)
    with pytest.raises(ValueError, match="overlapping memory"):
        pyreg.prox_([torch.randn(1).expand(4)], l1=0.1)
    with pytest.raises(TypeError, match="iterable of tensors"):
        pyreg.weight_stats(3)
    for a, b in zip(w + g, before_w + before_g):
        assert torch.equal(a, b)


def test_eager_fast_path_equals_the_op_and_bumps_versions():
    """In plain eager mode the public functions call the backend directly; the
    result must equal the custom op's bit for bit, and in-place writes must
    still bump version counters so autograd catches a modified saved tensor."""
    ts = random_list(torch.float32, seed=11)
    gs = random_list(torch.float32, seed=12)
    n = len(ts)
    c = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    nnz_fast = pyreg.prox_(a, l1=0.3, l2=0.1, lr=0.5)
    nnz_op = torch.ops.pyreg.prox_(b, c(0.3), c(0.1), c(0.5), [])
    assert torch.equal(nnz_fast, nnz_op)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g1, g2 = [g.clone() for g in gs], [g.clone() for g in gs]
    v_fast = pyreg.add_penalty_grad_(ts, g1, l1=0.2, l2=0.05)
    v_op = torch.ops.pyreg.add_penalty_grad_(ts, g2, c(0.2), c(0.05), [])
    assert torch.equal(v_fast, v_op) and all(torch.equal(x, y) for x, y in zip(g1, g2))
    assert all(torch.equal(x, y) for x, y in zip(pyreg.weight_stats(ts), torch.ops.pyreg.weight_stats(ts)))
    assert torch.equal(pyreg.penalty(ts, 0.2, 0.05), torch.ops.pyreg.penalty(ts, c(0.2), c(0.05), []))

    w = torch.randn(64, requires_grad=True)
    h = w * 1.5                      # saved by the square below
    loss = h.square().sum()
    version = h._version
    g = torch.zeros(64)
    pyreg.add_penalty_grad_([torch.randn(64)], [g], l1=0.1)
    with torch.no_grad():  # (in grad mode, writing a tensor autograd records is refused)
        pyreg.prox_([h], l1=0.1)
    assert h._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# Param and grad in different memory orders: the kernels pair element k of the
# param's memory with element k of the grad's, so the grad must be laid out like
# the param (regression: a contiguous grad of a transposed param got the
# transposed param's terms).
def _layouts(shape, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)
    n, c, h, w = shape
    return {
        "contiguous": r(n, c, h, w),
        "channels_last": r(n, c, h, w).contiguous(memory_format=torch.channels_last),
        "permuted": r(w, h, c, n).permute(3, 2, 1, 0),
        "not_dense": r(n, c, h, 2 * w - 1)[..., ::2],
        "storage_offset": r(n * c * h * w + 1)[1:].view(n, c, h, w),
    }


@pytest.mark.parametrize("backend", ["cpu", "cuda", pytest.param("cuda-emu", marks=needs_emu)])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last", "permuted", "not_dense", "storage_offset"])
@pytest.mark.parametrize("g_layout", ["contiguous", "channels_last", "permuted", "not_dense", "storage_offset"])
def test_grad_layout_differs_from_param(backend, w_layout, g_layout):
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda" and not (torch.cuda.is_available() and backends.get("cuda").available()):
        pytest.skip("no usable CUDA GPU / pyreg built without CUDA")
    shape = (3, 5, 7, 11)
    w = _layouts(shape, 1)[w_layout].to(device)
    g = _layouts(shape, 2)[g_layout].to(device)
    w0, g0, stride = w.clone(), g.clone(), g.stride()
    want = g0.double() + 0.3 * torch.sign(w0.double()) + 2 * 0.2 * w0.double()
    with pyreg.use_backend(backend):
        pyreg.add_penalty_grad_([w], [g], l1=0.3, l2=0.2)
    torch.testing.assert_close(g.double(), want, **ELEMENTWISE_TOL[torch.float32])
    assert g.stride() == stride and torch.equal(w, w0)


# --------------------------------------------------------------------------- launches, chunks, determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitwise_deterministic(B, dtype):
    ts = random_list(dtype, 20, B.dev, more_layouts=True) + [torch.randn(5_000_001, device=B.dev).to(dtype)]
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 21, B.dev)
    a = B.be.weight_stats(ts)
    b = B.be.weight_stats(ts)
    assert all(bits_equal(x, y) for x, y in zip(a, b))
    assert bits_equal(B.be.penalty(ts, l1, l2), B.be.penalty(ts, l1, l2))
    g0 = like_list(ts, dtype, seed=22)
    ga, gb = [g.clone() for g in g0], [g.clone() for g in g0]
    va = B.be.add_penalty_grad_(ts, ga, l1, l2)
    vb = B.be.add_penalty_grad_(ts, gb, l1, l2)
    assert bits_equal(va, vb) and all(bits_equal(x, y) for x, y in zip(ga, gb))
    wa, wb = [t.clone() for t in ts], [t.clone() for t in ts]
    na, nb = B.be.prox_(wa, l1, l2, lr), B.be.prox_(wb, l1, l2, lr)
    assert torch.equal(na, nb) and all(bits_equal(x, y) for x, y in zip(wa, wb))


def test_many_tensors_mixed_dtypes_and_sizes(B):
    # > 3000 tensors: several launches of by-value metadata, plus a couple of
    # multi-chunk tensors and empty tensors scattered between full ones.
    g = torch.Generator().manual_seed(50)
    sizes = torch.randint(0, 300, (3100,), generator=g).tolist()
    for i in range(0, 3100, 7):
        sizes[i] = 0
    sizes[119], sizes[120], sizes[1777] = 200_003, 65_536, 131_073
    dts = [DTYPES[i % 4] for i in range(len(sizes))]
    ts = [(torch.randn(s, generator=g, dtype=torch.float64)).to(d).to(B.dev) for s, d in zip(sizes, dts)]
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 51, B.dev)
    st = B.be.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    assert st[0].dtype == torch.float64  # some tensors are float64
    for got, want in zip(st[:3], ref[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(st[3], ref[3])
    v = B.be.penalty(ts, l1, l2)
    torch.testing.assert_close(v, torch_ref.penalty(as_f64(ts), l1, l2), rtol=1e-5, atol=1e-5)
    gs = [torch.randn(s, generator=g, dtype=torch.float64).to(d).to(B.dev) for s, d in zip(sizes, dts)]
    gw = [gg.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
          for i, (w, gg) in enumerate(zip(ts, gs))]
    gv = B.be.add_penalty_grad_(ts, gs, l1, l2)
    torch.testing.assert_close(gv, v, **TWO_KERNEL_SUMS)
    for gg, want, d in zip(gs, gw, dts):
        torch.testing.assert_close(gg.double(), want.to(d).double(), **GRAD_TOL[d])
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    nnz = B.be.prox_(ts, l1, l2, lr)
    for i, (w, ww) in enumerate(zip(ts, want)):
        assert torch.equal(w == 0, ww.to(w.dtype) == 0), f"tensor {i}"
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in ts]))


@pytest.mark.parametrize("B", [p for p in BACKEND_PARAMS if p.id in ("cuda-emu", "cuda")], indirect=True)
def test_launches_per_op_for_a_model(B):
    # 300 tensors (GPT-2 has 148, ResNet-50 161). With CUDA 12.1's large
    # kernel parameters (32764 bytes) the whole list goes to one launch per
    # kernel: 2 for an element-wise op (its chunks, then the per-tensor
    # fold), 2 for group_norms, 4 for group_prox_ / max_norm_ (norm partials,
    # factors, scale, fold), 1 for an optimizer step. With 4 KB parameters
    # (PYREG_CUDA_SMALL_PARAMS) each kernel runs once per batch of 96
    # (element-wise) or 48 tensors.
    from pyreg import _C

    prefix = B.name.replace("-", "_")
    count = getattr(_C, f"{prefix}_launch_count")
    large = getattr(_C, f"{prefix}_param_bytes")() > 4096
    n = 300
    g = torch.Generator().manual_seed(70)
    ts = [torch.randn(int(s), generator=g).to(B.dev) for s in torch.randint(1, 5000, (n,), generator=g)]
    ms = [torch.randn(int(r), 23, generator=g).to(B.dev) for r in torch.randint(1, 40, (n,), generator=g)]
    ps = [torch.nn.Parameter(t.clone()) for t in ts]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(B.dev)
    elem, group = (1, 1) if large else (-(-n // 96), -(-n // 48))
    ops = {
        "weight_stats": (lambda: pyreg.weight_stats(ts), elem + 1),
        "penalty": (lambda: pyreg.penalty(ts, 0.1, 0.2), elem + 1),
        "add_penalty_grad_": (lambda: pyreg.add_penalty_grad_(ts, [p.grad for p in ps], 0.1, 0.2), elem + 1),
        "prox_": (lambda: pyreg.prox_(ts, 0.1, 0.2, 0.01), elem + 1),
        "group_norms": (lambda: pyreg.group_norms(ms, dim=1), 2 * group),
        "group_prox_": (lambda: pyreg.group_prox_(ms, l1=0.1, lr=0.1, dim=1), 3 * group + 1),
        "max_norm_": (lambda: pyreg.max_norm_(ms, 1.0, dim=0), 3 * group + 1),
    }
    with pyreg.use_backend(B.name):
        got = {}
        for name, (fn, _) in ops.items():
            before = count()
            fn()
            got[name] = count() - before
        for cls in (pyreg.optim.SGD, pyreg.optim.AdamW, pyreg.optim.Adagrad, pyreg.optim.RMSprop):
            opt = cls([{"params": ps, "l1": 1e-3}], lr=1e-3)
            opt.step()  # the first step also sets up the state
            before = count()
            opt.step()
            got[cls.__name__] = count() - before
    want = {name: k for name, (_, k) in ops.items()}
    want.update({name: group for name in ("SGD", "AdamW", "Adagrad", "RMSprop")})
    assert got == want, f"kernel launches per call ({'32764' if large else '4096'}-byte parameters)"


def test_chunk_size_boundaries(B):
    # Tensors under 2**22 elements use 16384-element chunks, larger ones 65536:
    # sizes on each side of both chunk sizes and of the switch.
    g = torch.Generator().manual_seed(60)
    sizes = [16383, 16384, 16385, 65535, 65537, 2**22 - 1, 2**22, 2**22 + 1, 3 * 65536 + 5]
    ts = [torch.randn(s, generator=g, dtype=torch.float64).float().to(B.dev) for s in sizes]
    st, ref = B.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts))
    for got, want in zip(st[:3], ref[:3]):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(st[3], ref[3])
    l1, l2, lr = coef_tensors(len(ts), 61, B.dev)
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    nnz = B.be.prox_(ts, l1, l2, lr)
    for w, ww in zip(ts, want):
        torch.testing.assert_close(w.double(), ww.float().double(), **elem_tol(B, torch.float32))
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in ts]))


def test_results_of_a_tensor_do_not_depend_on_its_neighbours(B):
    # Chunking depends only on each tensor's own size.
    g = torch.Generator().manual_seed(62)
    x = torch.randn(300_001, generator=g).to(B.dev)
    alone = B.be.weight_stats([x])
    with_big = B.be.weight_stats([torch.randn(2**22 + 3, generator=g).to(B.dev), x,
                                  torch.randn(17, generator=g).to(B.dev)])
    for a, b in zip(alone, with_big):
        assert bits_equal(a[0], b[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_number_coefficients_equal_tensor_coefficients_bitwise(B, dtype):
    # Numbers reach the kernels by value, tensors through device memory.
    ts = random_list(dtype, 63, B.dev, 0.5, more_layouts=True)
    n = len(ts)
    full = lambda v: torch.full((n,), v, dtype=torch.float64, device=B.dev)  # noqa: E731
    assert bits_equal(B.be.penalty(ts, 0.3, 0.1), B.be.penalty(ts, full(0.3), full(0.1)))
    g1, g2 = like_list(ts, dtype, 64), like_list(ts, dtype, 64)
    assert bits_equal(B.be.add_penalty_grad_(ts, g1, 0.3, 0.1),
                      B.be.add_penalty_grad_(ts, g2, full(0.3), full(0.1)))
    assert all(bits_equal(a, b) for a, b in zip(g1, g2))
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    assert torch.equal(B.be.prox_(a, 0.3, 0.1, 0.5), B.be.prox_(b, full(0.3), full(0.1), full(0.5)))
    assert all(bits_equal(x, y) for x, y in zip(a, b))


def test_only_empty_and_zero_dim(B):
    only_empty = [torch.empty(0, device=B.dev), torch.empty(3, 0, device=B.dev)]
    st = B.be.weight_stats(only_empty)
    assert all(x.tolist() == [0, 0] for x in st)
    c = torch.ones(2, dtype=torch.float64, device=B.dev)
    assert B.be.penalty(only_empty, c, c).item() == 0.0
    assert B.be.add_penalty_grad_(only_empty, [t.clone() for t in only_empty], c, c).item() == 0.0
    assert B.be.prox_(only_empty, c, c, c).tolist() == [0, 0]
    x = torch.tensor(-2.0, device=B.dev)
    st = B.be.weight_stats([x])
    assert st[0].item() == 2.0 and st[1].item() == 2.0 and st[2].item() == 2.0 and st[3].item() == 1
    one = torch.ones(1, dtype=torch.float64, device=B.dev)
    assert B.be.prox_([x], one, 0 * one, one).item() == 1 and x.item() == -1.0


@pytest.mark.parametrize("n", [95, 96, 97, 191, 192, 193])
def test_batch_boundaries(B, n):
    # Up to 96 tensors travel by value in one launch: lists on each side of
    # one and two batch boundaries, mixed dtypes and sizes, empty tensors and
    # a multi-chunk tensor next to the boundary, against the float64 spec and
    # the CPU kernels.
    g = torch.Generator().manual_seed(70 + n)
    sizes = torch.randint(1, 700, (n,), generator=g).tolist()
    sizes[n // 3] = 0
    sizes[94] = 40_000  # 3 chunks: the last tensor of the first batch, or next to it
    sizes[-1] = 16_385
    dts = [DTYPES[i % 4] for i in range(n)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(d).to(B.dev) for s, d in zip(sizes, dts)]
    l1, l2, lr = coef_tensors(n, 71, B.dev)
    st, ref, cpu = B.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts)), backends.cpu.weight_stats(to_cpu(ts))
    for got, want, c in zip(st[:3], ref[:3], cpu[:3]):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cpu(), c, rtol=1e-5, atol=1e-5)
    assert torch.equal(st[3].cpu(), ref[3].cpu()) and torch.equal(st[3].cpu(), cpu[3])
    v = B.be.penalty(ts, l1, l2)
    torch.testing.assert_close(v.cpu(), torch_ref.penalty(as_f64(ts), l1, l2).cpu(), rtol=1e-5, atol=1e-5)
    gs = like_list(ts, torch.float32, 72)
    gs = [x.to(d) for x, d in zip(gs, dts)]
    want_g = [x.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
              for i, (w, x) in enumerate(zip(ts, gs))]
    torch.testing.assert_close(B.be.add_penalty_grad_(ts, gs, l1, l2), v, **TWO_KERNEL_SUMS)
    for x, wg, d in zip(gs, want_g, dts):
        torch.testing.assert_close(x.double(), wg.to(d).double(), **GRAD_TOL[d])
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    cpu_ts = to_cpu(ts)
    cpu_nnz = backends.cpu.prox_(cpu_ts, l1.cpu(), l2.cpu(), lr.cpu())
    nnz = B.be.prox_(ts, l1, l2, lr)
    for i, (w, ww, cw) in enumerate(zip(ts, want, cpu_ts)):
        assert torch.equal(w == 0, ww.to(w.dtype) == 0), f"tensor {i}: zero pattern differs from the spec"
        assert torch.equal((w == 0).cpu(), cw == 0), f"tensor {i}: zero pattern differs from cpu"
        torch.testing.assert_close(w.cpu(), cw, **elem_tol(B, w.dtype))
    assert torch.equal(nnz.cpu(), cpu_nnz)
    # Toward a reference: each batch carries the refs' pointers too.
    refs = [x.to(d) for x, d in zip(like_list(ts, torch.float32, 73), dts)]
    moved, steps = [w.clone() for w in ts], [w - r for w, r in zip(ts, refs)]
    nnz = B.be.prox_(moved, l1, l2, lr, refs)
    B.be.prox_(steps, l1, l2, lr)
    for i, (w, d, r) in enumerate(zip(moved, steps, refs)):
        assert bits_equal(w, r + d), f"tensor {i}: prox toward ref differs from ref + prox(w - ref)"
    assert nnz.tolist() == [int((w != r).sum()) for w, r in zip(moved, refs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sums_beyond_float32_range(B, dtype):
    # Short runs are summed in float32; a run whose float32 sums leave
    # float32's range (squares past 3.4e38 or under 1e-38, or an Inf) is summed
    # again in float64, so results keep float64's range.
    big = 1e30 if dtype == torch.bfloat16 else (1e20 if dtype == torch.float32 else 6e4)
    tiny = 1e-30 if dtype == torch.bfloat16 else (1e-20 if dtype == torch.float32 else 1e-7)
    g = torch.Generator().manual_seed(73)
    r = lambda n, s: (torch.randn(n, generator=g, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    mixed = r(50_000, 1.0)
    mixed[12_345] = big
    ts = [r(70_001, big), r(70_001, tiny), mixed, torch.tensor([1.0, float("inf"), -2.0], dtype=dtype)]
    ts = [t.to(B.dev) for t in ts]
    st, ref = B.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts))
    for got, want in zip(st[:3], ref[:3]):
        assert got.dtype == torch.float32
        # in float64 terms: the float32 results are the float64 sums rounded
        torch.testing.assert_close(got.double(), want.float().double(), rtol=1e-5, atol=0)
    assert torch.equal(st[3].cpu(), ref[3].cpu())
    c = torch.tensor([1e-12, 1e25, 1.0, 1.0], dtype=torch.float64, device=B.dev)
    v = B.be.penalty(ts[:3], c[:3], c[:3])
    torch.testing.assert_close(v.double(), torch_ref.penalty(as_f64(ts[:3]), c[:3], c[:3]).float().double(),
                               rtol=1e-5, atol=0)
    assert B.be.penalty(ts, c, c).item() == float("inf")
