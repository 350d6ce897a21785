"""``l1_strength``: each tensor's l1 set from its own push (the optimizer's
step in the prox's metric) every ``l1_refresh`` steps. The refresh against
the rule written out in float64 from torch's own optimizers, for every
fused algorithm and metric and on every backend; both families agreeing;
comparable sparsity across optimizers and metrics at one strength; the
state in the state dict; bad values rejected with nothing modified."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import pyreg
from pyreg.optim import apply
from pyreg.optim.apply import STRENGTH_STATE
from pyreg.optim.plan import Bucket
from conftest import bad_key_changes_nothing, ieee_sqrt, needs_emu
from test_target_sparsity import task  # the same small model and data

BACKENDS = ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"]
KEY = STRENGTH_STATE[0]

# (pyreg class, torch class, arguments); each runs plain and preconditioned
CONFIGS = {
    "SGD-nesterov": (pyreg.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "SGD": (pyreg.optim.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    "Adam": (pyreg.optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "Adam-amsgrad": (pyreg.optim.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "AdamW": (pyreg.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5)),
    "Adagrad": (pyreg.optim.Adagrad, torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    "RMSprop": (pyreg.optim.RMSprop, torch.optim.RMSprop, dict(lr=1e-2)),
    "RMSprop-centered-momentum": (pyreg.optim.RMSprop, torch.optim.RMSprop,
                                  dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.01)),
}
SHAPES = [(9, 7), (31,), (2, 3, 5), (), (0, 3)]
STRENGTHS = [0.5, 0.13, 1.0, 0.7, 0.4]


def step_size(opt, p, metric):
    """torch's prox step size of each element of p after its step: lr, or in
    the optimizer's metric lr / (its denominator)."""
    group = opt.param_groups[0]
    lr, s = group["lr"], opt.state[p]
    if not metric or isinstance(opt, torch.optim.SGD):
        return torch.full_like(p, lr)
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        b2 = group["betas"][1]
        v = s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]
        return lr / ((v / (1 - b2 ** float(s["step"]))).sqrt() + group["eps"])
    if isinstance(opt, torch.optim.Adagrad):
        clr = lr / (1 + (float(s["step"]) - 1) * group["lr_decay"])
        return clr / (s["sum"].sqrt() + group["eps"])
    sq = s["square_avg"] - (s["grad_avg"] ** 2 if group["centered"] else 0)
    return lr / (sq.sqrt() + group["eps"])


def rule(params, before, sizes, strengths):
    """l1 = the ceil(a * n)-th smallest |step / step size| (0 for k = 0)."""
    out = []
    for p, b, t, a in zip(params, before, sizes, strengths):
        push = ((b - p.detach()) / t).abs().flatten()
        k = math.ceil(a * push.numel() - 1e-9)
        out.append(float(push.sort().values[k - 1]) if k > 0 else 0.0)
    return out


def grads_for(shapes, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def step_both(ours, ref, opt, topt, shapes, step):
    """Step ``step`` of pyreg's optimizer and torch's, each on its own params
    with the same grads; returns torch's params as they were before it."""
    for ps in (ours, ref):
        for p, gr in zip(ps, grads_for(shapes, step, torch.float64)):
            p.grad = gr
    before = [p.detach().clone() for p in ref]
    topt.step()
    opt.step()
    return before


#: The refresh slice the rule tests stagger their small buckets with.
SLICE = 16


@pytest.fixture
def staggered(monkeypatch):
    """Refresh slices of SLICE weights: the small buckets below refresh
    their tensors at different steps (by default they would refresh at once)."""
    monkeypatch.setattr(apply, "REFRESH_SLICE", SLICE)


def due_step(shapes, i, every, slice_size=SLICE):
    """The first step (counted from 1) that refreshes tensor i of a bucket of
    ``shapes``: the bucket in S = min(tensors, ceil(weights / slice_size))
    slices, tensor i in slice j = floor(S * (weights before its middle) / weights)
    (at most S - 1), refreshed at the steps t >= every with
    (t + floor(j * every / S)) % every == 0."""
    sizes = [math.prod(sh) for sh in shapes]
    total = sum(sizes)
    s = max(1, min(len(sizes), -(-total // slice_size)))
    j = min(s - 1, (2 * sum(sizes[:i]) + sizes[i]) * s // (2 * total)) if total else 0
    return next(t for t in range(every, 3 * every) if (t + j * every // s) % every == 0)


def refreshed_per_step(shapes, every, steps):
    """The tensors (indices) that a "strength" bucket of ``shapes`` refreshes
    at each of its first ``steps`` steps, counted by the engine's rule."""
    params = [torch.zeros(sh) for sh in shapes]
    for p in params:  # (a step counts for a tensor with a grad)
        p.grad = torch.zeros_like(p)
    n = len(params)
    b = Bucket("strength", params, [0] * n, list(range(n)),
               {"l2": [0.0] * n, "l1_strength": [0.5] * n, "l1_refresh": [every] * n}, None, None)
    state = {}
    out = []
    for _ in range(steps):
        due = {id(p) for p in apply.strength_due(b, state)}
        apply.record_strength_step([b], state)  # (the counts' record, as a step leaves it)
        out.append([i for i, p in enumerate(params) if id(p) in due])
    return out


@pytest.mark.parametrize("shapes", [
    [(64, 128), (64,), (128, 64), (10,)],  # the demo's scale: one slice, refreshed at once
    [(768, 768)] * 12 + [(768,)] * 12 + [(3072, 768)] * 3,  # a large bucket: about 1/K of it per step
    [(5000,)] * 40 + [(2_000_000,)],  # many small tensors, then one large one
    [(0,), ()],  # an empty and a 0-dim tensor
], ids=["small", "large", "skewed", "tiny"])
@pytest.mark.parametrize("every", [1, 7, 10])
def test_refreshes_are_staggered_by_slices(shapes, every):
    """Each tensor is refreshed once in every l1_refresh (K) steps from step K
    on; a bucket of at most REFRESH_SLICE weights at once; a larger one in
    slices, so that no step refreshes much more than 1/K of its weights (a
    slice holds whole tensors: at most one slice plus the largest tensor)."""
    sizes = [math.prod(sh) for sh in shapes]
    total = sum(sizes)
    per_step = refreshed_per_step(shapes, every, 3 * every + 1)
    assert all(not got for got in per_step[:every - 1])  # nothing before step K
    for start in range(every - 1, 2 * every):  # any window of K steps from step K on
        window = [i for got in per_step[start:start + every] for i in got]
        assert sorted(window) == list(range(len(shapes)))
    for t, got in enumerate(per_step):
        assert got == [i for i in range(len(shapes)) if due_step(shapes, i, every, apply.REFRESH_SLICE) <= t + 1
                       and (t + 1 - due_step(shapes, i, every, apply.REFRESH_SLICE)) % every == 0]
    if total <= apply.REFRESH_SLICE:
        assert all(got in ([], list(range(len(shapes)))) for got in per_step)
    else:
        s = min(len(shapes), -(-total // apply.REFRESH_SLICE))
        most = max(sum(sizes[i] for i in got) for got in per_step)
        assert most <= -(-total // min(s, every)) + max(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", [False, True], ids=["plain", "metric"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_refresh_matches_the_rule(name, metric, backend, staggered):
    """l1_refresh=3, 5 tensors: tensor i is first refreshed at step
    due_step(SHAPES, i, 3) (3, 5, 4, 4, 4), and until then has l1 = 0, so pyreg's
    optimizer computes what torch's does on it (the algorithms work element
    by element); each refresh sets the l1 from that step, measured on
    torch's run in float64."""
    ours_cls, torch_cls, kw = CONFIGS[name]
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = ours_cls([{"params": ours, "l1_strength": STRENGTHS, "l1_refresh": 3}], preconditioned=metric, **kw)
    topt = torch_cls(ref, **kw)
    due = [due_step(SHAPES, i, 3) for i in range(len(SHAPES))]
    assert due == [3, 5, 4, 4, 4]
    want = [None] * len(SHAPES)
    with pyreg.use_backend(backend):
        for step in range(1, 6):
            before = step_both(ours, ref, opt, topt, SHAPES, step)
            for i, (a, b) in enumerate(zip(ours, ref)):
                if step < due[i]:
                    assert float(opt.state[a][KEY]) == 0.0
                if step <= due[i]:  # l1 was 0 until now: torch's step
                    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)
                if step == due[i]:
                    want[i] = rule([b], [before[i]], [step_size(topt, b, metric)], [STRENGTHS[i]])[0]
                    assert float(opt.state[a][KEY]) == pytest.approx(want[i], rel=1e-9, abs=1e-300)
    got = [float(opt.state[p][KEY]) for p in ours]
    assert all(v > 0 for v, p in zip(got, ours) if p.numel())
    assert got[-1] == 0.0  # the empty tensor
    assert all(opt.state[p]["strength_step"] == 5 for p in ours)


@pytest.mark.parametrize("metric", [False, True], ids=["plain", "metric"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_refresh_with_step_counts_that_differ(metric, amsgrad):
    """A tensor that had no grad at the first step counts its steps from its
    first grad (l1_refresh=3): the other is refreshed at step 3, it at step
    4, its own third; each push has its own bias corrections."""
    g = torch.Generator().manual_seed(11)
    shapes = [(6, 5), (7,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=1e-2, betas=(0.8, 0.9), amsgrad=amsgrad)
    opt = pyreg.optim.Adam([{"params": ours, "l1_strength": [0.6, 0.3], "l1_refresh": 3}], preconditioned=metric,
                           **kw)
    topt = torch.optim.Adam(ref, **kw)
    want = {}
    for step in range(1, 5):
        for ps in (ours, ref):
            for i, (p, gr) in enumerate(zip(ps, grads_for(shapes, step, torch.float64))):
                p.grad = None if step == 1 and i == 1 else gr
        before = [p.detach().clone() for p in ref]
        topt.step()
        opt.step()
        if step in (3, 4):
            want[step] = rule(ref, before, [step_size(topt, b, metric) for b in ref], [0.6, 0.3])
        if step == 3:
            assert float(opt.state[ours[1]][KEY]) == 0.0  # its second step: not yet
    assert [int(topt.state[p]["step"]) for p in ref] == [4, 3]
    got = [float(opt.state[p][KEY]) for p in ours]
    assert got == pytest.approx([want[3][0], want[4][1]], rel=1e-9)
    assert all(v > 0 for v in got)
    assert [opt.state[p]["strength_step"] for p in ours] == [4, 3]


def kernel_calls(monkeypatch):
    """For a test of the refresh's one kernel call (``push_kth``): skips
    without it, gives torch's ops a correctly rounded sqrt (as the
    kernel's), and returns the list that gets each call's ``dims``."""
    from pyreg.backends.compiled import CompiledKernels
    if not pyreg.backends.cpu.selects_pushes():
        pytest.skip("this build has no push_kth")
    monkeypatch.setattr(torch.Tensor, "sqrt", ieee_sqrt)
    monkeypatch.setattr(torch, "_foreach_sqrt", lambda ts: [ieee_sqrt(t) for t in ts])
    calls = []
    kernel = CompiledKernels.push_kth
    monkeypatch.setattr(CompiledKernels, "push_kth",
                        lambda self, *a, **k: calls.append(k.get("dims")) or kernel(self, *a, **k))
    return calls


def kernel_and_torch_runs(classes, kw, dtype, seed, shapes, key, groups_of):
    """7 steps of the same params (``shapes``, ``dtype``, from ``seed``) in
    two optimizers, ``classes`` (the kernel's, then the torch ops'), with
    the groups ``groups_of(params)``; the second tensor without a grad at
    step 1. Returns (the params of each run, per step (the first run's,
    the second run's) state entry ``key`` of each param, -1.0 where none)."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(sh, generator=g, dtype=torch.float64).to(dtype) for sh in shapes]
    params = [[p.clone().requires_grad_() for p in init] for _ in range(2)]
    opts = [c(groups_of(ps), lr=1e-2, **kw) for c, ps in zip(classes, params)]
    steps = []
    for step in range(1, 8):
        for ps, opt in zip(params, opts):
            for i, (p, gr) in enumerate(zip(ps, grads_for(shapes, step, dtype))):
                p.grad = None if step == 1 and i == 1 else gr
            opt.step()
        steps.append(tuple([float(opt.state[p].get(key, -1.0)) for p in ps] for ps, opt in zip(params, opts)))
    return params, steps


#: (optimizer, its arguments, whether its push is computed in the selection kernel)
ONE_CALL = [(pyreg.optim.Adam, dict(betas=(0.8, 0.9)), True),
            (pyreg.optim.AdamW, dict(betas=(0.8, 0.9), amsgrad=True, weight_decay=0.0), True),
            (pyreg.optim.AdamW, dict(betas=(0.8, 0.9), weight_decay=0.1), True),  # its decay's term in the kernel
            (pyreg.optim.Adagrad, dict(), True),
            (pyreg.optim.Adagrad, dict(lr_decay=0.1), False),
            (pyreg.optim.RMSprop, dict(), True),
            (pyreg.optim.RMSprop, dict(momentum=0.5), False),
            (pyreg.optim.SGD, dict(momentum=0.9), False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("cls, kw, one_call", ONE_CALL, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(ONE_CALL)])
def test_a_refresh_in_one_kernel_call_gives_the_bits_of_the_torch_ops(cls, kw, one_call, dtype, monkeypatch):
    """On the CPU, the optimizers whose push has the form m / ((sqrt(v) + e) * s)
    (Adam, and AdamW with its decay's term; Adagrad without lr_decay; RMSprop
    without momentum) select each
    push's quantile in one call (``push_kth``, without the pushes in
    memory). It gives the l1 of the push computed in torch ops and
    ``kth_abs`` bit for bit, in both metrics, with step counts that differ
    (a tensor without a grad at step 1), through several refreshes; it is
    the path taken where it applies, and the others (16-bit params among
    them) take the torch ops.
    The torch ops are given a correctly rounded sqrt, as the kernel's
    (torch's own CPU sqrt is not correctly rounded on every CPU: there the
    two differ in the last bit of some pushes)."""
    calls = kernel_calls(monkeypatch)

    class TorchOps(cls):  # the pushes in torch ops, then kth_abs
        def _push_quantiles(self, items, ks, out=None, dims=None):
            return None

    params, steps = kernel_and_torch_runs(
        (cls, TorchOps), kw, dtype, 13, [(17, 9), (31,), (0, 3), (5, 4)], KEY,
        lambda ps: [{"params": ps[:2], "l1_strength": [0.6, 0.3], "l1_refresh": 2},
                    {"params": ps[2:], "l1_strength": 0.8, "l1_refresh": 2, "preconditioned": True}])
    for step, (got, want) in enumerate(steps, 1):
        assert got[:2] + got[3:] == want[:2] + want[3:], step
    assert all(v > 0 for v in got[:2] + got[3:])
    assert bool(calls) == (one_call and dtype.itemsize >= 4)  # the kernel takes float32/64 state
    assert all(torch.equal(a, b) for a, b in zip(*params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("cls, kw, one_call", ONE_CALL, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(ONE_CALL)])
def test_a_group_refresh_in_one_kernel_call_gives_the_bits_of_the_torch_ops(cls, kw, one_call, dtype, monkeypatch):
    """group_strength: where the push has that form, the CPU kernel
    (``push_kth`` with group shapes) computes the pushes, their group norms
    and each tensor's quantile over its groups in one call; it gives the
    group_l1 of the pushes computed in torch ops, ``group_norms`` and
    ``kth_abs`` bit for bit, with groups along the first, middle and last
    dimension, a tensor without groups' elements, one without a grad at
    step 1, through several refreshes; the others take the torch ops."""
    calls = kernel_calls(monkeypatch)

    class TorchOps(cls):  # the pushes in torch ops, then group_norms and kth_abs
        def _push_quantiles(self, items, ks, out=None, dims=None):
            return None

    params, steps = kernel_and_torch_runs(
        (cls, TorchOps), kw, dtype, 17, [(17, 9), (3, 11, 5), (0, 3), (6, 4), (13,)], "strength_group_l1",
        lambda ps: [{"params": ps[:3], "group_strength": [0.6, 0.3, 0.5], "group_dim": 1, "l1_refresh": 2},
                    {"params": ps[3:], "group_strength": 0.7, "group_dim": -1, "l1_refresh": 2}])
    for step, (got, want) in enumerate(steps, 1):
        assert got == want, step
    assert all(v > 0 for i, v in enumerate(got) if i != 2)
    assert bool(calls) == (one_call and dtype.itemsize >= 4)
    assert all(d is not None for d in calls)  # (the group form: each call's dims)
    assert all(torch.equal(a, b) for a, b in zip(*params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("key", ["l1_strength", "group_strength"])
def test_regularized_refresh_in_one_kernel_call_gives_the_bits_of_the_torch_ops(key, dtype, monkeypatch):
    """pyreg.Regularized: on the CPU, a refresh selects the quantile of each
    due tensor's step (``push_kth`` of before - after, over its elements or
    its group norms) in one kernel call; it gives the l1 (group_l1) of the
    steps computed in torch ops, then ``group_norms`` and ``kth_abs``, bit
    for bit, through several staggered refreshes, on the fast path and the
    full path (a tensor without a grad at step 1), and the same weights;
    16-bit params take the torch ops."""
    import pyreg.optim.regularized as R
    from pyreg.backends.compiled import CompiledKernels
    if not pyreg.backends.cpu.selects_pushes():
        pytest.skip("this build has no push_kth")
    calls = []
    kernel = CompiledKernels.push_kth
    monkeypatch.setattr(CompiledKernels, "push_kth", lambda self, *a, **k: calls.append(1) or kernel(self, *a, **k))
    state_key = "strength_group_l1" if key == "group_strength" else KEY
    shapes = [(17, 9), (3, 11, 5), (6, 4), (13, 2)]
    extra = {"group_dim": 1} if key == "group_strength" else {}
    runs = []
    for in_kernel in (True, False):
        if not in_kernel:
            monkeypatch.setattr(R, "step_quantiles", lambda *a: None)
        g = torch.Generator().manual_seed(21)
        ps = [torch.randn(sh, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for sh in shapes]
        opt = pyreg.Regularized(torch.optim.Adam(
            [{"params": ps, key: [0.6, 0.3, 0.5, 0.8], "l1_refresh": 2, **extra}], lr=1e-2))
        seen = []
        for step in range(1, 8):
            for i, (p, gr) in enumerate(zip(ps, grads_for(shapes, step, dtype))):
                p.grad = None if step == 1 and i == 1 else gr
            opt.step()
            seen.append([float(opt.state[p].get(state_key, -1.0)) for p in ps])
        runs.append((seen, [p.detach().clone() for p in ps]))
        if in_kernel:
            n_calls = len(calls)
    assert runs[0][0] == runs[1][0]
    assert all(v > 0 for v in runs[0][0][-1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert (n_calls > 0) == (dtype.itemsize >= 4) and len(calls) == n_calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["fused", "Regularized"])
@pytest.mark.parametrize("key", ["l1_strength", "group_strength"])
def test_a_nan_grad_leaves_the_strength_as_it_was(key, family, backend):
    """A NaN in one grad (no GradScaler) makes the pushes of its tensor NaN
    from then on (Adam's moments keep it): a refresh whose quantile is not
    finite leaves the tensor's l1 (group_l1) as the last refresh set it, so
    the next steps run (a coefficient is finite: a NaN one would be refused
    at every later step, after the inner step) and the state dict loads."""
    state_key = "strength_group_l1" if key == "group_strength" else KEY
    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    group = {"params": ps, key: 1.0, "l1_refresh": 2, **({"group_dim": 1} if key == "group_strength" else {})}
    opt = (pyreg.Regularized(torch.optim.Adam([group], lr=1e-2)) if family == "Regularized"
           else pyreg.optim.Adam([group], lr=1e-2))
    with pyreg.use_backend(backend):
        for step in range(1, 8):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if step == 3:
                ps[0].grad[2, 1] = float("nan")
            opt.step()
            if step == 2:
                kept = [float(opt.state[p][state_key]) for p in ps]
            got = [float(opt.state[p][state_key]) for p in ps]
            assert all(math.isfinite(v) for v in got), step
        assert got[0] == kept[0] and got[1] != kept[1] and kept[0] > 0
        assert ps[0].isnan().any() and not ps[1].isnan().any()
        opt.load_state_dict(opt.state_dict())
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refresh_of_plain_and_preconditioned_groups_in_one_bucket(backend):
    """Two groups of one bucket, one in the plain metric and one in Adam's:
    each tensor's refresh (at step 2) measures its push in its own metric."""
    g = torch.Generator().manual_seed(12)
    shapes = [(7, 5), (9,), (4, 4)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = pyreg.optim.Adam([{"params": ours[:2], "l1_strength": 0.4, "l1_refresh": 2},
                            {"params": ours[2:], "l1_strength": 0.7, "l1_refresh": 2, "preconditioned": True}],
                           lr=1e-2)
    topt = torch.optim.Adam(ref, lr=1e-2)
    with pyreg.use_backend(backend):
        for step in (1, 2):
            before = step_both(ours, ref, opt, topt, shapes, step)
    metric = [False, False, True]
    want = [rule([b], [a], [step_size(topt, b, m)], [s])[0]
            for b, a, m, s in zip(ref, before, metric, [0.4, 0.4, 0.7])]
    assert [float(opt.state[p][KEY]) for p in ours] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regularized_refresh_matches_the_rule(backend, staggered):
    """pyreg.Regularized(torch.optim.Adam): the push is the inner step / lr
    (l1_refresh=2: tensor 0 at step 2, tensors 1 to 4 at step 3)."""
    g = torch.Generator().manual_seed(8)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = pyreg.Regularized(torch.optim.Adam([{"params": ours, "l1_strength": STRENGTHS, "l1_refresh": 2}],
                                             lr=1e-2))
    topt = torch.optim.Adam(ref, lr=1e-2)
    due = [due_step(SHAPES, i, 2) for i in range(len(SHAPES))]
    assert due == [2, 3, 3, 3, 3]
    with pyreg.use_backend(backend):
        for step in range(1, 4):
            before = step_both(ours, ref, opt, topt, SHAPES, step)
            for i, (a, b) in enumerate(zip(ours, ref)):
                if step == due[i]:
                    want = rule([b], [before[i]], [torch.full_like(b, 1e-2)], [STRENGTHS[i]])[0]
                    assert float(opt.state[a][KEY]) == pytest.approx(want, rel=1e-9, abs=1e-300)


GSHAPES = [(9, 7), (2, 3, 5), (4, 6), (3, 0)]


def col_norms(t):
    """The L2 norm of each slice along dim 1 (float64)."""
    if t.shape[1] == 0:
        return t.new_zeros(0, dtype=torch.float64)
    return t.detach().double().movedim(1, 0).reshape(t.shape[1], -1).norm(dim=1)
GSTRENGTHS = [0.5, 1.0, 0.3, 0.6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SGD-nesterov", "Adam", "Adagrad", "RMSprop-centered-momentum", "Regularized"])
def test_a_group_refresh_matches_the_rule(name, backend, staggered):
    """group_strength (group_dim 1), l1_refresh=2: tensor i's group_l1 is
    first set at step due_step(GSHAPES, i, 2) (2, 3, 3, 3) to the
    ceil(s * groups)-th smallest L2 norm of its push over its groups, the
    push measured on torch's run in float64 (plain metric)."""
    ours_cls, torch_cls, kw = CONFIGS.get(name, CONFIGS["Adam"])
    g = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in GSHAPES]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    group = {"params": ours, "group_strength": GSTRENGTHS, "group_dim": 1, "l1_refresh": 2}
    opt = pyreg.Regularized(torch_cls([group], **kw)) if name == "Regularized" else ours_cls([group], **kw)
    topt = torch_cls(ref, **kw)
    due = [due_step(GSHAPES, i, 2) for i in range(len(GSHAPES))]
    assert due == [2, 3, 3, 3]
    with pyreg.use_backend(backend):
        for step in range(1, 4):
            before = step_both(ours, ref, opt, topt, GSHAPES, step)
            for i, (a, b) in enumerate(zip(ours, ref)):
                if step == due[i]:
                    push = (before[i] - b.detach()) / step_size(topt, b, False)
                    norms = col_norms(push).sort().values
                    k = math.ceil(GSTRENGTHS[i] * norms.numel() - 1e-9)
                    want = float(norms[k - 1]) if k > 0 else 0.0
                    assert float(opt.state[a]["strength_group_l1"]) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert float(opt.state[ours[0]]["strength_group_l1"]) > 0
    # the group prox with it zeroes whole columns, and the penalty counts them
    pen = sum(float(opt.state[p]["strength_group_l1"]) * float(col_norms(p).sum()) for p in ours)
    assert float(opt.penalty) == pytest.approx(pen, rel=1e-9)


def test_group_strength_zeroes_whole_columns_in_both_families():
    """The target depends on 5 of 21 inputs: group_strength on the first
    layer's columns drops inputs whole, the same in both families."""
    m1, x, _ = task()
    y = torch.tanh(x[:, :5] @ torch.randn(5, 7, generator=torch.Generator().manual_seed(1)))
    m2 = copy.deepcopy(m1)
    over = {"0.weight": {"group_strength": 0.9, "group_dim": 1}}
    o1 = pyreg.optim.SGD(pyreg.param_groups(m1, overrides=over), lr=0.1, momentum=0.9)
    o2 = pyreg.Regularized(torch.optim.SGD(pyreg.param_groups(m2, overrides=over), lr=0.1, momentum=0.9))
    train(m1, x, y, o1, 150)
    train(m2, x, y, o2, 150)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cols = (m1[0].weight != 0).any(dim=0)
    assert 0 < int(cols.sum()) < 21, cols  # some inputs dropped, whole
    assert bool(cols[:5].all())  # not the informative ones
    assert float((m1[2].weight == 0).sum()) == 0  # the other layers are not touched


def train(m, x, y, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        (m(x) - y).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad"])
def test_both_families_take_the_same_steps(name, backend):
    """The fused optimizer (plain metric) and Regularized over torch's own
    give the same weights and l1s, refreshes included; the prox acted."""
    ours_cls, torch_cls, kw = {"SGD": CONFIGS["SGD-nesterov"], "Adam": CONFIGS["Adam"], "AdamW": CONFIGS["AdamW"],
                               "Adagrad": CONFIGS["Adagrad"]}[name]
    m1, x, y = task()
    m2 = copy.deepcopy(m1)
    o1 = ours_cls(pyreg.param_groups(m1, l1_strength=0.6), **kw)
    o2 = pyreg.Regularized(torch_cls(pyreg.param_groups(m2, l1_strength=0.6), **kw))
    with pyreg.use_backend(backend):
        train(m1, x, y, o1, 35)
        train(m2, x, y, o2, 35)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        if a.dim() > 1:
            torch.testing.assert_close(o1.state[a][KEY], o2.state[b][KEY], rtol=1e-3, atol=0)
    assert float(o1.sparsity().overall) > 0.1


@pytest.mark.parametrize("key", ["l1_strength", "group_strength"])
@pytest.mark.parametrize("family", ["Regularized", "fused"])
@pytest.mark.parametrize("pattern", ["zero_grad inside the closure", "zero_grad before step(closure)"])
def test_a_step_with_a_closure_counts_and_refreshes_as_one_without(pattern, family, key):
    """With a closure the grads exist only once the inner step has called
    it: the step counts (and the refreshes) are those of the same run
    without a closure, to the bits (they were taken before the closure ran:
    zero_grad before step(closure) left Regularized without any count or
    refresh, so without any regularization)."""
    runs = []
    for closure in (False, True):
        m, x, y = task()
        extra = {"group_strength": 0.6, "group_dim": 1} if key == "group_strength" else {"l1_strength": 0.6}
        groups = pyreg.param_groups(m, overrides={"0": {**extra, "l1_refresh": 3}})
        opt = (pyreg.Regularized(torch.optim.SGD(groups, lr=0.05, momentum=0.9)) if family == "Regularized"
               else pyreg.optim.SGD(groups, lr=0.05, momentum=0.9))
        for _ in range(13):
            def loss_fn():
                if pattern == "zero_grad inside the closure":
                    opt.zero_grad()
                loss = (m(x) - y).pow(2).mean()
                loss.backward()
                return loss
            if closure:
                if pattern != "zero_grad inside the closure":
                    opt.zero_grad()
                opt.step(loss_fn)
            else:
                opt.zero_grad()
                loss_fn()
                opt.step()
        state = opt.state[m[0].weight]
        runs.append(([p.detach().clone() for p in m.parameters()], state["strength_step"],
                     {k: v.clone() for k, v in state.items() if k.startswith("strength_") and k != "strength_step"}))
    (w0, t0, l0), (w1, t1, l1) = runs
    assert t0 == t1 == 13 and all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert l0 and l0.keys() == l1.keys() and all(torch.equal(l0[k], l1[k]) and float(l0[k]) > 0 for k in l0)


def test_comparable_sparsity_across_optimizers_and_metrics():
    """At one strength, the fraction of exact zeros is within a factor of 3
    across SGD, Adam, AdamW, Adagrad and RMSprop, plain and preconditioned
    (with fixed l1 it differs by orders of magnitude)."""
    runs = [(pyreg.optim.SGD, dict(lr=0.1, momentum=0.9))] + [
        (cls, dict(kw, preconditioned=pre)) for cls, kw in
        [(pyreg.optim.Adam, dict(lr=1e-2)), (pyreg.optim.AdamW, dict(lr=1e-2)), (pyreg.optim.Adagrad, dict(lr=0.1)),
         (pyreg.optim.RMSprop, dict(lr=1e-3))] for pre in (False, True)]
    for a in (0.8, 0.95):
        got = []
        for cls, kw in runs:
            m, x, y = task()
            opt = cls(pyreg.param_groups(m, l1_strength=a), **kw)
            train(m, x, y, opt, 200)
            got.append(float(opt.sparsity().overall))
        assert min(got) > 0 and max(got) / min(got) <= 3.0, (a, got)


def test_per_layer_strength_tensor_and_changes_and_penalty():
    m, x, y = task()
    groups = [{"params": [m[0].weight, m[2].weight], "l1_strength": torch.tensor([0.9, 0.3]), "l1_refresh": 5},
              {"params": [m[4].weight, m[0].bias, m[2].bias, m[4].bias]}]
    opt = pyreg.optim.Adam(groups, lr=1e-2)
    train(m, x, y, opt, 60)
    l1 = [float(opt.state[p][KEY]) for p in (m[0].weight, m[2].weight)]
    assert l1[0] > l1[1] > 0
    s0, s2 = (float((w == 0).float().mean()) for w in (m[0].weight, m[2].weight))
    assert s0 > s2
    want = sum(a * float(p.detach().abs().sum()) for a, p in zip(l1, (m[0].weight, m[2].weight)))
    assert float(opt.penalty) == pytest.approx(want, rel=1e-5)
    opt.param_groups[0]["l1_strength"] = 0.0  # checked and applied at each tensor's next refresh
    train(m, x, y, opt, 5)
    assert [float(opt.state[p][KEY]) for p in (m[0].weight, m[2].weight)] == [0.0, 0.0]


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
def test_l1_refresh_changed_after_construction_is_followed(family):
    """l1_refresh 5, then 3 from step 8: the refreshes come at steps 5, then
    9, 12, 15, 18 (the steps divisible by the new value)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    group = {"params": [m[0].weight, m[2].weight], "l1_strength": 0.5, "l1_refresh": 5}
    opt = (pyreg.Regularized(torch.optim.Adam([group], lr=1e-2)) if family == "Regularized"
           else pyreg.optim.AdamW([group], lr=1e-2))
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    refreshed, prev = [], 0.0
    for t in range(1, 21):
        if t == 8:
            opt.param_groups[0]["l1_refresh"] = 3
        train(m, x, y, opt, 1)
        cur = float(opt.state[m[0].weight][KEY])
        if cur != prev:
            refreshed.append(t)
        prev = cur
    assert refreshed == [5, 9, 12, 15, 18]


@pytest.mark.parametrize("lrs", [(0.1, 0.1), (0.1, 0.05)], ids=["one-lr", "lr-per-tensor"])
def test_a_refresh_at_lr_0_keeps_the_l1_in_regularized(lrs):
    """Regularized measures the push from the step its inner optimizer took:
    a step of lr 0 shows none, so a tensor whose lr is 0 at a refresh keeps the
    l1 of its last refresh (the other tensors of the bucket refresh)."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5, 3))
    keys = {"l1_strength": 0.5, "l1_refresh": 2}
    opt = pyreg.Regularized(torch.optim.Adam([{"params": [a], "lr": lrs[0], **keys},
                                              {"params": [b], "lr": lrs[1], **keys}]))
    for t in range(1, 5):
        if t == 4:  # a refresh step
            opt.param_groups[1]["lr"] = 0.0
            if lrs[0] == lrs[1]:
                opt.param_groups[0]["lr"] = 0.0
        a.grad, b.grad = torch.randn(6, 4), torch.randn(5, 3)
        opt.step()
        l1 = [float(opt.state[p][STRENGTH_STATE[0]]) for p in (a, b)]
        if t == 2:
            at2 = l1
    assert at2[0] > 0 and at2[1] > 0
    assert l1[1] == at2[1]
    assert (l1[0] == at2[0]) if lrs[0] == lrs[1] else (l1[0] != at2[0] and l1[0] > 0)


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
def test_state_dict_round_trip(family):
    m, x, y = task(torch.bfloat16)

    def make(model):
        groups = pyreg.param_groups(model, l1_strength=0.5)
        for g in groups:
            g["l1_refresh"] = 4
        return (pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2)) if family == "Regularized"
                else pyreg.optim.AdamW(groups, lr=1e-2))

    opt = make(m)
    train(m, x, y, opt, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = copy.deepcopy(m)
    opt2 = make(m2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    a, b = opt.state[m[0].weight][KEY], opt2.state[m2[0].weight][KEY]
    assert b.dtype == torch.float64 and float(b) == float(a) > 0  # not cast to bfloat16
    assert opt2.state[m2[0].weight]["strength_step"] == 5
    train(m, x, y, opt, 6)  # the count goes on: the same refreshes, the same bits
    train(m2, x, y, opt2, 6)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


BAD = [({"l1_strength": -0.1}, "l1_strength"),
       ({"l1_strength": 1.5}, "l1_strength"),
       ({"l1_strength": float("nan")}, "l1_strength"),
       ({"l1_strength": [0.5, 0.5, 0.5]}, "l1_strength"),
       ({"l1_strength": 0.5, "l1_refresh": 0}, "l1_refresh"),
       ({"l1_strength": 0.5, "l1_refresh": 2.5}, "l1_refresh"),
       ({"l1_strength": 0.5, "l1_refresh": True}, "l1_refresh"),
       ({"l1_strength": 0.5, "l1": 1e-3}, "'l1'"),
       ({"l1_strength": 0.5, "target_sparsity": 0.5}, "target_sparsity"),
       ({"l1_strength": 0.5, "group_l1": 1e-3}, "group_l1"),
       ({"group_strength": 1.5}, "group_strength"),
       ({"group_strength": -0.5}, "group_strength"),
       ({"group_strength": 0.5, "group_l1": 1e-3}, "group_l1"),
       ({"group_strength": 0.5, "l1_strength": 0.5}, "l1_strength"),
       ({"group_strength": 0.5, "target_sparsity": 0.5}, "target_sparsity"),
       ({"group_strength": 0.5, "group_dim": 5}, "group_dim")]


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
@pytest.mark.parametrize("keys,words", BAD)
def test_bad_values_raise_and_change_nothing(family, keys, words):
    bad_key_changes_nothing(family, {"l1_strength": 0.3, "l1_refresh": 1}, keys, words)


def test_param_groups_keyword_and_gradient_mode():
    m = nn.Linear(5, 3)
    groups = pyreg.param_groups(m, l1_strength=0.4)
    assert [g.get("l1_strength") for g in groups] == [0.4, None]  # the bias is excluded
    for bad in (1.2, -1.0, float("nan")):
        with pytest.raises(ValueError, match="l1_strength"):
            pyreg.param_groups(m, l1_strength=bad)
    with pytest.raises(ValueError, match="l1_strength"):
        pyreg.param_groups(m, l1=1e-3, l1_strength=0.4)
    with pytest.raises(ValueError, match="mode='proximal'"):  # refused when given
        pyreg.Regularized(torch.optim.SGD(groups, lr=0.1), mode="gradient")
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1))
    opt.mode = "gradient"  # or when the mode is set later: at the step, which changes nothing
    m(torch.randn(4, 5)).sum().backward()
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="mode='proximal'"):
        opt.step()
    assert torch.equal(m.weight.detach(), before)
    opt = pyreg.Regularized(torch.optim.SGD([m.bias], lr=0.1), mode="gradient")
    with pytest.raises(ValueError, match="mode='proximal'"):
        opt.add_param_group({"params": [m.weight], "l1_strength": 0.5})
    assert len(opt.param_groups) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_is_refused():
    """Its refresh is counted on the host: a captured step would replay one
    decision forever, so capture raises, with nothing captured half-way."""
    m = nn.Linear(16, 4).cuda()
    opt = pyreg.optim.Adam(pyreg.param_groups(m, l1_strength=0.5), lr=1e-2, capturable=True)
    x = torch.randn(8, 16, device="cuda")
    m(x).sum().backward()
    opt.step()  # warm-up, eager
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(g):
            opt.step()


@pytest.mark.parametrize("family", ["fused", "regularized"])
def test_a_tensor_without_a_grad_at_its_refresh_is_refreshed_at_its_own_steps(family):
    """l1_strength counts each tensor's own steps (those where it has a grad):
    a tensor with a grad only at odd steps, with l1_refresh=2, is refreshed at
    its 2nd, 4th, ... steps (with the bucket's count it was due only at even
    steps, when it had no grad, and kept l1 = 0 for ever); both families
    count alike."""
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(20, 20)), torch.nn.Parameter(torch.randn(20, 20))
    groups = [{"params": [w1, w2], "l1_strength": 0.8, "l1_refresh": 2}]
    opt = (pyreg.optim.Adam(groups, lr=0.01) if family == "fused"
           else pyreg.Regularized(torch.optim.Adam(groups, lr=0.01)))
    seen = []
    for t in range(1, 9):
        opt.zero_grad()
        w1.grad = torch.randn(20, 20)
        if t % 2 == 1:
            w2.grad = torch.randn(20, 20)
        opt.step()
        seen.append((opt.state[w1]["strength_step"], opt.state[w2]["strength_step"],
                     float(opt.state[w2]["strength_l1"]) > 0))
    assert [s[:2] for s in seen] == [(t, (t + 1) // 2) for t in range(1, 9)]
    assert [s[2] for s in seen] == [False, False, True, True, True, True, True, True]  # its 2nd step: t = 3


def test_strength_counts_are_the_same_in_both_families():
    """A bucket whose tensors have no grad at some steps: the fused optimizer
    and Regularized count the same steps and end at the same weights."""
    def run(family):
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(20, 20)), torch.nn.Parameter(torch.randn(20))
        groups = [{"params": [w], "l1_strength": 0.8, "l1_refresh": 2}, {"params": [b]}]
        opt = (pyreg.optim.SGD(groups, lr=0.1) if family == "fused"
               else pyreg.Regularized(torch.optim.SGD(groups, lr=0.1)))
        gen = torch.Generator().manual_seed(1)
        for t in range(1, 13):
            opt.zero_grad()
            b.grad = torch.randn(20, generator=gen)
            if t % 2 == 1:
                w.grad = torch.randn(20, 20, generator=gen)
            opt.step()
        return opt.state[w]["strength_step"], w.detach().clone()
    (tf, wf), (tr, wr) = run("fused"), run("regularized")
    assert tf == tr == 6
    torch.testing.assert_close(wf, wr, rtol=1e-5, atol=1e-6)
    assert int((wf == 0).sum()) > 0


@pytest.mark.parametrize("sizes, want", [([1000, 100000], [0, 1]), ([44800, 84000, 1200], [0, 1, 1]),
                                         ([1, 1_000_000, 1], [0, 1, 2])])
def test_refresh_phases_put_a_large_tensor_after_small_ones_in_its_own_slice(sizes, want):
    from pyreg.optim.apply import refresh_phases
    slices, s = refresh_phases(sizes)
    assert slices == want and s == max(want) + 1


def _sgd_run(model, inner, steps, opt=None):
    """``steps`` steps of Regularized over torch's SGD (``inner``: its
    arguments) with l1_strength refreshed every 3 steps, on fixed data."""
    if opt is None:
        groups = pyreg.param_groups(model, l1_strength=0.5)
        for g in groups:
            g["l1_refresh"] = 3
        opt = pyreg.Regularized(torch.optim.SGD(groups, **inner))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    train(model, x, y, opt, steps)
    return opt


@pytest.mark.parametrize("inner", [dict(lr=0.1), dict(lr=0.1, momentum=0.9)], ids=["plain", "momentum"])
@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_a_run_resumed_after_any_step_refreshes_at_the_same_steps(at, inner):
    """A state dict saved after any step, the first included, holds every
    tensor's count, also where the inner optimizer keeps no state of its
    own (SGD without momentum): the resumed run refreshes at the same steps
    as the run that went on, to the same bits."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    opt = _sgd_run(m, inner, at)
    assert all(opt.state[p]["strength_step"] == at for p in (m[0].weight, m[2].weight))
    saved, m2 = copy.deepcopy(opt.state_dict()), copy.deepcopy(m)
    _sgd_run(m, inner, 7, opt)
    opt2 = _sgd_run(m2, inner, 0)
    opt2.load_state_dict(saved)
    _sgd_run(m2, inner, 7, opt2)
    assert opt2.state[m2[0].weight]["strength_step"] == at + 7
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_a_state_loaded_into_the_inner_optimizer_rewinds_the_counts():
    """A state dict loaded into the wrapped optimizer itself (not through
    Regularized) sets the counts back: the run goes on from it as the run
    that went on from the saved step."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    inner = dict(lr=0.1, momentum=0.9)
    opt = _sgd_run(m, inner, 4)
    saved, weights = copy.deepcopy(opt.optimizer.state_dict()), copy.deepcopy(m.state_dict())
    _sgd_run(m, inner, 7, opt)
    want = [p.detach().clone() for p in m.parameters()]
    m.load_state_dict(weights)
    opt.optimizer.load_state_dict(saved)
    _sgd_run(m, inner, 7, opt)
    assert opt.state[m[0].weight]["strength_step"] == 11
    for p, q in zip(m.parameters(), want):
        assert torch.equal(p, q)


class _FailingAdam(torch.optim.Adam):
    fail = False

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("boom")
        return super().step(closure)


@pytest.mark.parametrize("how", ["closure", "inner pre-hook", "inner step"])
def test_a_step_that_raises_is_not_counted(how):
    """A Regularized step whose inner step raises (its closure; a step
    pre-hook of the inner optimizer, or its step itself, on the fast path
    after good steps, at a step that refreshes nothing) changes nothing, its
    count of steps included: the run refreshes at the steps of a run without
    the failed call, to the same bits."""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
        groups = pyreg.param_groups(m, l1_strength=0.5)
        for g in groups:
            g["l1_refresh"] = 3
        return m, pyreg.Regularized(_FailingAdam(groups, lr=1e-2))
    (m, opt), (m2, opt2) = make(), make()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    train(m, x, y, opt, 4)
    train(m2, x, y, opt2, 4)
    fail = [True]

    def boom(*_):
        if fail[0]:
            raise RuntimeError("boom")
    if how == "inner pre-hook":
        opt.optimizer.register_step_pre_hook(boom)
    opt.optimizer.fail = how == "inner step"
    opt.zero_grad()
    (m(x) - y).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(boom if how == "closure" else None)
    fail[0] = opt.optimizer.fail = False
    assert opt.state[m[0].weight]["strength_step"] == 4
    train(m, x, y, opt, 5)
    train(m2, x, y, opt2, 5)
    assert opt.state[m[0].weight]["strength_step"] == opt2.state[m2[0].weight]["strength_step"] == 9
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
