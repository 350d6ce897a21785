"""What is CUDA-specific: the builds of the CUDA kernels are found and chosen
(``cuda`` automatically on GPUs, ``cuda-emu`` only when forced), and what only
a GPU has: streams, graph capture, no host syncs, several devices, more than
2^31 elements. The CUDA kernels' results, on ``cuda`` and ``cuda-emu``, are
tested with every other backend's in test_ops.py."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import pyreg
from pyreg import backends

from conftest import TWO_KERNEL_SUMS, bits_equal, coef_tensors, like_list, needs_emu, needs_gpu, random_list

_GPU_AND_KERNELS = torch.cuda.is_available() and backends.get("cuda").compiled()


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


def test_norm_of_1e8_ones(GPU_K):
    K = GPU_K
    x = torch.ones(100_000_000, device=K.dev)
    st = K.be.weight_stats([x])
    assert st[0].item() == 1e8 and st[3].item() == 100_000_000
    assert abs(st[1].item() - 1e4) <= 1e-6 * 1e4


def test_non_default_stream(GPU_K):
    K = GPU_K
    ts = random_list(torch.float32, 30, K.dev, more_layouts=True)
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
    torch.testing.assert_close(gv, ref_v, **TWO_KERNEL_SUMS)
    assert torch.equal(nnz, torch.stack([torch.count_nonzero(w) for w in pw]))


def test_cuda_graph_capture_and_replay(GPU_K):
    K = GPU_K
    dtype = torch.float32
    ts = random_list(dtype, 33, K.dev, more_layouts=True) + [torch.randn(3, 5, device=K.dev, dtype=torch.bfloat16)]
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


def test_no_host_sync_on_the_hot_path(GPU_K):
    K = GPU_K
    # In sync-debug mode "error" torch raises on every host<->device sync. The
    # ops, with every kind of coefficient (numbers; lists and CPU tensors go
    # through pinned memory), and Regularized steps whose per-group lrs a
    # scheduler changes every step (a new per-tensor lr tensor each step), with
    # a CPU tensor lr and an l1 changed between steps, the structured ops and
    # keys (group lasso, max-norm, toward a reference) included: none may sync.
    ts = random_list(torch.float32, 40, K.dev, more_layouts=True)
    n = len(ts)
    gs = like_list(ts, torch.float32, seed=41)
    coefs = [0.01, [0.01] * n, torch.full((n,), 0.01), torch.full((n,), 0.01, device=K.dev)]
    torch.manual_seed(42)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(K.dev)
    x, y = torch.randn(16, 7, device=K.dev), torch.randn(16, 3, device=K.dev)

    def make(lr_b):
        inner = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.1, "l1": 1e-3,
                                  "group_l1": 1e-2, "max_norm": 3.0},
                                 {"params": [model[2].weight], "lr": lr_b, "l1": 2e-3, "l2": 1e-3,
                                  "ref": [model[2].weight.detach().clone()]},
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
            outs.append(pyreg.prox_([t.clone() for t in ts], c, c, c, ref=gs))
            outs.append(pyreg.penalty(ts, c, c, ref=gs))
            mats = [t for t in ts if t.dim() == 2]
            mc = c[:len(mats)] if isinstance(c, (list, torch.Tensor)) else c
            outs += pyreg.group_norms(mats, dim=1)
            outs.append(pyreg.group_penalty(mats, mc, dim=0))
            outs.append(pyreg.group_prox_([t.clone() for t in mats], mc, 1.0, dim=1, element_l1=mc, l2=mc))
            outs.append(pyreg.max_norm_([t.clone() for t in mats], mc, dim=0))
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_other_device_keeps_current_device(GPU_K):
    K = GPU_K
    with torch.cuda.device(0):
        ts = [torch.randn(1000, device="cuda:1")]
        st = K.be.weight_stats(ts)
        assert torch.cuda.current_device() == 0
        assert st[0].device == torch.device("cuda:1")
        torch.testing.assert_close(st[0], ts[0].abs().sum().reshape(1), rtol=1e-5, atol=1e-5)


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


# --------------------------------------------------------------------------- fused optimizers


def _fused_model(dev):
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(9, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dev)


def test_fused_optimizers_no_host_sync(GPU_K):
    """Fused steps with a scheduler changing lr every step, l1 changed between
    steps, a GPU tensor lr, amsgrad, nesterov, preconditioned: no host sync."""
    model = _fused_model(GPU_K.dev)
    x, y = torch.randn(16, 9, device=GPU_K.dev), torch.randn(16, 2, device=GPU_K.dev)
    groups = lambda: pyreg.param_groups(model, l1=1e-3, l2=1e-4)  # noqa: E731
    opts = [pyreg.optim.AdamW(groups(), lr=1e-2, amsgrad=True, preconditioned=True),
            pyreg.optim.SGD(groups(), lr=1e-2, momentum=0.9, nesterov=True),
            pyreg.optim.Adagrad(groups(), lr=1e-2, preconditioned=True),
            pyreg.optim.Adam(groups(), lr=torch.tensor(1e-2, device=GPU_K.dev), capturable=True)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9 ** k) for o in opts[:3]]

    def steps(k):
        for o in opts:
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
            o.param_groups[0]["l1"] = 1e-3 * (k + 1)
        for s in scheds:
            s.step()

    steps(0)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, 4):
            steps(k)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(o.state[model[0].weight]["step"].device.type == "cuda" for o in opts if "step" in o.state[model[0].weight])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad"])
def test_fused_optimizer_step_captured_in_a_cuda_graph(GPU_K, name):
    """A whole training step with a fused optimizer, captured and replayed,
    computes what the same steps compute eagerly (step counters included)."""
    x, y = torch.randn(16, 9, device=GPU_K.dev), torch.randn(16, 2, device=GPU_K.dev)
    kw = dict(momentum=0.9) if name == "SGD" else {}

    def make():
        model = _fused_model(GPU_K.dev)
        return model, getattr(pyreg.optim, name)(pyreg.param_groups(model, l1=1e-3), lr=1e-2, **kw)

    def train_step(model, opt):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    eager_model, eager_opt = make()
    for _ in range(5):
        train_step(eager_model, eager_opt)
    model, opt = make()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: state exists before capture
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if name != "SGD":
            assert float(opt.state[a]["step"]) == 5.0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_fused_optimizer_captured_at_gpt2_shapes(GPU_K, name):
    """Each fused optimizer at GPT-2's 148 tensor shapes (124M elements:
    tensors cut into many chunks, all in one launch), captured after warm-up
    steps and replayed, leaves the bits that the same steps leave eagerly:
    the shapes at which the bench times captured steps."""
    from pyreg.bench import shapes as S

    gen = torch.Generator(device=GPU_K.dev).manual_seed(3)
    shapes = [s for _, s in S.get("gpt2").shapes]
    w0 = [torch.randn(s, generator=gen, device=GPU_K.dev) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen, device=GPU_K.dev) * 1e-3 for s in shapes]
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=1e-3)

    def make():
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        for p, g in zip(ps, grads):  # read only: shared
            p.grad = g
        return ps, getattr(pyreg.optim, name)(ps, l1=1e-3, **kw)

    eager, eager_opt = make()
    for _ in range(6):
        eager_opt.step()
    ps, opt = make()
    for _ in range(2):
        opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()  # a fault surfaces at its own replay
    for i, (a, b) in enumerate(zip(ps, eager)):
        assert torch.equal(a, b), (i, tuple(a.shape), float((a - b).abs().max()))
    if name != "SGD":
        assert {float(opt.state[p]["step"]) for p in ps} == {6.0}


# --------------------------------------------------------------------------- the ops' fast path


def _forced(K):
    """The emulator is used only when forced; the GPU build is chosen for GPU tensors."""
    return pyreg.use_backend("cuda-emu") if K.name == "cuda-emu" else contextlib.nullcontext()


def _every_op(ts, gs):
    """Each op with a fast path, on (clones of) ``ts`` and ``gs``: every result and every written tensor."""
    ws, grads = [t.clone() for t in ts], [g.clone() for g in gs]
    out = [*pyreg.weight_stats(ws), pyreg.penalty(ws, 0.03, 0.2), pyreg.add_penalty_grad_(ws, grads, 0.03, 0.2),
           pyreg.kth_abs(ws, [2, 5, 100]), pyreg.prox_(ws, 0.5, 0.1, 0.7)]
    out += [pyreg.group_prox_(ws, 0.4, 0.5, dim=0, element_l1=0.05, l2=0.1), pyreg.max_norm_(ws, 1.5, dim=0)]
    return out + ws + grads


def test_ops_fast_path_runs_the_cuda_kernels(K, monkeypatch):
    """A plain list on the kernels' device goes through the ops' fast path
    (one check in C, pyreg._C.plain_list) to the same kernels as the general
    path, with the same bits; a list it does not take, a tensor coefficient
    on a GPU, or another backend forced leaves the call to the general path."""
    from pyreg import ops

    g = torch.Generator().manual_seed(11)
    ts = [(torch.randn(s, generator=g) * 2).to(K.dev) for s in ((7,), (30, 10), (64, 65))]
    gs = [torch.randn(t.shape, generator=g).to(K.dev) for t in ts]
    with _forced(K):
        fast = ops._fast(ts, True)
        assert fast is not None and fast[0] is K.be
        assert fast[1] == ([t.data_ptr() for t in ts], [t.numel() for t in ts], [fast[1][2][0]] * 3)
        assert fast[2] == (None if K.dev == "cpu" else ts[0].device)
        assert ops._fast(ts + [ts[1].t()], True) is None  # not contiguous
        assert ops._fast(ts + [ts[0][2:]], True) is None  # overlapping
        assert ops._fast(ts + [ts[0].double()]) is None  # two dtypes
        if K.dev != "cpu":
            assert ops._fast(ts + [torch.randn(3)]) is None  # two devices
            assert ops._fast_coefs(3, fast[2], 0.1, torch.ones(3, dtype=torch.float64)) is None
        with pyreg.use_backend("torch"):
            assert ops._fast(ts) is None
        fast_results = _every_op(ts, gs)
    monkeypatch.setattr(ops, "_fast", lambda *a, **k: None)
    with _forced(K):
        general = _every_op(ts, gs)
    assert len(fast_results) == len(general)
    for i, (a, b) in enumerate(zip(fast_results, general)):
        assert a.device == b.device and a.dtype == b.dtype and bits_equal(a.cpu(), b.cpu()), i


# --------------------------------------------------------------------------- 16-bit stores


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16bit_stores_round_like_the_cpu(K, dtype):
    """A kernel's float32 -> 16-bit store (the GPU's conversion instruction,
    the emulator's integer rounding) gives the CPU kernels' bits: values that
    round up, down and to even at ties, 16-bit subnormals, overflow to inf,
    and NaN where NaN went in. Reached through add_penalty_grad_ with l1 only:
    grad + l1 * sign(w), one float32 add, then the store."""
    g = torch.Generator().manual_seed(7)
    fi = torch.finfo(dtype)
    n = 40_000
    grads = (torch.randn(n, generator=g) * torch.logspace(-9, 4, n).pow(torch.rand(n, generator=g))).to(dtype)
    specials = torch.tensor([1.0, -1.0, fi.max, -fi.max, fi.tiny, fi.tiny * 0.5 if dtype == torch.float16 else fi.tiny,
                             0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    grads[: specials.numel()] = specials
    w = torch.randn(n, generator=g)
    # l1 values: a tie at 1 (half an ulp of 1), a quarter ulp, and an odd one.
    for l1 in (fi.eps / 2, fi.eps / 4, 3 * fi.eps / 4, 0.3371, fi.max / 8):
        ws = [w.to(dtype).to(K.dev)]
        got = [grads.clone().to(K.dev)]
        K.be.add_penalty_grad_(ws, got, float(l1), 0.0)
        want = [grads.clone()]
        backends.get("cpu").add_penalty_grad_([w.to(dtype)], want, float(l1), 0.0)
        a, b = got[0].cpu(), want[0]
        nan = b.isnan()
        assert bool((a.isnan() == nan).all()), f"l1={l1}: NaN in different places"
        assert bits_equal(a[~nan], b[~nan]), f"l1={l1}: {int((a[~nan].view(torch.int16) != b[~nan].view(torch.int16)).sum())} elements differ"
