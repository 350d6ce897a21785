"""pyreg's CUDA kernels (csrc/cuda/kernels.cu) against the float64 reference and
the compiled CPU kernels, on each build of them:

- ``cuda``: the GPU build, on CUDA tensors (skipped without a usable GPU or in
  a build without CUDA kernels);
- ``cuda-emu``: the same kernels built against the CUDA emulator, on CPU
  tensors (skipped in a build without ``PYREG_CUDA_EMU=ON``; CI builds it).

Tests of what only a GPU has (streams, graph capture, host syncs, several
GPUs, more than 2^31 elements) run on ``cuda`` alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import pyreg
from pyreg import backends
from pyreg.backends import torch_ref
from pyreg.backends._marshal import is_dense

from conftest import (DTYPE_IDS, DTYPES, ELEMENTWISE_TOL, REDUCTION_TOL, as_f64, needs_emu,
                      random_list)

# A GPU torch can use and a build with CUDA kernels, yet no usable cuda backend
# (driver too old for the runtime, no kernel image for this GPU...): that is a
# failure to report, not a reason to skip.
_GPU_AND_KERNELS = torch.cuda.is_available() and backends.get("cuda").compiled()
needs_gpu = pytest.mark.skipif(not _GPU_AND_KERNELS,
                               reason="no usable CUDA GPU / pyreg built without CUDA")

CPU = backends.cpu


@pytest.fixture(params=[pytest.param(("cuda", "cuda"), marks=needs_gpu, id="cuda"),
                        pytest.param(("cuda-emu", "cpu"), marks=needs_emu, id="cuda-emu")])
def K(request):
    """The CUDA kernels under test: backend ``be`` on device ``dev``."""
    name, dev = request.param
    return SimpleNamespace(name=name, be=backends.get(name), dev=dev)


@pytest.fixture
def GPU_K():
    """The GPU build alone, for what only a GPU has."""
    if not _GPU_AND_KERNELS:
        pytest.skip("no usable CUDA GPU / pyreg built without CUDA")
    return SimpleNamespace(name="cuda", be=backends.get("cuda"), dev="cuda")


# Elementwise tolerances (fp32 elementwise 1e-5 here: the
# kernels may contract into FMAs where the reference rounds twice).
ELEM_TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}
# add_penalty_grad outputs (an optimizer-step-like g + small term): in 16 bit a
# result that cancels to near 0 carries the rounding of its inputs' size.
GRAD_TOL = dict(ELEM_TOL)
GRAD_TOL[torch.float16] = dict(rtol=1e-3, atol=5e-3)
GRAD_TOL[torch.bfloat16] = dict(rtol=1.6e-2, atol=5e-3)

EMPTY = (0, 3, 10)  # indices of the empty tensors in cuda_list()


def cuda_list(dtype, seed, device, scale=1.0):
    """conftest.random_list on ``device``, with a misaligned (storage offset 1)
    and a permuted view too."""
    return random_list(dtype, seed, device, scale, more_layouts=True)


def like_list(ts, dtype, seed):
    """Random tensors with the shapes and strides of ts (grads for ts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        x = torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)
        if is_dense(t):
            y = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
        else:
            y = torch.empty(t.shape, dtype=dtype, device=t.device)
        out.append(y.copy_(x))
    return out


def coef_tensors(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, generator=g, dtype=torch.float64).to(device) for _ in range(3))


def to_cpu(ts):
    return [t.detach().to("cpu", copy=True) for t in ts]  # always a copy


def rdtype(ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(iv), b.contiguous().view(iv))
    return torch.equal(a, b)


# --------------------------------------------------------------------------- basics
def test_backend_is_compiled_and_selected(K):
    assert K.be.compiled() and K.be.available(), K.be.unavailable_reason()
    assert K.be.why_not(torch.device(K.dev)) == ""
    assert K.be.archs() != ""
    if K.name == "cuda":
        assert pyreg._lib._C.cuda_runtime_error() == ""
        assert pyreg.backend_name("cuda") == "cuda"
        assert pyreg._lib._C.cuda_device_count() == torch.cuda.device_count()
    else:  # never chosen automatically: only by use_backend
        assert K.be.archs() == "emulated"
        assert pyreg.backend_name("cpu") == "cpu"
        with pyreg.use_backend("cuda-emu"):
            assert pyreg.backend_name("cpu") == "cuda-emu"


# --------------------------------------------------------------------------- weight_stats
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_stats(K, dtype):
    ts = cuda_list(dtype, 1, K.dev)
    got = K.be.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    cpu = CPU.weight_stats(to_cpu(ts))
    rd = rdtype(ts)
    for g, want, c in zip(got[:3], ref[:3], cpu[:3]):
        assert g.dtype == rd and g.shape == (len(ts),) and g.device.type == K.dev
        torch.testing.assert_close(g.cpu(), want.cpu().to(rd), **REDUCTION_TOL[dtype])
        torch.testing.assert_close(g.cpu(), c, **REDUCTION_TOL[dtype])
    assert got[3].dtype == torch.int64
    assert torch.equal(got[3].cpu(), ref[3].cpu()) and torch.equal(got[3].cpu(), cpu[3])
    # linf is exact (a max of exactly converted values)
    assert torch.equal(got[2].cpu(), ref[2].cpu().to(rd))
    for i in EMPTY:
        assert got[0][i] == 0 and got[1][i] == 0 and got[2][i] == 0 and got[3][i] == 0


def test_weight_stats_nan_inf_and_zeros(K):
    x = torch.tensor([0.0, -0.0, 1.0, float("nan"), -3.0], device=K.dev)
    y = torch.tensor([0.0, float("-inf"), 2.0], device=K.dev)
    z = torch.zeros(70000, device=K.dev)
    z[12345] = -5.0
    st = K.be.weight_stats([x, y, z])
    assert torch.isnan(st[0][0]) and torch.isnan(st[1][0]) and torch.isnan(st[2][0])
    assert st[0][1] == float("inf") and st[2][1] == float("inf")
    assert st[2][2] == 5.0 and st[0][2] == 5.0 and st[1][2] == 5.0
    assert st[3].tolist() == [3, 2, 1]  # NaN counts as nonzero, -0.0 does not


def test_norm_of_1e8_ones(GPU_K):
    K = GPU_K
    x = torch.ones(100_000_000, device=K.dev)
    st = K.be.weight_stats([x])
    assert st[0].item() == 1e8 and st[3].item() == 100_000_000
    assert abs(st[1].item() - 1e4) <= 1e-6 * 1e4


# --------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["scalar", "per_tensor"])
def test_penalty(K, dtype, kind):
    ts = cuda_list(dtype, 2, K.dev)
    n = len(ts)
    if kind == "scalar":
        l1 = torch.full((n,), 0.37, dtype=torch.float64, device=K.dev)
        l2 = torch.full((n,), 0.11, dtype=torch.float64, device=K.dev)
    else:
        l1, l2, _ = coef_tensors(n, 3, K.dev)
    got = K.be.penalty(ts, l1, l2)
    want = torch_ref.penalty(as_f64(ts), l1, l2)
    cpu = CPU.penalty(to_cpu(ts), l1.cpu(), l2.cpu())
    assert got.shape == () and got.dtype == rdtype(ts) and got.device.type == K.dev
    torch.testing.assert_close(got.cpu(), want.cpu().to(got.dtype), **REDUCTION_TOL[dtype])
    torch.testing.assert_close(got.cpu(), cpu, **REDUCTION_TOL[dtype])


def test_penalty_big_fp32_norm_is_accurate(K):
    g = torch.Generator(device=K.dev).manual_seed(0)
    x = torch.randn(30_000_000, device=K.dev, generator=g) * 3 + 1
    l1 = torch.tensor([0.5], dtype=torch.float64, device=K.dev)
    l2 = torch.tensor([0.25], dtype=torch.float64, device=K.dev)
    got = K.be.penalty([x], l1, l2)
    want = torch_ref.penalty([x.double()], l1, l2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    st = K.be.weight_stats([x])
    xd = x.double()
    torch.testing.assert_close(st[0][0].double(), xd.abs().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(st[1][0].double(), xd.square().sum().sqrt(), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- add_penalty_grad_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_penalty_grad(K, dtype):
    ts = cuda_list(dtype, 7, K.dev)
    gs = like_list(ts, dtype, seed=8)
    n = len(ts)
    l1, l2, _ = coef_tensors(n, 9, K.dev)
    want_g = [g.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
              for i, (w, g) in enumerate(zip(ts, gs))]
    want_v = torch_ref.penalty(as_f64(ts), l1, l2)
    cpu_ts, cpu_gs = to_cpu(ts), to_cpu(gs)
    cpu_v = CPU.add_penalty_grad_(cpu_ts, cpu_gs, l1.cpu(), l2.cpu())
    before = [w.clone() for w in ts]
    v = K.be.add_penalty_grad_(ts, gs, l1, l2)
    assert v.shape == () and v.dtype == rdtype(ts)
    torch.testing.assert_close(v.cpu(), want_v.cpu().to(v.dtype), **REDUCTION_TOL[dtype])
    torch.testing.assert_close(v.cpu(), cpu_v, **REDUCTION_TOL[dtype])
    for g, wg, cg in zip(gs, want_g, cpu_gs):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), wg.to(dtype).double().cpu(), **GRAD_TOL[dtype])
        torch.testing.assert_close(g.cpu(), cg, **GRAD_TOL[dtype])
    for w, b in zip(ts, before):  # weights are read, never written
        assert torch.equal(w, b)


def test_add_penalty_grad_sign_of_zero(K):
    w = torch.tensor([0.0, -0.0, 1.5, -2.0, 0.0], device=K.dev)
    g = torch.full_like(w, 0.25)
    one = torch.ones(1, dtype=torch.float64, device=K.dev)
    K.be.add_penalty_grad_([w], [g], one, torch.zeros_like(one))
    assert g.tolist() == [0.25, 0.25, 1.25, -0.75, 0.25]
    # -0.0 weight and grad: the same bits as the CPU kernels and the reference
    w, g = torch.tensor([-0.0, 0.0, -0.0]), torch.tensor([-0.0, -0.0, 0.0])
    cpu_g, ref_g = g.clone(), g.clone()
    cuda_g = g.to(K.dev)
    one_cpu = torch.ones(1, dtype=torch.float64)
    K.be.add_penalty_grad_([w.to(K.dev)], [cuda_g], one, one)
    CPU.add_penalty_grad_([w], [cpu_g], one_cpu, one_cpu)
    torch_ref.add_penalty_grad_([w], [ref_g], one_cpu, one_cpu)
    assert bits_equal(cuda_g.cpu(), cpu_g) and bits_equal(cpu_g, ref_g), (cuda_g, cpu_g, ref_g)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_grads_and_weights(K, dtype):
    # weights aligned, grads at storage offset 1 (and the reverse): scalar path
    n = 300_001
    g0 = torch.Generator().manual_seed(40)
    w_al = torch.randn(n, generator=g0, dtype=torch.float64).to(dtype).to(K.dev)
    w_mis = torch.randn(n + 1, generator=g0, dtype=torch.float64).to(dtype).to(K.dev)[1:]
    g_mis = torch.randn(n + 1, generator=g0, dtype=torch.float64).to(dtype).to(K.dev)[1:]
    g_al = torch.randn(n, generator=g0, dtype=torch.float64).to(dtype).to(K.dev)
    ts, gs = [w_al, w_mis], [g_mis, g_al]
    l1, l2, _ = coef_tensors(2, 41, K.dev)
    want_g = [g.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
              for i, (w, g) in enumerate(zip(ts, gs))]
    v = K.be.add_penalty_grad_(ts, gs, l1, l2)
    torch.testing.assert_close(v.double(), torch_ref.penalty(as_f64(ts), l1, l2), **REDUCTION_TOL[dtype])
    for g, wg in zip(gs, want_g):
        torch.testing.assert_close(g.double(), wg.to(dtype).double(), **GRAD_TOL[dtype])


# --------------------------------------------------------------------------- prox_
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["scalar", "per_tensor"])
def test_prox(K, dtype, kind):
    ts = cuda_list(dtype, 10, K.dev)
    n = len(ts)
    if kind == "scalar":
        l1, l2, lr = (torch.full((n,), v, dtype=torch.float64, device=K.dev) for v in (0.37, 0.11, 0.7))
    else:
        l1, l2, lr = coef_tensors(n, 11, K.dev)
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)  # float64 spec
    want = [w.to(dtype) for w in want]  # rounded once to the dtype
    cpu_ts = to_cpu(ts)
    cpu_nnz = CPU.prox_(cpu_ts, l1.cpu(), l2.cpu(), lr.cpu())
    base7 = ts[7]._base
    nnz = K.be.prox_(ts, l1, l2, lr)
    assert nnz.dtype == torch.int64 and nnz.shape == (n,) and nnz.device.type == K.dev
    zeros = 0
    for i, (w, ww, cw) in enumerate(zip(ts, want, cpu_ts)):
        assert w.dtype == dtype
        assert torch.equal(w == 0, ww == 0), f"zero pattern differs from the reference in tensor {i}"
        assert torch.equal((w == 0).cpu(), cw == 0), f"zero pattern differs from cpu in tensor {i}"
        torch.testing.assert_close(w.double(), ww.double(), **ELEM_TOL[dtype])
        torch.testing.assert_close(w.cpu(), cw, **ELEM_TOL[dtype])
        assert nnz[i] == torch.count_nonzero(w)
        zeros += int((w == 0).sum())
    assert torch.equal(nnz.cpu(), cpu_nnz)
    assert zeros > 50_000  # the threshold really cut
    assert base7 is not None and torch.equal(base7[:, ::2], ts[7])  # written through to the base


def test_prox_threshold_boundary_and_specials(K):
    w = torch.tensor([0.5, -0.5, 0.5000001, -0.4999999, float("nan"), float("inf"),
                      -float("inf"), 0.0], device=K.dev)
    c = lambda v: torch.tensor([v], dtype=torch.float64, device=K.dev)  # noqa: E731
    nnz = K.be.prox_([w], c(0.5), c(0.0), c(1.0))
    assert w[0] == 0 and w[1] == 0 and w[3] == 0 and w[7] == 0
    assert 0 < w[2] < 1e-6
    assert torch.isnan(w[4]) and w[5] == float("inf") and w[6] == -float("inf")
    assert int(nnz[0]) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_prox_threshold_not_representable(K, dtype):
    # t = lr*l1 between two representable values: |w| <= t in float64 decides.
    t = 0.1  # not representable in any of these dtypes
    vals = torch.tensor([0.1], dtype=torch.float64).to(dtype)
    lo = torch.nextafter(vals, torch.tensor([0.0]).to(dtype)) if dtype == torch.float32 else vals
    x = torch.cat([vals, -vals, lo, torch.linspace(0.05, 0.15, 5001, dtype=torch.float64).to(dtype)]).to(K.dev)
    ref = x.double()
    c = lambda v: torch.tensor([v], dtype=torch.float64, device=K.dev)  # noqa: E731
    torch_ref.prox_([ref], c(t), c(0.0), c(1.0))
    K.be.prox_([x], c(t), c(0.0), c(1.0))
    assert torch.equal(x == 0, ref.to(dtype) == 0)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitwise_deterministic(K, dtype):
    ts = cuda_list(dtype, 20, K.dev) + [torch.randn(5_000_001, device=K.dev).to(dtype)]
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 21, K.dev)
    a = K.be.weight_stats(ts)
    b = K.be.weight_stats(ts)
    assert all(bits_equal(x, y) for x, y in zip(a, b))
    assert bits_equal(K.be.penalty(ts, l1, l2), K.be.penalty(ts, l1, l2))
    g0 = like_list(ts, dtype, seed=22)
    ga, gb = [g.clone() for g in g0], [g.clone() for g in g0]
    va = K.be.add_penalty_grad_(ts, ga, l1, l2)
    vb = K.be.add_penalty_grad_(ts, gb, l1, l2)
    assert bits_equal(va, vb) and all(bits_equal(x, y) for x, y in zip(ga, gb))
    wa, wb = [t.clone() for t in ts], [t.clone() for t in ts]
    na, nb = K.be.prox_(wa, l1, l2, lr), K.be.prox_(wb, l1, l2, lr)
    assert torch.equal(na, nb) and all(bits_equal(x, y) for x, y in zip(wa, wb))


# --------------------------------------------------------------------------- streams and graphs
def test_non_default_stream(GPU_K):
    K = GPU_K
    ts = cuda_list(torch.float32, 30, K.dev)
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 31, K.dev)
    gs = like_list(ts, torch.float32, seed=32)
    ref_st = K.be.weight_stats(ts)
    ref_v = K.be.penalty(ts, l1, l2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        st = K.be.weight_stats(ts)
        v = K.be.penalty(ts, l1, l2)
        gv = K.be.add_penalty_grad_(ts, gs, l1, l2)
        pw = [t.clone() for t in ts]
        nnz = K.be.prox_(pw, l1, l2, lr)
    s.synchronize()
    assert all(bits_equal(x, y) for x, y in zip(st, ref_st))
    assert bits_equal(v, ref_v)
    torch.testing.assert_close(gv, ref_v, rtol=1e-12, atol=0)
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in pw]))


def test_cuda_graph_capture_and_replay(GPU_K):
    K = GPU_K
    dtype = torch.float32
    ts = cuda_list(dtype, 33, K.dev) + [torch.randn(3, 5, device=K.dev, dtype=torch.bfloat16)]
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 34, K.dev)
    g_init = like_list(ts, dtype, seed=35)[:-1] + [torch.randn(3, 5, device=K.dev, dtype=torch.bfloat16)]
    p_init = [t.clone() for t in ts]
    gs = [g.clone() for g in g_init]
    pw = [t.clone() for t in ts]

    def reset():
        for g, gi in zip(gs, g_init):
            g.copy_(gi)
        for p, pi in zip(pw, p_init):
            p.copy_(pi)

    def step():
        st = K.be.weight_stats(ts)
        v = K.be.penalty(ts, l1, l2)
        gv = K.be.add_penalty_grad_(ts, gs, l1, l2)
        nnz = K.be.prox_(pw, l1, l2, lr)
        return (*st, v, gv, nnz)

    eager = [x.clone() for x in step()]
    eager_g = [g.clone() for g in gs]
    eager_p = [p.clone() for p in pw]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graph asks
            reset()
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):  # replays are repeatable
        reset()
        graph.replay()
        torch.cuda.synchronize()
        assert all(bits_equal(a, b) for a, b in zip(out, eager))
        assert all(bits_equal(a, b) for a, b in zip(gs, eager_g))
        assert all(bits_equal(a, b) for a, b in zip(pw, eager_p))


def test_graph_capture_rejects_host_coefficients(GPU_K):
    K = GPU_K
    # A list or a CPU tensor is host data: copied during capture, each replay
    # would reuse one stale host buffer. A clear error before capture breaks,
    # and nothing written.
    ts = [torch.randn(100, device=K.dev)]
    before = ts[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pyreg.prox_(ts, l1=0.1, lr=0.1)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    before = ts[0].clone()
    for l1, what in (([0.1], "a sequence of numbers"), (torch.tensor([0.1]), "a CPU tensor")):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match=f"l1 is {what}: .*CUDA graph capture"):
            with torch.cuda.graph(graph):
                pyreg.prox_(ts, l1=l1, lr=0.1)
        assert torch.equal(ts[0], before)
    graph = torch.cuda.CUDAGraph()  # numbers and device tensors capture
    l1 = torch.tensor([0.1], device=K.dev)  # made before capture: a host copy cannot be captured
    with torch.cuda.graph(graph):
        pyreg.prox_(ts, l1=l1, l2=0.01, lr=0.1)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(ts[0], before)


# --------------------------------------------------------------------------- sizes and lists
def test_no_host_sync_on_the_hot_path(GPU_K):
    K = GPU_K
    # In sync-debug mode "error" torch raises on every host<->device sync. The
    # ops, with every kind of coefficient (numbers; lists and CPU tensors go
    # through pinned memory), and Regularized steps whose per-group lrs a
    # scheduler changes every step (a new per-tensor lr tensor each step), with
    # a CPU tensor lr and an l1 changed between steps: none may sync.
    ts = cuda_list(torch.float32, 40, K.dev)
    n = len(ts)
    gs = like_list(ts, torch.float32, seed=41)
    coefs = [0.01, [0.01] * n, torch.full((n,), 0.01), torch.full((n,), 0.01, device=K.dev)]
    torch.manual_seed(42)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(K.dev)
    x, y = torch.randn(16, 7, device=K.dev), torch.randn(16, 3, device=K.dev)

    def make(lr_b):
        inner = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.1, "l1": 1e-3},
                                 {"params": [model[2].weight], "lr": lr_b, "l1": 2e-3, "l2": 1e-3},
                                 {"params": [model[0].bias, model[2].bias], "lr": 0.1}], momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda k: 0.9 ** k)
        return [(pyreg.Regularized(inner, mode=m), sched) for m in ("proximal", "gradient")]

    runs = make(0.05) + make(torch.tensor(0.05))  # float lrs; a CPU tensor lr

    def everything(k):
        outs = []
        for c in coefs:
            outs += list(pyreg.weight_stats(ts))
            outs.append(pyreg.penalty(ts, c, c))
            outs.append(pyreg.add_penalty_grad_(ts, gs, c, c))
            outs.append(pyreg.prox_([t.clone() for t in ts], c, c, c))
        for opt, sched in runs:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            opt.param_groups[0]["l1"] = 1e-3 * (k + 1)
            outs.append(opt.penalty)
        return outs

    everything(0)  # warm-up: kernel modules, allocator pools, pinned blocks
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, 4):
            outs = everything(k)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(o).all()) for o in outs if o.is_floating_point())


def test_more_than_2_31_elements(GPU_K):
    K = GPU_K
    n = 2**31 + 1
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n + (1 << 30):
        pytest.skip(f"needs ~5 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.ones(n, dtype=torch.bfloat16, device=K.dev)
    x[-1] = 2.0
    x[2**31 - 7] = -3.0
    z = torch.zeros(1, dtype=torch.float64, device=K.dev)
    st = K.be.weight_stats([x, z])  # float64 results: exact here
    ones = 2**31 - 1  # n - 2 elements are 1
    assert st[0][0].item() == float(ones) + 2.0 + 3.0
    assert st[1][0].item() == (float(ones) + 4.0 + 9.0) ** 0.5
    assert st[2][0].item() == 3.0 and st[3][0].item() == n and st[3][1].item() == 0
    c = lambda v: torch.tensor([v, v], dtype=torch.float64, device=K.dev)  # noqa: E731
    nnz = K.be.prox_([x, z], c(1.5), c(0.0), c(1.0))  # ones -> 0, 2 -> 0.5, -3 -> -1.5
    assert nnz.tolist() == [2, 0]
    assert x[-1].item() == 0.5 and x[2**31 - 7].item() == -1.5
    assert x[2**31 - 8].item() == 0 and x[2**31 - 1].item() == 0 and x[0].item() == 0
    del x


def test_many_tensors_mixed_dtypes_and_sizes(K):
    # > 3000 tensors: several launches of by-value metadata, plus a couple of
    # multi-chunk tensors and empty tensors scattered between full ones.
    g = torch.Generator().manual_seed(50)
    sizes = torch.randint(0, 300, (3100,), generator=g).tolist()
    for i in range(0, 3100, 7):
        sizes[i] = 0
    sizes[119], sizes[120], sizes[1777] = 200_003, 65_536, 131_073
    dts = [DTYPES[i % 4] for i in range(len(sizes))]
    ts = [(torch.randn(s, generator=g, dtype=torch.float64)).to(d).to(K.dev) for s, d in zip(sizes, dts)]
    n = len(ts)
    l1, l2, lr = coef_tensors(n, 51, K.dev)
    st = K.be.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    assert st[0].dtype == torch.float64  # some tensors are float64
    for got, want in zip(st[:3], ref[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(st[3], ref[3])
    v = K.be.penalty(ts, l1, l2)
    torch.testing.assert_close(v, torch_ref.penalty(as_f64(ts), l1, l2), rtol=1e-5, atol=1e-5)
    gs = [torch.randn(s, generator=g, dtype=torch.float64).to(d).to(K.dev) for s, d in zip(sizes, dts)]
    gw = [gg.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
          for i, (w, gg) in enumerate(zip(ts, gs))]
    gv = K.be.add_penalty_grad_(ts, gs, l1, l2)
    torch.testing.assert_close(gv, v, rtol=1e-12, atol=0)
    for gg, want, d in zip(gs, gw, dts):
        torch.testing.assert_close(gg.double(), want.to(d).double(), **GRAD_TOL[d])
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    nnz = K.be.prox_(ts, l1, l2, lr)
    for i, (w, ww) in enumerate(zip(ts, want)):
        assert torch.equal(w == 0, ww.to(w.dtype) == 0), f"tensor {i}"
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in ts]))


def test_chunk_size_boundaries(K):
    # Tensors under 2**22 elements use 16384-element chunks, larger ones 65536:
    # sizes on each side of both chunk sizes and of the switch.
    g = torch.Generator().manual_seed(60)
    sizes = [16383, 16384, 16385, 65535, 65537, 2**22 - 1, 2**22, 2**22 + 1, 3 * 65536 + 5]
    ts = [torch.randn(s, generator=g, dtype=torch.float64).float().to(K.dev) for s in sizes]
    st, ref = K.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts))
    for got, want in zip(st[:3], ref[:3]):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(st[3], ref[3])
    l1, l2, lr = coef_tensors(len(ts), 61, K.dev)
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    nnz = K.be.prox_(ts, l1, l2, lr)
    for w, ww in zip(ts, want):
        torch.testing.assert_close(w.double(), ww.float().double(), **ELEM_TOL[torch.float32])
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in ts]))


def test_results_of_a_tensor_do_not_depend_on_its_neighbours(K):
    # Chunking depends only on each tensor's own size.
    g = torch.Generator().manual_seed(62)
    x = torch.randn(300_001, generator=g).to(K.dev)
    alone = K.be.weight_stats([x])
    with_big = K.be.weight_stats([torch.randn(2**22 + 3, generator=g).to(K.dev), x,
                                  torch.randn(17, generator=g).to(K.dev)])
    for a, b in zip(alone, with_big):
        assert bits_equal(a[0], b[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_number_coefficients_equal_tensor_coefficients_bitwise(K, dtype):
    # Numbers reach the kernels by value, tensors through device memory.
    ts = cuda_list(dtype, 63, K.dev, 0.5)
    n = len(ts)
    full = lambda v: torch.full((n,), v, dtype=torch.float64, device=K.dev)  # noqa: E731
    assert bits_equal(K.be.penalty(ts, 0.3, 0.1), K.be.penalty(ts, full(0.3), full(0.1)))
    g1, g2 = like_list(ts, dtype, 64), like_list(ts, dtype, 64)
    assert bits_equal(K.be.add_penalty_grad_(ts, g1, 0.3, 0.1),
                      K.be.add_penalty_grad_(ts, g2, full(0.3), full(0.1)))
    assert all(bits_equal(a, b) for a, b in zip(g1, g2))
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    assert torch.equal(K.be.prox_(a, 0.3, 0.1, 0.5), K.be.prox_(b, full(0.3), full(0.1), full(0.5)))
    assert all(bits_equal(x, y) for x, y in zip(a, b))


def test_only_empty_and_zero_dim(K):
    only_empty = [torch.empty(0, device=K.dev), torch.empty(3, 0, device=K.dev)]
    st = K.be.weight_stats(only_empty)
    assert all(x.tolist() == [0, 0] for x in st)
    c = torch.ones(2, dtype=torch.float64, device=K.dev)
    assert K.be.penalty(only_empty, c, c).item() == 0.0
    assert K.be.add_penalty_grad_(only_empty, [t.clone() for t in only_empty], c, c).item() == 0.0
    assert K.be.prox_(only_empty, c, c, c).tolist() == [0, 0]
    x = torch.tensor(-2.0, device=K.dev)
    st = K.be.weight_stats([x])
    assert st[0].item() == 2.0 and st[1].item() == 2.0 and st[2].item() == 2.0 and st[3].item() == 1
    one = torch.ones(1, dtype=torch.float64, device=K.dev)
    assert K.be.prox_([x], one, 0 * one, one).item() == 1 and x.item() == -1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_other_device_keeps_current_device(GPU_K):
    K = GPU_K
    with torch.cuda.device(0):
        ts = [torch.randn(1000, device="cuda:1")]
        st = K.be.weight_stats(ts)
        assert torch.cuda.current_device() == 0
        assert st[0].device == torch.device("cuda:1")
        torch.testing.assert_close(st[0], ts[0].abs().sum().reshape(1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- public API
def test_public_api_uses_cuda_backend(K):
    if K.name == "cuda":
        assert pyreg.backend_name(K.dev) == "cuda"
    with pyreg.use_backend(K.name):
        _public_api_checks(K)


def _public_api_checks(K):
    ts = cuda_list(torch.float32, 60, K.dev)
    st = pyreg.weight_stats(ts)
    ref = torch_ref.weight_stats(as_f64(ts))
    assert isinstance(st, pyreg.WeightStats) and st.l1.device.type == K.dev
    torch.testing.assert_close(st.l2, ref.l2.float(), **REDUCTION_TOL[torch.float32])
    assert torch.equal(st.nnz, ref.nnz)

    ws = [t.clone().requires_grad_() for t in ts]
    v = pyreg.penalty(ws, l1=0.1, l2=0.01)
    assert v.device.type == K.dev
    torch.testing.assert_close(v.double(), torch_ref.penalty(
        as_f64(ts), torch.full((len(ts),), 0.1, dtype=torch.float64, device=K.dev),
        torch.full((len(ts),), 0.01, dtype=torch.float64, device=K.dev)), rtol=1e-5, atol=1e-5)
    (2.0 * v).backward()
    for w in ws:
        x = w.detach().double()
        want = 2.0 * (0.1 * torch.sign(x) + 2 * 0.01 * x)
        torch.testing.assert_close(w.grad.double(), want, **ELEMENTWISE_TOL[torch.float32])

    gs = [torch.zeros_like(t) for t in ts]
    v2 = pyreg.add_penalty_grad_(ts, gs, l1=0.1, l2=0.01)
    torch.testing.assert_close(v2, v.detach(), rtol=1e-6, atol=1e-6)
    for w, g in zip(ts, gs):
        x = w.double()
        torch.testing.assert_close(g.double(), (0.1 * torch.sign(x) + 0.02 * x).float().double(),
                                   **ELEM_TOL[torch.float32])

    pw = [t.clone() for t in ts]
    nnz = pyreg.prox_(pw, l1=0.5, l2=0.1, lr=0.9)
    want = as_f64(ts)
    n = len(ts)
    full = lambda v: torch.full((n,), v, dtype=torch.float64, device=K.dev)  # noqa: E731
    torch_ref.prox_(want, full(0.5), full(0.1), full(0.9))
    for w, ww in zip(pw, want):
        assert torch.equal(w == 0, ww.float() == 0)
        torch.testing.assert_close(w.double(), ww.float().double(), **ELEM_TOL[torch.float32])
    assert nnz.device.type == K.dev and torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in pw]))


# --------------------------------------------------------------------------- launches
@pytest.mark.parametrize("n", [119, 120, 121, 239, 240, 241])
def test_batch_boundaries(K, n):
    # Up to 120 tensors travel by value in one launch: lists on each side of
    # one and two batch boundaries, mixed dtypes and sizes, empty tensors and
    # a multi-chunk tensor next to the boundary, against the float64 spec and
    # the CPU kernels.
    g = torch.Generator().manual_seed(70 + n)
    sizes = torch.randint(1, 700, (n,), generator=g).tolist()
    sizes[n // 3] = 0
    sizes[118] = 40_000  # 3 chunks: the last tensor of the first batch, or next to it
    sizes[-1] = 16_385
    dts = [DTYPES[i % 4] for i in range(n)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(d).to(K.dev) for s, d in zip(sizes, dts)]
    l1, l2, lr = coef_tensors(n, 71, K.dev)
    st, ref, cpu = K.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts)), CPU.weight_stats(to_cpu(ts))
    for got, want, c in zip(st[:3], ref[:3], cpu[:3]):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cpu(), c, rtol=1e-5, atol=1e-5)
    assert torch.equal(st[3].cpu(), ref[3].cpu()) and torch.equal(st[3].cpu(), cpu[3])
    v = K.be.penalty(ts, l1, l2)
    torch.testing.assert_close(v.cpu(), torch_ref.penalty(as_f64(ts), l1, l2).cpu(), rtol=1e-5, atol=1e-5)
    gs = like_list(ts, torch.float32, 72)
    gs = [x.to(d) for x, d in zip(gs, dts)]
    want_g = [x.double() + (l1[i] * torch.sign(w.double()) + 2 * l2[i] * w.double())
              for i, (w, x) in enumerate(zip(ts, gs))]
    torch.testing.assert_close(K.be.add_penalty_grad_(ts, gs, l1, l2), v, rtol=1e-12, atol=0)
    for x, wg, d in zip(gs, want_g, dts):
        torch.testing.assert_close(x.double(), wg.to(d).double(), **GRAD_TOL[d])
    want = as_f64(ts)
    torch_ref.prox_(want, l1, l2, lr)
    cpu_ts = to_cpu(ts)
    cpu_nnz = CPU.prox_(cpu_ts, l1.cpu(), l2.cpu(), lr.cpu())
    nnz = K.be.prox_(ts, l1, l2, lr)
    for i, (w, ww, cw) in enumerate(zip(ts, want, cpu_ts)):
        assert torch.equal(w == 0, ww.to(w.dtype) == 0), f"tensor {i}: zero pattern differs from the spec"
        assert torch.equal((w == 0).cpu(), cw == 0), f"tensor {i}: zero pattern differs from cpu"
        torch.testing.assert_close(w.cpu(), cw, **ELEM_TOL[w.dtype])
    assert torch.equal(nnz.cpu(), cpu_nnz)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sums_beyond_float32_range(K, dtype):
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
    ts = [t.to(K.dev) for t in ts]
    st, ref = K.be.weight_stats(ts), torch_ref.weight_stats(as_f64(ts))
    for got, want in zip(st[:3], ref[:3]):
        assert got.dtype == torch.float32
        # in float64 terms: the float32 results are the float64 sums rounded
        torch.testing.assert_close(got.double(), want.float().double(), rtol=1e-5, atol=0)
    assert torch.equal(st[3].cpu(), ref[3].cpu())
    c = torch.tensor([1e-12, 1e25, 1.0, 1.0], dtype=torch.float64, device=K.dev)
    v = K.be.penalty(ts[:3], c[:3], c[:3])
    torch.testing.assert_close(v.double(), torch_ref.penalty(as_f64(ts[:3]), c[:3], c[:3]).float().double(),
                               rtol=1e-5, atol=0)
    assert K.be.penalty(ts, c, c).item() == float("inf")


def test_host_values_are_read_when_the_call_is_made(GPU_K):
    # to_device copies host values asynchronously; even a pinned float64 tensor
    # (which .to() would hand over as is) goes through a buffer of its own, so
    # changing it right after the call does not change what reaches the GPU.
    from pyreg._common import to_device

    src = torch.arange(1 << 20, dtype=torch.float64).pin_memory()
    want = src.clone()
    torch.cuda._sleep(200_000_000)  # keep the stream busy: the copy waits behind it
    out = to_device(src, torch.float64, torch.device("cuda"))
    src.fill_(-1.0)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), want)
