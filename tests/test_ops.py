"""The four fused ops against the float64 reference, on every backend and dtype."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyreg
from pyreg import backends
from pyreg.backends import torch_ref

from conftest import DTYPE_IDS, DTYPES, ELEMENTWISE_TOL, REDUCTION_TOL, as_f64, needs_emu, random_list

# Every backend that takes CPU tensors: the float64 spec, the C++ kernels, and
# the CUDA kernels under the emulator.
BACKENDS = ["torch", "cpu", pytest.param("cuda-emu", marks=needs_emu)]
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
    emu = "compiled (the CUDA kernels on the CPU, for tests)" if backends.get("cuda-emu").compiled() \
        else "not compiled (build with PYREG_CUDA_EMU=ON)"
    assert f"cuda-emu backend: {emu}" in out


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


# --------------------------------------------------------------------------- weight_stats
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_stats(backend, dtype):
    ts = random_list(dtype, seed=1)
    with pyreg.use_backend(backend):
        st = pyreg.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    rd = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(st, pyreg.WeightStats)
    for got, want in zip(st[:3], ref[:3]):
        assert got.dtype == rd and got.shape == (len(ts),)
        torch.testing.assert_close(got, want.to(rd), **REDUCTION_TOL[dtype])
    assert st.nnz.dtype == torch.int64
    assert torch.equal(st.nnz, ref.nnz)
    # empty tensors report zeros
    for i in (0, 3, 8):
        assert st.l1[i] == 0 and st.l2[i] == 0 and st.linf[i] == 0 and st.nnz[i] == 0


# --------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_penalty(backend, dtype, kind):
    ts = random_list(dtype, seed=2)
    l1, l2, _ = coefs(kind, len(ts), 3)
    with pyreg.use_backend(backend):
        got = pyreg.penalty(ts, l1, l2)
    want = torch_ref.penalty(as_f64(ts), as_tensor(l1, len(ts)), as_tensor(l2, len(ts)))
    assert got.shape == ()
    torch.testing.assert_close(got, want.to(got.dtype), **REDUCTION_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_penalty_backward(backend, dtype):
    ts = [t.requires_grad_() for t in random_list(dtype, seed=4)]
    l1, l2, _ = coefs("tensor", len(ts), 5)
    with pyreg.use_backend(backend):
        (3.0 * pyreg.penalty(ts, l1, l2)).backward()
    for i, t in enumerate(ts):
        x = t.detach().double()
        want = 3.0 * (l1[i] * torch.sign(x) + 2 * l2[i] * x)
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        torch.testing.assert_close(t.grad.double(), want.to(dtype).double(), **ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_gradcheck(backend):
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 4, generator=g, dtype=torch.float64).t().requires_grad_(),
          torch.randn((), generator=g, dtype=torch.float64, requires_grad=True)]
    l1 = torch.tensor([0.3, 0.0, 1.2], dtype=torch.float64)
    with pyreg.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *w: pyreg.penalty(list(w), l1, 0.25), ts)


# --------------------------------------------------------------------------- add_penalty_grad_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_add_penalty_grad(backend, dtype, kind):
    ts = random_list(dtype, seed=7)
    gs = random_list(dtype, seed=8)
    l1, l2, _ = coefs(kind, len(ts), 9)
    want_g = [g.double() + (as_tensor(l1, len(ts))[i] * torch.sign(w.double()) + 2 * as_tensor(l2, len(ts))[i] * w.double())
              for i, (w, g) in enumerate(zip(ts, gs))]
    want_v = torch_ref.penalty(as_f64(ts), as_tensor(l1, len(ts)), as_tensor(l2, len(ts)))
    before = [w.clone() for w in ts]
    with pyreg.use_backend(backend):
        v = pyreg.add_penalty_grad_(ts, gs, l1, l2)
    torch.testing.assert_close(v, want_v.to(v.dtype), **REDUCTION_TOL[dtype])
    for g, wg in zip(gs, want_g):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), wg.to(dtype).double(), **ELEMENTWISE_TOL[dtype])
    for w, b in zip(ts, before):  # weights are read, never written
        assert torch.equal(w, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_of_zero_is_zero(backend):
    w = torch.tensor([0.0, -0.0, 1.5, -2.0, 0.0])
    g = torch.full_like(w, 0.25)
    with pyreg.use_backend(backend):
        pyreg.add_penalty_grad_([w], [g], l1=1.0)
    assert g.tolist() == [0.25, 0.25, 1.25, -0.75, 0.25]
    wr = w.clone().requires_grad_()
    with pyreg.use_backend(backend):
        pyreg.penalty([wr], l1=1.0).backward()
    assert wr.grad.tolist() == [0.0, 0.0, 1.0, -1.0, 0.0]


# --------------------------------------------------------------------------- prox_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_prox(backend, dtype, kind):
    ts = random_list(dtype, seed=10)
    n = len(ts)
    l1, l2, lr = coefs(kind, n, 11)
    L1, L2, LR = as_tensor(l1, n), as_tensor(l2, n), as_tensor(lr, n)
    want = as_f64(ts)
    torch_ref.prox_(want, L1, L2, LR)  # float64 spec
    want = [w.to(dtype) for w in want]  # rounded once to the dtype
    bases = [t._base for t in ts]
    with pyreg.use_backend(backend):
        nnz = pyreg.prox_(ts, l1, l2, lr)
    assert nnz.dtype == torch.int64 and nnz.shape == (n,)
    zeros = 0
    for i, (w, ww) in enumerate(zip(ts, want)):
        assert w.dtype == dtype
        assert torch.equal(w == 0, ww == 0), f"zero pattern differs in tensor {i}"
        torch.testing.assert_close(w.double(), ww.double(), **ELEMENTWISE_TOL[dtype])
        assert nnz[i] == torch.count_nonzero(w)
        zeros += int((w == 0).sum())
    assert zeros > 50_000  # the threshold really cut: the test is not vacuous
    # views were updated through to their bases
    assert bases[7] is not None and torch.equal(bases[7][:, ::2], ts[7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_threshold_boundary_and_specials(backend):
    # |w| == lr*l1 exactly -> 0; just above stays nonzero; NaN and inf propagate.
    t = 0.5
    w = torch.tensor([0.5, -0.5, 0.5000001, -0.4999999, float("nan"), float("inf"), -float("inf"), 0.0])
    with pyreg.use_backend(backend):
        nnz = pyreg.prox_([w], l1=t, lr=1.0)
    assert w[0] == 0 and w[1] == 0 and w[3] == 0 and w[7] == 0
    assert 0 < w[2] < 1e-6
    assert torch.isnan(w[4]) and w[5] == float("inf") and w[6] == -float("inf")
    assert int(nnz[0]) == 4


def _largest_at_most(t, dtype):
    """The largest value of ``dtype`` that is <= t (t > 0)."""
    x = torch.tensor(t, dtype=torch.float64).to(dtype)
    if x.double() > t:  # rounded up: one step down (positive values: bits - 1)
        iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
        x = (x.reshape(1).view(iv) - 1).view(dtype).reshape(())
    assert x.double() <= t
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prox_zeroes_the_largest_value_at_most_the_threshold(backend, dtype):
    # lr*l1 = 0.1, which no dtype stores exactly (float64's 0.1 is lr*l1 itself):
    # the largest value <= 0.1 and its negative become exactly +0.0; the next
    # value up survives. Catches a zero test of |w| < t, whose shrink would
    # leave a tiny nonzero of the wrong sign (or -0.0).
    x = _largest_at_most(0.1, dtype)
    iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    up = (x.reshape(1).view(iv) + 1).view(dtype)
    w = torch.cat([x.reshape(1), -x.reshape(1), up, -up])
    with pyreg.use_backend(backend):
        nnz = pyreg.prox_([w], l1=0.1, lr=1.0)
    assert w[0].item() == 0 and w[1].item() == 0
    assert not torch.signbit(w[:2]).any(), "a zeroed weight must be +0.0"
    assert w[2] > 0 and w[3] < 0 and int(nnz[0]) == 2


def test_prox_l2_only_is_scaling():
    w = torch.randn(1000, dtype=torch.float64)
    want = w / (1 + 2 * 0.1 * 0.3)
    pyreg.prox_([w], l2=0.3, lr=0.1)
    torch.testing.assert_close(w, want, rtol=1e-15, atol=0)


# --------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend):
    with pyreg.use_backend(backend):
        st = pyreg.weight_stats([])
        assert all(x.shape == (0,) for x in st)
        assert pyreg.penalty([], 0.1, 0.2).item() == 0.0
        assert pyreg.add_penalty_grad_([], [], 0.1).item() == 0.0
        assert pyreg.prox_([], 0.1).shape == (0,)
        only_empty = [torch.empty(0), torch.empty(3, 0)]
        assert pyreg.weight_stats(only_empty).nnz.tolist() == [0, 0]
        assert pyreg.penalty(only_empty, 1.0, 1.0).item() == 0.0
        assert pyreg.prox_(only_empty, 1.0).tolist() == [0, 0]


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
def _opcheck_cases():
    ts = random_list(torch.float32, seed=14)[1:8]
    n = len(ts)
    c = torch.rand(n, dtype=torch.float64)
    gs = [torch.randn_like(t) for t in ts]
    return [
        (torch.ops.pyreg.weight_stats.default, (ts,)),
        (torch.ops.pyreg.penalty.default, ([t.clone().requires_grad_() for t in ts], c, c)),
        (torch.ops.pyreg.add_penalty_grad_.default, (ts, gs, c, c)),
        (torch.ops.pyreg.prox_.default, ([t.clone() for t in ts], c, c, c)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(4), ids=["weight_stats", "penalty", "add_penalty_grad_", "prox_"])
def test_opcheck(backend, case):
    op, args = _opcheck_cases()[case]
    with pyreg.use_backend(backend):
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
    nnz_op = torch.ops.pyreg.prox_(b, c(0.3), c(0.1), c(0.5))
    assert torch.equal(nnz_fast, nnz_op)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g1, g2 = [g.clone() for g in gs], [g.clone() for g in gs]
    v_fast = pyreg.add_penalty_grad_(ts, g1, l1=0.2, l2=0.05)
    v_op = torch.ops.pyreg.add_penalty_grad_(ts, g2, c(0.2), c(0.05))
    assert torch.equal(v_fast, v_op) and all(torch.equal(x, y) for x, y in zip(g1, g2))
    assert all(torch.equal(x, y) for x, y in zip(pyreg.weight_stats(ts), torch.ops.pyreg.weight_stats(ts)))
    assert torch.equal(pyreg.penalty(ts, 0.2, 0.05), torch.ops.pyreg.penalty(ts, c(0.2), c(0.05)))

    w = torch.randn(64, requires_grad=True)
    h = w * 1.5                      # saved by the square below
    loss = h.square().sum()
    version = h._version
    g = torch.zeros(64)
    pyreg.add_penalty_grad_([torch.randn(64)], [g], l1=0.1)
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
