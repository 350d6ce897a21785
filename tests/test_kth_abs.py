"""``pyreg.ops.kth_abs``, the selection behind ``target_sparsity`` and
``l1_strength``: against the spec (torch_ref, torch's kthvalue) and against
a sort, on every backend and dtype, every layout, ties, zeros, NaN and Inf;
bad input rejected; the emulated CUDA selection under every fiber order."""
from __future__ import annotations

import math

import pytest
import torch

import pyreg
from pyreg import backends, ops
from pyreg.backends import torch_ref

from conftest import DTYPE_IDS, DTYPES, ieee_sqrt, random_list, restore_threads  # noqa: F401


def by_sort(t: torch.Tensor, k: int, closest: bool) -> float:
    """The rule written out with a sort, in float64 (NaN last)."""
    a = t.detach().double().abs().flatten().cpu()
    if k == 0:
        return 0.0
    s = torch.cat([a[~a.isnan()].sort().values, a[a.isnan()]])
    kth = float(s[k - 1])
    if not closest or math.isnan(kth):
        return kth
    n_lt, n_le = int((a < kth).sum()), int((a <= kth).sum())
    lower = float(a[a < kth].max()) if n_lt else 0.0
    return lower if n_le - k > k - n_lt else kth


def same(got: torch.Tensor, want) -> bool:
    want = torch.as_tensor(want, dtype=torch.float64)
    got = got.cpu()
    return got.dtype == torch.float64 and torch.equal(got.isnan(), want.isnan()) and torch.equal(
        got.nan_to_num(), want.nan_to_num())


def ks_for(ts, seed):
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, t.numel() + 1, (), generator=g)) for t in ts]


@pytest.mark.parametrize("closest", [False, True], ids=["kth", "closest"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_the_spec_and_a_sort(B, dtype, closest):
    # Every layout of the op matrix: empty tensors, a 0-dim one, odd sizes up
    # to 278011, transposed, strided, misaligned and permuted views.
    ts = random_list(dtype, seed=5, device=B.dev, more_layouts=True)
    for seed in range(3):
        ks = ks_for(ts, seed)
        with pyreg.use_backend(B.name):
            got = ops.kth_abs(ts, ks, closest=closest)
        assert got.device.type == B.dev and got.shape == (len(ts),)
        assert same(got, torch_ref.kth_abs(ts, ks, closest).cpu())
        assert same(got, [by_sort(t, k, closest) for t, k in zip(ts, ks)])


def clustered(n: int, dtype: torch.dtype, kind: str, g: torch.Generator) -> torch.Tensor:
    """n weights (as many negative as positive) in one of the shapes that end
    a selection early or late: a tight cluster (values 1 to 40 units in the
    last place apart, what an optimizer step does to the weights a prox
    zeroed) among spread weights, two clusters, a few distinct values, one
    value, or values spread over every exponent."""
    one = torch.tensor(1e-3, dtype=dtype)
    ulp = one.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[one.element_size()])
    near = lambda m: (ulp + torch.randint(-40, 41, (m,), generator=g).to(ulp.dtype)).view(dtype)  # noqa: E731
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    if kind == "cluster":
        x[: n // 2] = near(n // 2)
    elif kind == "two clusters":
        x[: n // 3] = near(n // 3)
        x[n // 3: 2 * n // 3] = near(2 * n // 3 - n // 3) * 7
    elif kind == "few values":
        x = torch.tensor([0.0, 1e-3, 2e-3, 0.5], dtype=torch.float64)[torch.randint(0, 4, (n,), generator=g)]
        x = x.to(dtype)
    elif kind == "one value":
        x = torch.full((n,), 1e-3, dtype=dtype)
    elif kind == "every exponent":
        x = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 60 - 40).to(dtype)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    return (x * sign)[torch.randperm(n, generator=g)]


KINDS = ("cluster", "two clusters", "few values", "one value", "every exponent")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clusters_and_ties_at_every_k(B, dtype):
    # Sizes around the 16-key steps of the vector copy (odd tails), and ks
    # below, inside and above each cluster: a selection that the kept keys'
    # common bits end early, one that ends at its last digit (the largest key
    # below from the counts), and one that needs every level.
    g = torch.Generator().manual_seed(23)
    cases = []
    for n in (1, 15, 16, 17, 33, 257, 1000, 4097, 20001):
        for kind in KINDS:
            x = clustered(n, dtype, kind, g).to(B.dev)
            for k in sorted({1, max(1, n // 3), max(1, n // 2), n // 2 + 1, n - 1, n} - {0}):
                if k <= n:
                    cases.append((x, k))
    for closest in (False, True):
        with pyreg.use_backend(B.name):
            got = ops.kth_abs([t for t, _ in cases], [k for _, k in cases], closest=closest)
        want = [by_sort(t, k, closest) for t, k in cases]
        bad = [(i, t.numel(), k, float(a), b) for i, ((t, k), a, b) in enumerate(zip(cases, got.cpu(), want))
               if not same(a.reshape(1), [b])]
        assert not bad, (closest, bad[:5])


def sampled(n: int):
    """The weights the CPU kernel samples to bracket the k-th of n (2^18 or
    more): one from each run of n // s, at an offset from a hash of the run's
    index (csrc/cpu/select.cpp's sample_at)."""
    s = min(1 << 15, max(1 << 12, n >> 6))
    stride = n // s
    m64 = (1 << 64) - 1
    out = []
    for j in range(s):
        z = (j + 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        z ^= z >> 31
        out.append(j * stride + z % stride)
    return torch.tensor(out)


def by_sort_all(t: torch.Tensor, ks, closest: bool):
    """``by_sort`` for several k of one tensor, with one sort."""
    a = t.detach().double().abs().flatten().cpu()
    s = torch.cat([a[~a.isnan()].sort().values, a[a.isnan()]])
    out = []
    for k in ks:
        kth = float(s[k - 1]) if k else 0.0
        if k and closest and not math.isnan(kth):
            n_lt = int(torch.searchsorted(s[~s.isnan()], kth, right=False))
            n_le = int(torch.searchsorted(s[~s.isnan()], kth, right=True))
            lower = float(s[n_lt - 1]) if n_lt else 0.0
            kth = lower if n_le - k > k - n_lt else kth
        out.append(kth)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_tensors_through_a_sampled_bracket(dtype):
    # From 2^18 keys on, the CPU kernel first brackets the k-th key from a
    # sample, then selects among the keys in the bracket. Every shape of
    # clustered(), at ks from the first to the last; a layout with a period
    # (every 64th weight large: a sample taken at a fixed offset in each run
    # of 64 would see only those); and tensors whose sample lies (the sampled
    # weights far larger than the rest, the rest random or all tied), where
    # the bracket misses and the whole tensor is selected from: exact either way.
    g = torch.Generator().manual_seed(31)
    cases = []
    for n in (1 << 18, 300007):
        for kind in KINDS:
            cases.append(clustered(n, dtype, kind, g))
    n = 1 << 18
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    x[32::64] = 1000.0
    cases.append(x)
    for fill in ("random", "tied"):
        x = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
        if fill == "tied":
            x[:] = 1e-3
        x[sampled(n)] = 1000.0
        cases.append(x)
    for closest in (False, True):
        tensors, ks, want = [], [], []
        for x in cases:
            n = x.numel()
            kx = sorted({1, 2, n // 64, n // 3, n // 2, n - n // 64, n - 1, n})
            tensors += [x] * len(kx)
            ks += kx
            want += by_sort_all(x, kx, closest)
        with pyreg.use_backend("cpu"):
            got = ops.kth_abs(tensors, ks, closest=closest)
        bad = [(i, t.numel(), k, float(a), b) for i, (t, k, a, b) in enumerate(zip(tensors, ks, got, want))
               if not same(a.reshape(1), [b])]
        assert not bad, (closest, bad[:5])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_zeros_and_specials(B, dtype):
    g = torch.Generator().manual_seed(11)
    n = 70001  # several counting levels and the four-way counts
    # Half the weights tied at one value just above zero (what Adam does to
    # weights a prox zeroed), a quarter exact zeros (both signs), the rest random.
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x[: n // 2] = torch.tensor(1e-3, dtype=torch.float64).to(dtype) * torch.sign(torch.randn(n // 2, generator=g))
    x[n // 2: 3 * n // 4] = 0.0
    x[n // 2: n // 2 + 100] = -0.0
    x = x[torch.randperm(n, generator=g)].to(B.dev)
    y = torch.tensor([0.0, -0.0, 1.0, float("nan"), -3.0, float("inf"), float("-inf"), 2.0],
                     dtype=dtype, device=B.dev)
    small = x[:300].clone()  # few keys: narrow counts
    cases = [(x, k) for k in (1, n // 4, n // 4 + 1, n // 2, 3 * n // 4, 3 * n // 4 + 1, n - 1, n)]
    cases += [(y, k) for k in range(0, 9)] + [(small, k) for k in (1, 75, 150, 299, 300)]
    for closest in (False, True):
        with pyreg.use_backend(B.name):
            got = ops.kth_abs([t for t, _ in cases], [k for _, k in cases], closest=closest)
        assert same(got, [by_sort(t, k, closest) for t, k in cases]), closest


def test_lists_over_launch_batches(B):
    """650 tensors (more than a CUDA launch takes: 600, or 64 with 4 KB kernel
    parameters), mixed dtypes, empty and multi-chunk ones among them."""
    g = torch.Generator().manual_seed(9)
    sizes = [int(s) for s in torch.randint(0, 60, (650,), generator=g)]
    sizes[63], sizes[64], sizes[600] = 40_000, 0, 16_385
    ts = [torch.randn(n, generator=g, dtype=torch.float64).to(DTYPES[i % 4]).to(B.dev) for i, n in enumerate(sizes)]
    ks = ks_for(ts, 10)
    for closest in (False, True):
        with pyreg.use_backend(B.name):
            got = ops.kth_abs(ts, ks, closest=closest)
        assert same(got, torch_ref.kth_abs(ts, ks, closest).cpu())


def test_closest_takes_the_value_below_where_ties_overshoot(B):
    # |w| = 1 x 3, 2 x 6, 3 x 1; k = 4: the 4th smallest is 2, but #(|w| <= 2)
    # = 9 overshoots by 5 where #(|w| <= 1) = 3 falls short by 1.
    w = torch.tensor([1.0, -1, 1, 2, 2, -2, 2, 2, 2, 3], dtype=torch.bfloat16, device=B.dev)
    with pyreg.use_backend(B.name):
        assert ops.kth_abs([w], [4]).tolist() == [2.0]
        assert ops.kth_abs([w], [4], closest=True).tolist() == [1.0]
        assert ops.kth_abs([w], [7], closest=True).tolist() == [2.0]  # 9 - 7 < 7 - 3
        assert ops.kth_abs([w], [2], closest=True).tolist() == [1.0]  # nothing below 1 needed
        # all six tied at 2, k = 1: 0 zeros (short by 1) is closer than 6 (over by 5)
        assert ops.kth_abs([w[3:9]], [1], closest=True).tolist() == [0.0]
        assert ops.kth_abs([w[3:9]], [4], closest=True).tolist() == [2.0]


def test_one_k_for_all_and_empty_list():
    ts = [torch.randn(5), torch.randn(3, 3)]
    assert torch.equal(ops.kth_abs(ts, 2), ops.kth_abs(ts, [2, 2]))
    assert ops.kth_abs([], []).shape == (0,)


def test_the_same_for_any_thread_count(restore_threads):  # noqa: F811
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(n, generator=g) for n in (300000, 5, 70001, 4096)]
    ks = [150000, 3, 1, 4096]
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(ops.kth_abs(ts, ks, closest=True))
    assert torch.equal(outs[0], outs[1])
    assert same(outs[0], [by_sort(t, k, True) for t, k in zip(ts, ks)])


def test_every_compiled_build_runs_its_own_selection():
    assert backends.cpu.selects()
    emu = backends.get("cuda-emu")
    if emu.compiled():  # the CUDA kernels: launches, not torch's kthvalue
        assert emu.selects()
        before = emu._fn("launch_count")()
        with pyreg.use_backend("cuda-emu"):
            ops.kth_abs([torch.randn(100), torch.randn(3, dtype=torch.float64)], [50, 2], closest=True)
        # clear, 8 levels of (count, pick) for the float64 tensor, the closest pass, finish
        assert emu._fn("launch_count")() - before == 1 + 2 * 8 + 2


@pytest.mark.parametrize("order", ["forward", "reverse", "random:7"])
def test_emulated_selection_under_every_fiber_order(order, monkeypatch):
    """The CUDA selection under each order of the emulator's threads (read
    at each launch): the digit is found by one thread of a block while the
    others read the state (a race there showed only under some orders)."""
    if not backends.get("cuda-emu").compiled():
        pytest.skip("the CUDA emulator is not built")
    monkeypatch.setenv("PYREG_EMU_ORDER", order)
    t = torch.tensor([float("nan"), float("inf"), 1.0, 2.0, 2.0, -0.0, 0.5] * 3)
    ks = list(range(22))
    with pyreg.use_backend("cuda-emu"):
        for closest in (False, True):
            assert same(ops.kth_abs([t] * 22, ks, closest=closest), torch_ref.kth_abs([t] * 22, ks, closest))


@pytest.mark.parametrize("k, words", [([1], "2 tensors"), ([1, -1], "outside"), ([1, 10], "outside"),
                                      ([1, 1.5], "must be an int"), (1.0, "int or a sequence"),
                                      ([True, 1], "must be an int")])
def test_bad_k_is_rejected(k, words):
    ts = [torch.randn(4), torch.randn(3)]
    with pytest.raises((TypeError, ValueError), match=words):
        ops.kth_abs(ts, k)


def test_bad_closest_is_rejected():
    with pytest.raises(TypeError, match="closest"):
        ops.kth_abs([torch.randn(3)], [1], closest=1)


def test_opcheck_and_compile():
    ts = [torch.randn(40), torch.randn(7, 3, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.pyreg.kth_abs.default, (ts, [20, 5], True))
    f = torch.compile(lambda a, b: ops.kth_abs([a, b], [20, 5], closest=True), backend="eager", fullgraph=True)
    assert torch.equal(f(*ts), ops.kth_abs(ts, [20, 5], closest=True))


def push_by_torch(m, v, e, s):
    """The push of an adaptive step as pyreg.optim's torch ops compute it:
    m / ((sqrt(v) + e) * s), or m / s without v; with a correctly rounded
    sqrt (``ieee_sqrt``: torch's is not on every CPU)."""
    if v is None:
        return [mi / si for mi, si in zip(m, s)]
    return [mi / ((ieee_sqrt(vi) + ei) * si) for mi, vi, ei, si in zip(m, v, e, s)]


def push_terms(dtype, second, seed):
    """The terms of an adaptive step's push on every contiguous layout of
    the op matrix: (m, v or None, e, s, the generator that made them, to
    draw more from)."""
    m = [t.contiguous() for t in random_list(dtype, seed=seed, more_layouts=True, scale=1e-2)]
    g = torch.Generator().manual_seed(seed + 1)
    v = [(t.double() ** 2 * 0.7 + torch.rand(t.shape, generator=g, dtype=torch.float64) * 1e-6).to(dtype)
         for t in m] if second else None
    e = [float(x) for x in torch.rand(len(m), generator=g, dtype=torch.float64) * 1e-7]
    s = [float(x) for x in 0.05 + torch.rand(len(m), generator=g, dtype=torch.float64)]
    return m, v, e, s, g


@pytest.mark.parametrize("second", [True, False], ids=["plain", "metric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_push_kth_is_the_selection_of_the_torch_push(dtype, second):
    """``push_kth`` (l1_strength's refresh of an adaptive step on the CPU, in
    one call) gives the bits of the push computed in torch ops and then
    selected, for every k; on every contiguous layout of the op matrix
    (empty, 0-dim, odd sizes, a misaligned start), each tensor with its own
    e and s, and compares with a sort of the float64 push."""
    if not backends.cpu.selects_pushes():
        pytest.skip("this build has no push_kth")
    m, v, e, s, g = push_terms(dtype, second, 8)
    push = push_by_torch(m, v, e, s)
    for seed in range(3):
        ks = ks_for(m, seed)
        out = torch.full((len(m),), -1.0, dtype=torch.float64)
        backends.cpu.push_kth(m, v, e, s, ks, out)
        assert same(out, ops.kth_abs(push, ks))
        assert same(out, [by_sort(t, k, False) for t, k in zip(push, ks)])


@pytest.mark.parametrize("decay", [False, True], ids=["", "decay"])
@pytest.mark.parametrize("second", [True, False], ids=["plain", "metric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_push_kth_over_groups_is_the_selection_of_the_torch_push_norms(dtype, second, decay):
    """``push_kth`` with each tensor's group dimension (group_strength's
    refresh on the CPU, in one call) gives the bits of the push computed in
    torch ops, its ``group_norms`` and ``kth_abs`` over each tensor's
    groups, for every k from 0 to the tensor's groups, with groups along the
    first, a middle and the last dimension, on every contiguous layout of
    the op matrix (empty, 0-dim, odd sizes, a misaligned start); and
    compares with a sort of the float64 norms."""
    if not backends.cpu.selects_pushes():
        pytest.skip("this build has no push_kth")
    m, v, e, s, g = push_terms(dtype, second, 11)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in m] if decay else None
    wd = [float(x) for x in torch.rand(len(m), generator=g, dtype=torch.float64) * 0.1] if decay else None
    push = push_by_torch(m, v, e, s)
    if decay:  # (decayed_push: the term rounded, then added)
        push = [p + wi * c for p, wi, c in zip(push, w, wd)]
    for which in range(3):
        dims = [[0, t.dim() // 2, t.dim() - 1][which] if t.dim() else 0 for t in m]
        norms = ops.group_norms(push, dims)
        ks = ks_for(norms, which)
        out = torch.full((len(m),), -1.0, dtype=torch.float64)
        backends.cpu.push_kth(m, v, e, s, ks, out, w, wd, dims=dims)
        assert same(out, ops.kth_abs(norms, ks)), which
        assert same(out, [by_sort(t, k, False) for t, k in zip(norms, ks)]), which


def test_push_kth_the_same_for_any_thread_count(restore_threads):  # noqa: F811
    if not backends.cpu.selects_pushes():
        pytest.skip("this build has no push_kth")
    g = torch.Generator().manual_seed(3)
    m = [torch.randn(n, generator=g) for n in (300000, 5, 70001)]
    v = [t * t + 1e-4 for t in m]
    ks = [200000, 4, 1]
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = torch.empty(3, dtype=torch.float64)
        backends.cpu.push_kth(m, v, [1e-8] * 3, [0.5] * 3, ks, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("change, words", [
    (lambda a: a.update(codes=[2, 2]), "float32 or float64"),
    (lambda a: a.update(v=[a["v"][0]]), "differ in length"),
    (lambda a: a.update(v=[a["v"][0], 0]), "null second moment"),
    (lambda a: a.update(e=[1e-8]), "differ in length"),
    (lambda a: a.update(k=[1, 8]), "out of"),
    (lambda a: a.update(k=[-1, 1]), "out of"),
    (lambda a: a.update(out=0), "null output"),
    (lambda a: a.update(w=[a["ptrs"][0]], wd=[0.1]), "weights before the step differ in length"),
    (lambda a: a.update(w=[a["ptrs"][0], 0], wd=[0.1, 0.1]), "null weights before the step pointer"),
    (lambda a: a.update(w=list(a["ptrs"]), wd=[0.1]), "wd differs in length"),
    # the group form: (outer, groups, inner) of each tensor, and k at most its groups
    (lambda a: a.update(shapes=([1], [4], [1])), "group shapes differ in length"),
    (lambda a: a.update(shapes=([1, 1], [4, 2], [1, 2])), "does not match numel"),
    (lambda a: a.update(shapes=([1, 1], [4, 3], [1, 2]), k=[1, 4]), "out of"),
])
def test_push_kth_rejects_bad_input(change, words):
    """The binding checks what it is given before any kernel runs, and the
    output is not written."""
    c = pytest.importorskip("pyreg._C")
    if not hasattr(c, "cpu_push_kth"):
        pytest.skip("this build has no push_kth")
    m = [torch.randn(4), torch.randn(3, 2)]
    v = [t * t for t in m]
    out = torch.full((2,), 7.0, dtype=torch.float64)
    a = dict(ptrs=[t.data_ptr() for t in m], numels=[4, 6], codes=[0, 0], v=[t.data_ptr() for t in v],
             e=[1e-8, 1e-8], s=[1.0, 1.0], w=[], wd=[], k=[1, 2], out=out.data_ptr(), shapes=([], [], []))
    change(a)
    with pytest.raises(ValueError, match=words):
        c.cpu_push_kth(a["ptrs"], a["numels"], a["codes"], a["v"], a["e"], a["s"], a["w"], a["wd"], a["k"], a["out"],
                       1, *a["shapes"])
    assert out.tolist() == [7.0, 7.0]


def test_k_takes_numpy_integers():
    """k as a numpy integer (or a list of them) is an int, as the group ops
    take numpy ints for dim; a numpy float or bool is refused."""
    import numpy as np
    ts = [torch.randn(9, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3)]
    want = pyreg.kth_abs(ts, 2)
    assert torch.equal(pyreg.kth_abs(ts, np.int64(2)), want)
    assert torch.equal(pyreg.kth_abs(ts, [np.int32(2), np.int64(2)]), want)
    for bad in (np.float64(2.0), np.bool_(True)):
        with pytest.raises(TypeError):
            pyreg.kth_abs(ts, bad)


def per_lr_by_hand(tau: float, lr: float) -> float:
    """The l1 at which a prox of step size lr zeroes a weight of magnitude
    tau, written out in Python floats: tau / lr, raised by one ulp while the
    prox's threshold lr * l1 rounds below tau (twice at most); 0 where lr is
    not > 0."""
    if not lr > 0:
        return 0.0
    l1 = tau / lr
    for _ in range(2):
        if lr * l1 < tau:
            l1 = math.nextafter(l1, math.inf)
    return l1


def test_per_lr_is_the_rule_bit_for_bit():
    """The CPU build's ``per_lr`` (the l1 that target_sparsity's and
    l1_strength's refreshes set from a selected magnitude, in one call):
    the rule's bits, for one lr and for one per value (0, negative, NaN and
    inf among them), in place and into another vector, and an empty one."""
    if not backends.cpu.per_lrs():
        pytest.skip("this build has no per_lr")
    g = torch.Generator().manual_seed(11)
    n = 4001
    tau = torch.rand(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-9, 4, (n,), generator=g)
    tau[:3] = torch.tensor([0.0, math.inf, math.nan])
    lrs = torch.rand(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-7, 1, (n,), generator=g)
    lrs[3:8] = torch.tensor([0.0, -0.5, math.nan, math.inf, 5e-324])
    raised = 0
    for lr in [0.1, 3e-4, 0.0, -1.0, math.inf, lrs]:
        values = lr.tolist() if isinstance(lr, torch.Tensor) else [lr] * n
        want = [per_lr_by_hand(t, r) for t, r in zip(tau.tolist(), values)]
        raised += sum(w != t / r for w, t, r in zip(want, tau.tolist(), values) if r > 0 and not math.isnan(w))
        out = torch.full((n,), -1.0, dtype=torch.float64)
        backends.cpu.per_lr(tau, out, lr)
        assert same(out, want), lr
        inplace = tau.clone()
        backends.cpu.per_lr(inplace, inplace, lr)
        assert same(inplace, want), lr
    assert raised > 100  # (the raise is exercised: about one value in twenty)
    empty = torch.empty(0, dtype=torch.float64)
    backends.cpu.per_lr(empty, empty, 0.1)
    with pytest.raises(ValueError, match="coefficient for the kernels"):
        backends.cpu.per_lr(tau, torch.empty(n, dtype=torch.float64), lrs[:5])
