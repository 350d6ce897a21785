"""The structured ops against the float64 reference on every backend: the
group ops (group_norms, group_penalty, add_group_penalty_grad_, group_prox_,
max_norm_) and the element-wise ops toward a reference (``ref=``); plus the
systems they map to (scikit-learn's MultiTaskLasso / MultiTaskElasticNet,
Keras' MaxNorm) and their compositions."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import pyreg
from pyreg import backends
from pyreg.backends import torch_ref

from conftest import (DTYPE_IDS, DTYPES, ELEMENTWISE_TOL, GRAD_TOL, REDUCTION_TOL, bits_equal,
                      like_list, needs_emu, random_list)


def elem_tol(B, dtype):
    return pyreg._tolerance.TOLERANCES["elementwise_fma" if B.name == "cuda" else "elementwise"][dtype]


def group_list(dtype, seed=0, device="cpu", scale=1.0):
    """Tensors for the group ops, each case of the tiling: odd sizes, a group
    wider than a tile (5000 > 2048 columns), many row tiles, conv-like 4-D,
    dense non-contiguous (transposed, permuted, channels-last) and not dense
    (strided) views, 1-D and 0-dim tensors, empty tensors with and without
    groups, and a view whose rows start one element in (not aligned). Fresh
    random data."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)  # noqa: E731
    return [
        r(0, 7),                                  # 7 groups along dim 1, no elements
        r(13, 37),
        r(3, 5000),                               # dim 0: wide groups, several per tile
        r(2, 33001),                              # dim 0: groups wider than a tile
        r(()),                                    # one group of one element
        r(100000, 3),                             # dim 1: narrow groups over several row tiles
        r(100, 4, 200),                           # dim 1: wide groups over several row tiles
        r(61, 37).t(),                            # dense, transposed
        r(4, 5, 6, 7).permute(0, 2, 3, 1),        # dense, permuted
        r(3, 2 * 333 + 1)[:, ::2],                # not dense
        r(6, 3, 3, 3).contiguous(memory_format=torch.channels_last),
        r(2, 3, 9, 9),                            # conv-like: outer 2, inner 81 for dim 1
        r(4097),                                  # 1-D: groups are single elements
        r(5, 0),                                  # no groups along dim 1
        r(1 + 20000 * 16)[1:].view(20000, 16),    # dim 1: rows of 16 over row tiles, not aligned
        r(1 + 100 * 4 * 200)[1:].view(100, 4, 200),  # dim 1: wide groups over row tiles, not aligned
    ]


def dims_for(ts, which):
    """Per-tensor group dims: "rows" (0), "cols" (1, or 0 for 1-D/0-dim), "last" (-1)."""
    if which == "rows":
        return [0] * len(ts)
    if which == "last":
        return [-1] * len(ts)
    return [1 if t.dim() >= 2 else 0 for t in ts]


DIMS = ["rows", "cols", "last"]


def clone(ts):
    return [t.clone() for t in ts]


def as_like_f64(ts):
    """float64 copies with the same shapes (the reference input)."""
    return [t.detach().to(torch.float64) for t in ts]


def rdtype(ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def per_tensor(n, seed, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- group_norms
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", DIMS)
def test_group_norms(B, dtype, which):
    ts = group_list(dtype, seed=1, device=B.dev)
    dims = dims_for(ts, which)
    with pyreg.use_backend(B.name):
        got = pyreg.group_norms(ts, dim=dims)
    def norms(t, d):  # independent of the reference backend
        x = t.detach().cpu().double()
        if x.dim() <= 1:
            return x.abs().reshape(-1)
        return torch.linalg.vector_norm(x, dim=[k for k in range(x.dim()) if k != d % x.dim()])

    want = [norms(t, d) for t, d in zip(ts, dims)]
    assert len(got) == len(ts)
    for t, d, g_, w in zip(ts, dims, got, want):
        assert g_.dtype == rdtype(ts) and g_.device.type == B.dev
        assert g_.shape == ((t.shape[d] if t.dim() else 1),)
        torch.testing.assert_close(g_.cpu().double(), w.cpu().reshape(-1), **REDUCTION_TOL[dtype])


def test_group_norms_one_int_dim_for_all(B):
    ts = [torch.randn(5, 7, device=B.dev), torch.randn(3, 4, 2, device=B.dev)]
    with pyreg.use_backend(B.name):
        rows, cols = pyreg.group_norms(ts, dim=0), pyreg.group_norms(ts, dim=1)
    torch.testing.assert_close(rows[0], ts[0].norm(dim=1))
    torch.testing.assert_close(cols[0], ts[0].norm(dim=0))
    torch.testing.assert_close(cols[1], ts[1].transpose(0, 1).reshape(4, -1).norm(dim=1))


# --------------------------------------------------------------------------- group penalty and grad
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["number", "tensor"])
def test_group_penalty_and_grad(B, dtype, kind):
    ts = group_list(dtype, seed=2, device=B.dev)
    dims = dims_for(ts, "cols")
    n = len(ts)
    c = 0.3 if kind == "number" else per_tensor(n, 5)
    cd = c if kind == "number" else c.to(B.dev)
    gs = like_list(ts, dtype, seed=3)
    gs = [g.to(B.dev) for g in gs]
    want_g = [g.detach().double().clone() for g in gs]
    want_v = torch_ref.add_group_penalty_grad_(as_like_f64(ts), want_g, dims, c)
    with pyreg.use_backend(B.name):
        v = pyreg.group_penalty(ts, cd, dim=dims)
        gv = pyreg.add_group_penalty_grad_(ts, gs, cd, dim=dims)
    assert v.dtype == rdtype(ts)
    torch.testing.assert_close(v.cpu().double(), want_v.cpu(), **REDUCTION_TOL[dtype])
    assert bits_equal(v, gv)  # the same sums, in the same order
    for g, w in zip(gs, want_g):
        torch.testing.assert_close(g.cpu().double(), w.to(g.dtype).double().cpu(), **GRAD_TOL[dtype])


def test_group_penalty_is_differentiable(B):
    w = torch.randn(6, 5, dtype=torch.float64, device=B.dev)
    w[:, 2] = 0  # a zero group: subgradient 0
    x = w.clone().requires_grad_(True)
    with pyreg.use_backend(B.name):
        pyreg.group_penalty([x], 0.7, dim=1).backward()
    n = w.norm(dim=0, keepdim=True)
    want = torch.where(n == 0, torch.zeros_like(w), 0.7 * w / n)
    torch.testing.assert_close(x.grad, want)
    assert torch.equal(x.grad[:, 2], torch.zeros(6, dtype=torch.float64, device=B.dev))
    y = w.clone().requires_grad_(True)  # torch's own autograd of the formula agrees away from 0
    (0.7 * y[:, [0, 1, 3, 4]].norm(dim=0).sum()).backward()
    torch.testing.assert_close(x.grad[:, [0, 1, 3, 4]], y.grad[:, [0, 1, 3, 4]])


# --------------------------------------------------------------------------- group_prox_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", DIMS)
@pytest.mark.parametrize("kind", ["number", "list", "tensor"])
def test_group_prox(B, dtype, which, kind):
    ts = group_list(dtype, seed=4, device=B.dev)
    dims = dims_for(ts, which)
    n = len(ts)
    norms = torch_ref.group_norms(as_like_f64(ts), [d % max(t.dim(), 1) for t, d in zip(ts, dims)])
    # thresholds around the median group norm: some groups die, some shrink
    t_med = float(norms.median())
    if kind == "number":
        gl1, lr, el1, l2 = t_med, 1.0, 0.2, 0.05
    else:
        gl1 = per_tensor(n, 6, 0.5 * t_med, 1.5 * t_med)
        lr = per_tensor(n, 7, 0.5, 1.0)
        el1, l2 = per_tensor(n, 8, 0.0, 0.3), per_tensor(n, 9, 0.0, 0.3)
        if kind == "list":
            gl1, lr, el1, l2 = (c.tolist() for c in (gl1, lr, el1, l2))
    dev = (lambda c: c.to(B.dev) if isinstance(c, torch.Tensor) else c)  # noqa: E731
    want = [t.cpu().clone() for t in ts]
    ndims = [d % max(t.dim(), 1) for t, d in zip(ts, dims)]
    want_nz = torch_ref.group_prox_(want, ndims,
                                    *(torch.as_tensor(c, dtype=torch.float64) if not isinstance(c, float) else c
                                      for c in (el1, gl1, l2, lr)))
    got = clone(ts)
    with pyreg.use_backend(B.name):
        nz = pyreg.group_prox_(got, dev(gl1), dev(lr), dims, element_l1=dev(el1), l2=dev(l2))
    assert nz.dtype == torch.int64 and nz.shape == (n,)
    assert torch.equal(nz.cpu(), want_nz.cpu())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w.cpu(), **elem_tol(B, dtype))
        assert torch.equal(g.cpu() == 0, w.cpu() == 0)  # the same exact zeros
    assert 0 < int(nz.sum()) < sum((t.shape[d] if t.dim() else 1) for t, d in zip(ts, ndims))


def test_group_prox_zeroes_whole_groups_exactly(B):
    w = torch.randn(8, 10, dtype=torch.float32, device=B.dev)
    w[:, 3] *= 1e-3  # a weak column
    n = w.norm(dim=0)
    t = float((n[3] + n.sort().values[1]) / 2)
    with pyreg.use_backend(B.name):
        nz = pyreg.group_prox_([w], l1=t, lr=1.0, dim=1)
    assert torch.equal(w[:, 3], torch.zeros(8, device=B.dev))
    kept = (w != 0).any(dim=0)
    assert int(nz[0]) == int(kept.sum()) and int(nz[0]) < 10
    # surviving columns shrink by exactly (1 - t/||w_g||)
    for j in range(10):
        if kept[j]:
            assert abs(float(w[:, j].norm()) - (float(n[j]) - t)) < 1e-4 * float(n[j])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sparse_group_prox_is_the_three_step_composition(B, dtype):
    # Element soft-threshold, then group soft-threshold, then the L2 division.
    ts = [t for t in group_list(dtype, seed=10, device=B.dev)]
    dims = dims_for(ts, "cols")
    el1, gl1, l2, lr = 0.3, 1.5, 0.2, 0.5
    fused, steps = clone(ts), clone(ts)
    with pyreg.use_backend(B.name):
        pyreg.group_prox_(fused, gl1, lr, dims, element_l1=el1, l2=l2)
        pyreg.prox_(steps, l1=el1, l2=0.0, lr=lr)
        pyreg.group_prox_(steps, gl1, lr, dims)
        pyreg.prox_(steps, l1=0.0, l2=l2, lr=lr)
    tol = dict(elem_tol(B, dtype))
    tol["rtol"] *= 3  # three roundings to the dtype against one
    for f, s in zip(fused, steps):
        torch.testing.assert_close(f.cpu(), s.cpu(), **tol)
        assert torch.equal(f.cpu() == 0, s.cpu() == 0)


# --------------------------------------------------------------------------- max_norm_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", DIMS)
def test_max_norm(B, dtype, which):
    ts = group_list(dtype, seed=11, device=B.dev)
    dims = dims_for(ts, which)
    ndims = [d % max(t.dim(), 1) for t, d in zip(ts, dims)]
    # A cap halfway between two neighbouring group norms near the median, so
    # that no group sits on the boundary, where rounding decides the count.
    norms = torch_ref.group_norms(as_like_f64(ts), ndims).sort().values
    gaps = (norms[1:] - norms[:-1]) / norms[1:]
    i = len(norms) // 2 + int(torch.nonzero(gaps[len(norms) // 2:] > 1e-3)[0])
    cap = float((norms[i] + norms[i + 1]) / 2)
    want = [t.cpu().clone() for t in ts]
    want_k = torch_ref.max_norm_(want, ndims, cap)
    got = clone(ts)
    with pyreg.use_backend(B.name):
        k = pyreg.max_norm_(got, cap, dim=dims)
    assert torch.equal(k.cpu(), want_k)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, **elem_tol(B, dtype))
    after = torch_ref.group_norms(as_like_f64([g.cpu() for g in got]), ndims)
    assert float(after.max()) <= cap * (1 + 2e-2)  # bf16 rounding at most


def test_max_norm_leaves_small_groups_bit_identical(B):
    w = torch.randn(50, 20, device=B.dev)
    w[:10] *= 100  # these rows get scaled
    before = w.clone()
    with pyreg.use_backend(B.name):
        k = pyreg.max_norm_([w], 20.0, dim=0)
    big = before.norm(dim=1) > 20.0
    assert int(k[0]) == int(big.sum()) == 10
    assert bits_equal(w[~big], before[~big])
    torch.testing.assert_close(w[big].norm(dim=1), torch.full((10,), 20.0, device=B.dev))


_READ_ONLY_GROUPS = r"""
import ctypes, mmap, sys, warnings
import torch, pyreg
backend, dim, mixed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "mixed"
page = mmap.PAGESIZE
n = page // 4                                    # float32 elements per page
mm = mmap.mmap(-1, 2 * page)                     # page-aligned
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    w = torch.frombuffer(mm, dtype=torch.float32).view(2, n)
g = torch.Generator().manual_seed(0)
w.copy_(torch.randn(2, n, generator=g) * 0.01)
if mixed:
    w[1] *= 1e4                                  # row 1 alone outside the ball
addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(page if mixed else 2 * page), mmap.PROT_READ) == 0
before = w[0].clone()
with pyreg.use_backend(backend):
    k = pyreg.max_norm_([w], 1.0, dim=dim)
assert int(k[0]) == (1 if mixed else 0), k
assert torch.equal(w[0], before)
if mixed:
    assert abs(float(w[1].norm()) - 1.0) < 1e-5
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes: Linux")
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emu", marks=needs_emu)])
@pytest.mark.parametrize("case", [(0, "none"), (1, "none"), (0, "mixed")], ids=["rows", "columns", "rows-mixed"])
def test_max_norm_writes_only_the_groups_it_scales(backend, case, tmp_path):
    """The weights of groups inside the ball lie in read-only memory: a store
    there (even of the same bits) would kill the process. (Run from another
    directory: from the repository root, ``-c`` would import the source tree.)"""
    dim, mixed = case
    r = subprocess.run([sys.executable, "-c", _READ_ONLY_GROUPS, backend, str(dim), mixed],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_max_norm_equals_keras_formula():
    # Keras MaxNorm(max_value=2, axis=0) on a Dense kernel [in, out]:
    #   w * clip(n, 0, c) / (1e-7 + n), n = sqrt(sum(w^2, axis=0))
    # The kernel's columns are the rows of torch's weight [out, in]: dim=0.
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(30, 12, generator=g, dtype=torch.float64).numpy() * 0.37
    n = np.sqrt(np.sum(np.square(kernel), axis=0, keepdims=True))
    keras = kernel * np.clip(n, 0, 2.0) / (1e-7 + n)
    w = torch.from_numpy(kernel.T.copy())
    pyreg.max_norm_([w], 2.0, dim=0)
    np.testing.assert_allclose(w.numpy().T, keras, atol=1e-6, rtol=0)
    assert (n > 2.0).any() and (n < 2.0).any()


# --------------------------------------------------------------------------- special values
def test_group_ops_nan_inf(B):
    w = torch.tensor([[1.0, float("nan"), 0.0], [2.0, 1.0, 0.0], [0.5, 3.0, 0.0]], device=B.dev)
    inf = torch.tensor([[float("inf"), 1.0], [2.0, 1.0]], device=B.dev)
    with pyreg.use_backend(B.name):
        nrm = pyreg.group_norms([w, inf], dim=1)
        a, b = w.clone(), inf.clone()
        nz = pyreg.group_prox_([a, b], 0.5, 1.0, 1)
        c, d = w.clone(), inf.clone()
        k = pyreg.max_norm_([c, d], 1.0, dim=1)
    want_n = torch_ref.group_norms([w.cpu().double(), inf.cpu().double()], [1, 1])
    torch.testing.assert_close(torch.cat(nrm).cpu().double(), want_n, equal_nan=True)
    ra, rb = w.cpu().clone(), inf.cpu().clone()
    want_nz = torch_ref.group_prox_([ra, rb], [1, 1], 0.0, 0.5, 0.0, 1.0)
    assert torch.equal(nz.cpu(), want_nz)
    torch.testing.assert_close(a.cpu(), ra, equal_nan=True)
    torch.testing.assert_close(b.cpu(), rb, equal_nan=True)
    assert torch.isnan(a[:, 1]).all() and torch.equal(a[:, 2].cpu(), torch.zeros(3))
    rc, rd = w.cpu().clone(), inf.cpu().clone()
    assert torch.equal(k.cpu(), torch_ref.max_norm_([rc, rd], [1, 1], 1.0))
    torch.testing.assert_close(c.cpu(), rc, equal_nan=True)
    torch.testing.assert_close(d.cpu(), rd, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_group_grad_of_a_group_with_a_subnormal_norm(B, dtype):
    """c * w_g / ||w_g|| is at most c per element, but c / ||w_g|| is beyond float32's range for a norm
    below about 1 / FLT_MAX: the product must not pass through it (it gave inf, and NaN at the zeros).
    (float64: the squares of its subnormals underflow in the spec's own float64 norm.)"""
    tiny = torch.finfo(dtype).tiny / 64  # a subnormal of the dtype
    w = torch.tensor([[tiny, 1.0], [0.0, -2.0], [-tiny, 0.5]], dtype=dtype, device=B.dev)
    g = torch.zeros_like(w)
    want = torch.zeros(3, 2, dtype=torch.float64)
    torch_ref.add_group_penalty_grad_([w.cpu().double()], [want], [1], 1.0)
    x = w.clone().requires_grad_(True)
    with pyreg.use_backend(B.name):
        pyreg.add_group_penalty_grad_([w], [g], 1.0, dim=1)
        pyreg.group_penalty([x], 1.0, dim=1).backward()
    for got in (g, x.grad):
        assert bool(torch.isfinite(got).all()), got
        torch.testing.assert_close(got.cpu().double(), want.to(dtype).double(), **GRAD_TOL[dtype])
    assert abs(float(g[0, 0]) - 2 ** -0.5) < 1e-2 and float(g[1, 0]) == 0.0


# --------------------------------------------------------------------------- batches and determinism
def test_many_tensors_cross_launch_batches(B):
    # More tensors than one launch describes (48 for the group kernels), mixed
    # dtypes and shapes, some without elements.
    g = torch.Generator().manual_seed(12)
    ts = []
    for i in range(131):
        shape = (i % 7, 3 + i % 5) if i % 11 else (0, 4)
        ts.append(torch.randn(shape, generator=g).to(DTYPES[i % 4]).to(B.dev))
    dims = [1] * len(ts)
    want = [t.cpu().clone() for t in ts]
    want_nz = torch_ref.group_prox_(want, dims, 0.0, 0.8, 0.0, 1.0)
    got = clone(ts)
    with pyreg.use_backend(B.name):
        nrm = pyreg.group_norms(ts, dim=1)
        nz = pyreg.group_prox_(got, 0.8, 1.0, 1)
    ref_n = torch.split(torch_ref.group_norms([t.cpu().double() for t in ts], dims),
                        [t.shape[1] for t in ts])
    for a, b, t in zip(nrm, ref_n, ts):
        torch.testing.assert_close(a.cpu().double(), b, **REDUCTION_TOL[t.dtype])
    assert torch.equal(nz.cpu(), want_nz)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **ELEMENTWISE_TOL[a.dtype])


def test_group_ops_are_deterministic(B):
    ts = group_list(torch.float32, seed=13, device=B.dev, scale=3.0)
    dims = dims_for(ts, "cols")
    outs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        try:
            a = clone(ts)
            with pyreg.use_backend(B.name):
                n = pyreg.group_norms(ts, dim=dims)
                v = pyreg.group_penalty(ts, 0.5, dim=dims)
                pyreg.group_prox_(a, 2.0, 1.0, dims, element_l1=0.1, l2=0.1)
            outs.append((n, v, a))
        finally:
            torch.set_num_threads(2)
    for n, v, a in outs[1:]:
        assert all(bits_equal(x, y) for x, y in zip(n, outs[0][0]))
        assert bits_equal(v, outs[0][1])
        assert all(bits_equal(x, y) for x, y in zip(a, outs[0][2]))


def test_group_ops_kernels_agree_with_cpu_kernels(B):
    # The compiled backends against each other (both against the spec above).
    ts = group_list(torch.float64, seed=14, device=B.dev)
    dims = dims_for(ts, "cols")
    with pyreg.use_backend(B.name):
        got = pyreg.group_norms(ts, dim=dims)
    cpu = backends.cpu.group_norms([t.cpu() for t in ts], [d % max(t.dim(), 1) for t, d in zip(ts, dims)])
    torch.testing.assert_close(torch.cat(got).cpu(), cpu, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- scikit-learn
@pytest.mark.parametrize("l1_ratio", [None, 0.7])
def test_group_prox_gradient_descent_reaches_sklearn_multitask_optimum(l1_ratio):
    # Full-batch proximal gradient (FISTA) on (1/2n)||Y - X W^T||^2 with
    # group_prox_ over W's columns (dim=1) reaches MultiTaskLasso's /
    # MultiTaskElasticNet's optimum, with the same zero columns.
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    n, p, tasks = 200, 30, 3
    X = rng.standard_normal((n, p))
    W_true = np.zeros((tasks, p))
    W_true[:, :5] = rng.standard_normal((tasks, 5)) * 2
    Y = X @ W_true.T + 0.3 * rng.standard_normal((n, tasks))
    alpha = 0.15
    if l1_ratio is None:
        est = sklearn.MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100000)
        gl1, l2 = alpha, 0.0
    else:
        est = sklearn.MultiTaskElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-12,
                                          max_iter=100000)
        gl1, l2 = alpha * l1_ratio, 0.5 * alpha * (1 - l1_ratio)
    est.fit(X, Y)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    lr = 1.0 / float(torch.linalg.eigvalsh(Xt.T @ Xt / n).max())
    W = torch.zeros(tasks, p, dtype=torch.float64)
    Z, t = W.clone(), 1.0
    for _ in range(5000):
        grad = -(Yt - Xt @ Z.T).T @ Xt / n
        W_next = Z - lr * grad
        pyreg.group_prox_([W_next], l1=gl1, lr=lr, dim=1, l2=l2)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        Z = W_next + ((t - 1) / t_next) * (W_next - W)
        W, t = W_next, t_next
    np.testing.assert_allclose(W.numpy(), est.coef_, atol=1e-6, rtol=0)
    zero_cols = (W == 0).all(dim=0).numpy()
    assert np.array_equal(zero_cols, (est.coef_ == 0).all(axis=0))
    assert 0 < zero_cols.sum() < p


# --------------------------------------------------------------------------- toward a reference
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prox_toward_ref_is_ref_plus_prox_of_difference_bit_for_bit(B, dtype):
    ts = random_list(dtype, seed=20, device=B.dev, more_layouts=True)
    refs = like_list(ts, dtype, seed=21)
    refs = [r.to(B.dev) for r in refs]
    got = clone(ts)
    with pyreg.use_backend(B.name):
        nnz = pyreg.prox_(got, 0.4, 0.1, 0.8, ref=refs)
        d = [t - r for t, r in zip(ts, refs)]
        pyreg.prox_(d, 0.4, 0.1, 0.8)
    want = [r + x for r, x in zip(refs, d)]
    for g, w in zip(got, want):
        assert bits_equal(g, w)
    assert nnz.tolist() == [int((g != r).sum()) for g, r in zip(got, refs)]
    assert any(int((g == r).sum()) > 0 for g, r in zip(got, refs) if g.numel())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_penalty_and_grad_toward_ref(B, dtype):
    ts = random_list(dtype, seed=22, device=B.dev, more_layouts=True)
    refs = [r.to(B.dev) for r in like_list(ts, dtype, seed=23)]
    n = len(ts)
    l1, l2 = per_tensor(n, 24), per_tensor(n, 25)
    diffs = [t.double() - r.double() for t, r in zip(ts, refs)]
    want_v = torch_ref.penalty([d.cpu() for d in diffs], l1, l2)
    gs = [g.to(B.dev) for g in like_list(ts, dtype, seed=26)]
    want_g = [g.cpu().double() + l1[i] * torch.sign(d.cpu()) + 2 * l2[i] * d.cpu()
              for i, (g, d) in enumerate(zip(gs, diffs))]
    with pyreg.use_backend(B.name):
        v = pyreg.penalty(ts, l1.to(B.dev), l2.to(B.dev), ref=refs)
        gv = pyreg.add_penalty_grad_(ts, gs, l1.to(B.dev), l2.to(B.dev), ref=refs)
    torch.testing.assert_close(v.cpu().double(), want_v, **REDUCTION_TOL[dtype])
    assert bits_equal(v, gv)
    for g, w in zip(gs, want_g):
        torch.testing.assert_close(g.cpu(), w.to(dtype), **GRAD_TOL[dtype])


def test_penalty_toward_ref_is_differentiable_and_ref_is_constant(B):
    w = torch.randn(5, 4, dtype=torch.float64, device=B.dev, requires_grad=True)
    r = torch.randn(5, 4, dtype=torch.float64, device=B.dev, requires_grad=True)
    with pyreg.use_backend(B.name):
        pyreg.penalty([w], 0.3, 0.2, ref=[r]).backward()
    d = (w - r).detach()
    torch.testing.assert_close(w.grad, 0.3 * torch.sign(d) + 0.4 * d)
    assert r.grad is None


def test_ref_bad_input_changes_nothing(B):
    w = [torch.randn(4, 3, device=B.dev), torch.randn(5, device=B.dev)]
    before = clone(w)
    with pyreg.use_backend(B.name):
        with pytest.raises(ValueError, match=r"ref\[1\]"):
            pyreg.prox_(w, 0.1, ref=[torch.zeros(4, 3, device=B.dev), torch.zeros(6, device=B.dev)])
        with pytest.raises(ValueError, match="2 tensors but 1 ref"):
            pyreg.prox_(w, 0.1, ref=[torch.zeros(4, 3, device=B.dev)])
        with pytest.raises(ValueError, match=r"ref\[0\]"):
            pyreg.penalty(w, 0.1, ref=[torch.zeros(4, 3, dtype=torch.float64, device=B.dev), w[1]])
        with pytest.raises(ValueError, match="shares memory with ref"):
            pyreg.prox_(w, 0.1, ref=[w[0][:, :], torch.zeros(5, device=B.dev)])
    for a, b in zip(w, before):
        assert bits_equal(a, b)


# --------------------------------------------------------------------------- bad input
def test_group_ops_bad_input_changes_nothing(B):
    w = [torch.randn(4, 3, device=B.dev), torch.randn(5, device=B.dev)]
    before = clone(w)
    with pyreg.use_backend(B.name):
        with pytest.raises(ValueError, match=r"dim=1 is out of range for tensors\[1\]"):
            pyreg.group_prox_(w, 0.1, 1.0, dim=1)
        with pytest.raises(ValueError, match="dim has 1 values but there are 2 tensors"):
            pyreg.max_norm_(w, 1.0, dim=[0])
        with pytest.raises(TypeError, match=r"dim\[1\] must be an int"):
            pyreg.group_norms(w, dim=[0, 0.5])
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            pyreg.group_prox_(w, -1.0, 1.0, dim=0)
        # a CPU coefficient tensor is value-checked for any device (one on the
        # GPU is trusted as given: checking it would sync)
        with pytest.raises(ValueError, match=r"max_value\[1\] must be finite"):
            pyreg.max_norm_(w, torch.tensor([1.0, float("nan")]), dim=0)
        with pytest.raises(ValueError, match=r"grads\[0\]"):
            pyreg.add_group_penalty_grad_(w, [torch.zeros(3, 4, device=B.dev), torch.zeros(5, device=B.dev)],
                                          0.1, dim=0)
        with pytest.raises(ValueError, match="share memory"):
            pyreg.group_prox_([w[0], w[0][1:]], 0.1, 1.0, dim=0)
    for a, b in zip(w, before):
        assert bits_equal(a, b)


def test_group_ops_empty_list():
    assert pyreg.group_norms([]) == []
    assert pyreg.group_prox_([], 1.0).shape == (0,)
    assert pyreg.max_norm_([], 1.0).shape == (0,)
    assert float(pyreg.group_penalty([], 1.0)) == 0.0


# --------------------------------------------------------------------------- torch.library
def _opcheck_cases(dev):
    from pyreg import _ops

    g = torch.Generator().manual_seed(30)
    ts = lambda: [torch.randn(5, 7, generator=g).to(dev), torch.randn(3, 4, 2, generator=g).to(dev)]  # noqa: E731
    c = lambda v: torch.full((2,), v, dtype=torch.float64, device=dev)  # noqa: E731
    return {
        "group_norms": (_ops.group_norms_op, (ts(), [1, 1])),
        "group_penalty": (_ops.group_penalty_op, (ts(), [0, 2], c(0.3))),
        "add_group_penalty_grad_": (_ops.add_group_penalty_grad_op, (ts(), ts(), [1, 0], c(0.3))),
        "group_prox_": (_ops.group_prox_op, (ts(), [1, 1], c(0.1), c(1.0), c(0.1), c(1.0))),
        "max_norm_": (_ops.max_norm_op, (ts(), [0, 1], c(1.0))),
        "prox_ref": (_ops.prox_op, (ts(), c(0.3), c(0.1), c(1.0), ts())),
        "penalty_ref": (_ops.penalty_op, (ts(), c(0.3), c(0.1), ts())),
        "add_penalty_grad_ref": (_ops.add_penalty_grad_op, (ts(), ts(), c(0.3), c(0.1), ts())),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases("cpu")))
def test_opcheck(B, case):
    op, args = _opcheck_cases(B.dev)[case]
    with pyreg.use_backend(B.name):
        torch.library.opcheck(op, args)


def test_group_ops_under_torch_compile():
    w = torch.randn(6, 5)
    x = w.clone()

    @torch.compile(fullgraph=True, backend="eager")
    def step(t):
        nz = pyreg.group_prox_([t], 2.0, 0.5, dim=1)
        pyreg.max_norm_([t], 1.0, dim=0)
        return nz, pyreg.group_penalty([t], 0.1, dim=1)

    nz, v = step(x)
    y = w.clone()
    nz2 = pyreg.group_prox_([y], 2.0, 0.5, dim=1)
    pyreg.max_norm_([y], 1.0, dim=0)
    assert torch.equal(nz, nz2) and bits_equal(x, y)
    assert bits_equal(v, pyreg.group_penalty([y], 0.1, dim=1))


def test_gradcheck_group_penalty_and_penalty_toward_ref():
    g = torch.Generator().manual_seed(40)
    w = [torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    r = [torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, generator=g, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: pyreg.group_penalty([a, b], [0.3, 0.7], dim=[1, 0]), tuple(w))
    assert torch.autograd.gradcheck(lambda a, b: pyreg.penalty([a, b], 0.0, [0.2, 0.5], ref=r), tuple(w))


def test_ops_toward_ref_nan_inf(B):
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([1.0, nan, 2.0, inf, -0.5, 3.0, inf], device=B.dev)
    r = torch.tensor([1.2, 0.0, nan, 1.0, inf, 3.0, inf], device=B.dev)
    g = torch.zeros_like(w)
    with pyreg.use_backend(B.name):
        v = pyreg.penalty([w], 0.3, 0.1, ref=[r])
        gv = pyreg.add_penalty_grad_([w], [g], 0.3, 0.1, ref=[r])
        x = w.clone()
        nnz = pyreg.prox_([x], 0.3, 0.1, 1.0, ref=[r])
    assert torch.isnan(v) and torch.isnan(gv)
    want_g = [torch.zeros(7, dtype=torch.float64)]
    torch_ref.add_penalty_grad_([w.cpu().double()], want_g, 0.3, 0.1, ref=[r.cpu().double()])
    torch.testing.assert_close(g.cpu(), want_g[0].float(), equal_nan=True)
    want = w.cpu().clone()
    want_nnz = torch_ref.prox_([want], 0.3, 0.1, 1.0, ref=[r.cpu()])
    torch.testing.assert_close(x.cpu(), want, equal_nan=True)
    assert torch.equal(nnz.cpu(), want_nnz)
    assert x[0] == r[0] and x[5] == r[5]  # within lr*l1 of the reference: exactly on it
    assert torch.isnan(x[1]) and torch.isnan(x[2]) and torch.isnan(x[4])  # NaN and Inf - Inf propagate


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prox_toward_ref_against_the_spec(B, dtype):
    """prox_ toward a reference against the float64 spec on random data, every backend: within
    the ``elementwise_ref`` tolerance (in 16 bit the middle step's ties may round either way)."""
    g = torch.Generator().manual_seed(31)
    w0 = torch.randn(4099, generator=g, dtype=torch.float64).to(dtype)
    r0 = torch.randn(4099, generator=g, dtype=torch.float64).to(dtype)
    got = w0.clone().to(B.dev)
    with pyreg.use_backend(B.name):
        pyreg.prox_([got], 0.3, 0.2, 0.5, ref=[r0.to(B.dev)])
    want = w0.clone()
    torch_ref.prox_([want], 0.3, 0.2, 0.5, ref=[r0])
    torch.testing.assert_close(got.cpu(), want, **pyreg._tolerance.tolerance("elementwise_ref", dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_threshold_beyond_the_dtypes_range(B, dtype):
    """lr * l1 finite but beyond the dtype's range (the kernels' float32 threshold would be inf):
    every finite weight goes to 0, an infinite one stays infinite (as in the spec; not inf - inf)."""
    inf = float("inf")
    for l1, lr in ((1e40, 1.0), (0.5, 1e300)):
        for ref in (False, True):
            w = torch.tensor([inf, -inf, 1.0, -3e4, 0.0], dtype=dtype, device=B.dev)
            want = w.cpu().clone()
            rs = [torch.zeros_like(w)] if ref else None
            with pyreg.use_backend(B.name):
                nnz = pyreg.prox_([w], l1, 0.0, lr, ref=rs)
            want_nnz = torch_ref.prox_([want], l1, 0.0, lr, ref=[r.cpu() for r in rs] if ref else None)
            assert w.cpu().tolist() == [inf, -inf, 0.0, 0.0, 0.0] == want.tolist(), (l1, lr, ref, w)
            assert nnz.tolist() == want_nnz.tolist() == [2]
            gw = torch.tensor([[inf, 1.0], [2.0, 3.0]], dtype=dtype, device=B.dev)
            with pyreg.use_backend(B.name):
                pyreg.group_prox_([gw], 0.0, lr, dim=0, element_l1=l1)  # (its element step: the same threshold)
            assert gw.cpu().tolist() == [[inf, 0.0], [0.0, 0.0]], gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sums_toward_a_ref_beyond_float32s_range(B, dtype):
    """w - r beyond float32's range (3e38 - (-3e38)): the sums are those of the float64
    differences, as in the spec (an L1-only penalty was NaN: 0 * an overflowed sum of squares)."""
    w = torch.tensor([3e38, 1.0], dtype=dtype, device=B.dev)
    r = torch.tensor([-3e38, 0.5], dtype=dtype, device=B.dev)
    with pyreg.use_backend(B.name):
        v1 = pyreg.penalty([w], 1e-3, 0.0, ref=[r])
        v2 = pyreg.penalty([w], 0.0, 1e-3, ref=[r])
        gv = pyreg.add_penalty_grad_([w], [torch.zeros_like(w)], 1e-3, 0.0, ref=[r])
    want1 = torch_ref.penalty([w.cpu()], 1e-3, 0.0, ref=[r.cpu()])
    want2 = torch_ref.penalty([w.cpu()], 0.0, 1e-3, ref=[r.cpu()])
    torch.testing.assert_close(v1.cpu().double(), want1.double(), **REDUCTION_TOL[dtype])
    torch.testing.assert_close(gv.cpu().double(), want1.double(), **REDUCTION_TOL[dtype])
    assert torch.isinf(v2) and torch.isinf(want2)
