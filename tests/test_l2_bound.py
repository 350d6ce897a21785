"""``l2_bound``: Constrained Parameter Regularization (Franke et al., NeurIPS
2024) in both optimizer families, against the paper's update rule written out
here in float64, on every backend; its state in the state dict; bad values
rejected with nothing modified."""
import io
import math

import pytest
import torch

import pyreg
from pyreg.optim.apply import BOUND_STATE
from conftest import bad_key_changes_nothing, needs_emu

BACKENDS = ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"]
SHAPES = [(7, 5), (13,), (3, 4, 2), ()]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def make_grads(n_steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(n_steps)]


def reference(params, grads, torch_cls, kw, bound, warmup, mu):
    """The rule, per tensor j after the optimizer's step, in float64:
    lambda_j <- max(0, lambda_j + mu / n_j * (||theta_j||^2 - kappa_j)),
    theta_j <- theta_j - 2 lambda_j theta_j; with a warm start, kappa_j is
    +inf (lambda_j = 0) until step ``warmup``, whose ||theta_j||^2 it becomes.
    Returns the weights, the multipliers after each step and the bounds a
    warm start took (+inf for a given bound: the state does not copy it)."""
    ps = [p.detach().clone().double().requires_grad_() for p in params]
    opt = torch_cls(ps, **kw)
    lam = [0.0] * len(ps)
    kappa = [math.inf if warmup else bound] * len(ps)
    lams = []
    for t, gs in enumerate(grads, 1):
        for p, g in zip(ps, gs):
            p.grad = g.double()
        opt.step()
        with torch.no_grad():
            for j, p in enumerate(ps):
                r = float((p * p).sum())
                lam[j] = 0.0 if math.isinf(kappa[j]) else max(0.0, lam[j] + mu / p.numel() * (r - kappa[j]))
                p.mul_(1 - 2 * lam[j])
                if warmup and t == warmup:
                    kappa[j] = r
        lams.append(list(lam))
    return [p.detach() for p in ps], lams, kappa if warmup else [math.inf] * len(ps)


def pyreg_run(family, params, grads, kw, keys, backend="cpu"):
    ps = [p.detach().clone().requires_grad_() for p in params]
    group = dict(keys, params=ps)
    if family == "Regularized":
        opt = pyreg.Regularized(torch.optim.SGD([group], **kw))
    else:
        opt = getattr(pyreg.optim, family)([group], **kw)
    lams = []
    with pyreg.use_backend(backend):
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            lams.append([float(opt.state[p][BOUND_STATE[0]]) for p in ps])
    return ps, opt, lams


FAMILIES = [("Regularized", torch.optim.SGD, dict(lr=0.3, momentum=0.5)),
            ("SGD", torch.optim.SGD, dict(lr=0.3, momentum=0.5)),
            ("AdamW", torch.optim.AdamW, dict(lr=0.2, weight_decay=0.0)),
            ("Adagrad", torch.optim.Adagrad, dict(lr=0.5))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("warmup", [0, 3], ids=["bound", "warm_start"])
@pytest.mark.parametrize("family,torch_cls,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_matches_the_update_rule(family, torch_cls, kw, warmup, dtype, backend):
    params, grads = make_params(dtype), make_grads(12, dtype)
    bound = 0.6 * min(float(p.double().pow(2).sum()) for p in params if p.numel() > 1)
    mu = 0.03
    keys = ({"l2_bound": "warm_start", "l2_warmup": warmup} if warmup else {"l2_bound": bound}) | {"l2_mu": mu}
    want, want_lams, kappa = reference(params, grads, torch_cls, kw, bound, warmup, mu)
    got, opt, lams = pyreg_run(family, params, grads, kw, keys, backend)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach().double(), b, **tol)
    torch.testing.assert_close(torch.tensor(lams), torch.tensor(want_lams), **tol)
    assert 1e-2 < max(max(x) for x in want_lams) < 0.5  # the constraint acted, in a stable regime
    if warmup:
        assert all(x == 0.0 for x in want_lams[warmup - 1])  # no constraint during the warm-up
    for p, k in zip(got, kappa):
        s = opt.state[p]
        assert s[BOUND_STATE[0]].dtype == torch.float64 and s[BOUND_STATE[2]].dtype == torch.int64
        assert int(s[BOUND_STATE[2]]) == len(grads)
        torch.testing.assert_close(s[BOUND_STATE[1]].double(), torch.tensor(k, dtype=torch.float64), **tol)


def test_warm_start_bound_is_the_norm_after_warmup():
    params, grads = make_params(torch.float64), make_grads(6, torch.float64)
    ps = [p.clone().requires_grad_() for p in params]
    opt = pyreg.optim.SGD([{"params": ps, "l2_bound": "warm_start", "l2_warmup": 4}], lr=0.1)
    for t, gs in enumerate(grads, 1):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        kappa = [float(opt.state[p][BOUND_STATE[1]]) for p in ps]
        if t < 4:
            assert all(math.isinf(k) for k in kappa)
        if t == 4:
            assert kappa == pytest.approx([float(p.detach().pow(2).sum()) for p in ps], rel=1e-12)
            at4 = kappa
    assert kappa == at4  # set once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["Regularized", "SGD"])
def test_a_warm_up_shortened_below_the_steps_taken_sets_the_bound_at_the_next_step(family, backend):
    params, grads = make_params(torch.float64), make_grads(8, torch.float64)
    ps = [p.clone().requires_grad_() for p in params]
    group = {"params": ps, "l2_bound": "warm_start", "l2_warmup": 10, "l2_mu": 0.1}
    opt = (pyreg.Regularized(torch.optim.SGD([group], lr=0.1)) if family == "Regularized"
           else pyreg.optim.SGD([group], lr=0.1))
    with pyreg.use_backend(backend):
        for t, gs in enumerate(grads, 1):
            if t == 4:
                opt.param_groups[0]["l2_warmup"] = 2  # (3 steps taken, no bound yet)
            if t == 6:
                opt.param_groups[0]["l2_warmup"] = 7  # a later end: the bound set stays
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            kappa = [float(opt.state[p][BOUND_STATE[1]]) for p in ps]
            if t < 4:
                assert all(math.isinf(k) for k in kappa)
            if t == 4:
                assert kappa == pytest.approx([float(p.detach().pow(2).sum()) for p in ps], rel=1e-12)
                at4 = kappa
    assert kappa == at4
    assert max(float(opt.state[p][BOUND_STATE[0]]) for p in ps) > 0  # the bound acted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["Regularized", "SGD"])
def test_a_given_bound_switched_to_a_warm_start_takes_the_norm(family, backend):
    """A given bound, then ``"warm_start"`` set after the warm-up's steps:
    the next step takes each tensor's norm as its bound (no constraint at
    that step), as a warm start from the beginning would have at its k-th
    step; back to a given bound and to the warm start again: the bound it
    took stays."""
    params, grads = make_params(torch.float64), make_grads(9, torch.float64)
    ps = [p.clone().requires_grad_() for p in params]
    given = 0.6 * min(float(p.double().pow(2).sum()) for p in params if p.numel() > 1)
    group = {"params": ps, "l2_bound": given, "l2_mu": 0.1}
    opt = (pyreg.Regularized(torch.optim.SGD([group], lr=0.1)) if family == "Regularized"
           else pyreg.optim.SGD([group], lr=0.1))
    with pyreg.use_backend(backend):
        for t, gs in enumerate(grads, 1):
            g = opt.param_groups[0]
            if t == 4:
                g["l2_bound"], g["l2_warmup"] = "warm_start", 2  # (3 steps taken)
            if t == 6:
                g["l2_bound"], g["l2_warmup"] = given, None
            if t == 8:
                g["l2_bound"], g["l2_warmup"] = "warm_start", 2
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
            kappa = [float(opt.state[p][BOUND_STATE[1]]) for p in ps]
            lams = [float(opt.state[p][BOUND_STATE[0]]) for p in ps]
            if t == 3:
                assert max(lams) > 0  # the given bound acted
                assert all(math.isinf(k) for k in kappa)  # (not copied into the state)
            if t == 4:
                assert kappa == pytest.approx([float(p.detach().pow(2).sum()) for p in ps], rel=1e-12)
                assert lams == [0.0] * len(ps)
                at4 = kappa
            if t >= 5:
                assert kappa == at4
    assert max(lams) > 0  # the warm bound acted again at steps 8 and 9


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
def test_state_dict_round_trip(family):
    """Save after 5 steps, load into a fresh optimizer, 5 more: the same as 10
    steps in one go; the multipliers keep float64 (torch would cast them to a
    bfloat16 parameter's dtype) and the step counts int64."""
    dtype = torch.bfloat16
    params, grads = make_params(dtype), make_grads(10, dtype)
    keys = {"l2_bound": "warm_start", "l2_warmup": 2, "l2_mu": 0.1}
    kw = dict(lr=0.3, momentum=0.5) if family == "Regularized" else dict(lr=0.2)
    whole, _, _ = pyreg_run(family, params, grads, kw, keys)
    first, opt, _ = pyreg_run(family, params, grads[:5], kw, keys)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    ps = [p.detach().clone().requires_grad_() for p in first]
    group = dict(keys, params=ps)
    opt2 = (pyreg.Regularized(torch.optim.SGD([group], **kw)) if family == "Regularized"
            else pyreg.optim.AdamW([group], **kw))
    opt2.load_state_dict(sd)
    assert any(float(opt2.state[p][BOUND_STATE[0]]) > 0 for p in ps)  # the constraint acted
    for p in ps:
        s = opt2.state[p]
        assert s[BOUND_STATE[0]].dtype == torch.float64 and s[BOUND_STATE[1]].dtype == torch.float64
        assert s[BOUND_STATE[2]].dtype == torch.int64 and int(s[BOUND_STATE[2]]) == 5
    for gs in grads[5:]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(ps, whole):
        assert torch.equal(a, b)


def test_only_params_with_a_grad_and_changes_after_construction():
    params, grads = make_params(torch.float64), make_grads(4, torch.float64)
    ps = [p.clone().requires_grad_() for p in params]
    opt = pyreg.optim.SGD([{"params": ps, "l2_bound": 0.5}], lr=0.1)
    for p, g in zip(ps[1:], grads[0][1:]):
        p.grad = g.clone()
    before = ps[0].detach().clone()
    opt.step()
    assert torch.equal(ps[0].detach(), before) and BOUND_STATE[0] not in opt.state[ps[0]]
    lam1 = float(opt.state[ps[1]][BOUND_STATE[0]])
    assert lam1 > 0
    ps[0].grad = grads[1][0].clone()  # now every param: ps[1]'s multiplier goes on from its value
    opt.param_groups[0]["l2_mu"] = 0.0  # and a rate of 0 keeps it
    opt.step()
    assert float(opt.state[ps[1]][BOUND_STATE[0]]) == lam1
    assert int(opt.state[ps[0]][BOUND_STATE[2]]) == 1 and int(opt.state[ps[1]][BOUND_STATE[2]]) == 2


def test_penalty_is_not_the_constraint():
    ps = [p.clone().requires_grad_() for p in make_params(torch.float64)]
    opt = pyreg.optim.AdamW([{"params": ps, "l2_bound": 0.1}], lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.penalty) == 0.0


BAD = [({"l2_bound": "warm_start"}, "l2_warmup"),
       ({"l2_bound": "warm_start", "l2_warmup": 0}, "l2_warmup"),
       ({"l2_bound": "warm_start", "l2_warmup": 2.5}, "l2_warmup"),
       ({"l2_bound": "warm-start", "l2_warmup": 2}, "'warm_start'"),
       ({"l2_bound": 1.0, "l2_warmup": 2}, "l2_warmup"),
       ({"l2_warmup": 2}, "l2_warmup"),
       ({"l2_bound": -1.0}, "l2_bound"),
       ({"l2_bound": float("nan")}, "l2_bound"),
       ({"l2_bound": 1.0, "l2_mu": -0.5}, "l2_mu"),
       ({"l2_bound": 1.0, "l2_mu": float("inf")}, "l2_mu")]


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
@pytest.mark.parametrize("keys,words", BAD)
def test_bad_values_raise_and_change_nothing(family, keys, words):
    bad_key_changes_nothing(family, {"l2_bound": 10.0}, keys, words)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emu", marks=needs_emu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_follow_the_torch_rule_over_many_tensors(backend, dtype):
    """The compiled update (one call per bucket: the CPU kernel, or on the
    emulator the CUDA kernels' three launches, in batches of tensors) against
    the rule in torch ops (the torch backend), over 900 tensors (more than a
    launch takes): odd and empty sizes, tensors of several chunks, a bound per
    tensor; a given-bound group and a warm-start one."""
    g = torch.Generator().manual_seed(4)
    sizes = [int(s) for s in torch.randint(0, 40, (900,), generator=g)] + [70001, 300001, 0]

    def run(be):
        ps = [torch.randn(n, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(dtype)
              .requires_grad_() for i, n in enumerate(sizes)]
        bounds = [0.3 * float(p.detach().double().pow(2).sum()) + 0.01 for p in ps[:600]]
        groups = [{"params": ps[:600], "l2_bound": bounds, "l2_mu": 0.2},
                  {"params": ps[600:], "l2_bound": "warm_start", "l2_warmup": 2, "l2_mu": 1.0}]
        opt = pyreg.optim.SGD(groups, lr=0.05)
        with pyreg.use_backend(be):
            for step in range(5):
                for i, p in enumerate(ps):
                    p.grad = torch.full_like(p, 0.01 * ((i + step) % 5 - 2))
                opt.step()
        return ps, [opt.state[p][k] for p in ps for k in BOUND_STATE]

    got, got_state = run(backend)
    want, want_state = run("torch")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **tol)
    lam = [float(x) for x in got_state[0::3]]
    assert max(lam[:600]) > 1e-2 and max(lam[600:]) > 1e-3  # the bounds acted, in both groups
    # The multipliers: the kernels sum R in float64, the torch ops square the
    # norm in the result dtype, and a warm-started bound makes R - kappa a
    # difference of near-equal numbers: an absolute tolerance.
    torch.testing.assert_close(torch.stack(got_state[0::3]), torch.stack(want_state[0::3]), rtol=1e-3, atol=5e-6)
    assert torch.equal(torch.stack(got_state[2::3]), torch.stack(want_state[2::3]))  # step counts
