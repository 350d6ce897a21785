"""Tests of pyreg.Regularized and pyreg.param_groups."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import pyreg
from pyreg import optim as pyreg_optim

TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float64: dict(rtol=1e-7, atol=1e-7)}


def _params(dtype=torch.float32, seed=0, shapes=((5, 4), (7,), (3, 3, 2))):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(params, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


# --------------------------------------------------------------------------
# Equivalences and closed forms
# --------------------------------------------------------------------------
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)])
def test_gradient_l2_matches_torch_weight_decay(momentum, nesterov, maximize):
    # with maximize, torch's decay still shrinks the weights (it is added after the grad's negation):
    # so does the penalty's gradient
    wd = 0.1
    ps, ref = _params(), _params()
    opt = pyreg.Regularized(torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov, maximize=maximize),
                            l2=pyreg.from_weight_decay(wd), mode="gradient")
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                              maximize=maximize)
    for step in range(8):
        for p, r, g in zip(ps, ref, _grads(ps, step)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r, **TOL[torch.float32])


def test_proximal_l2_closed_form():
    lr, l2 = 0.1, 0.3
    ps = _params(torch.float64)
    expect = [p.detach().clone() for p in ps]
    opt = pyreg.Regularized(torch.optim.SGD(ps, lr=lr), l2=l2)
    for step in range(5):
        grads = _grads(ps, step)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        expect = [(w - lr * g) / (1 + 2 * lr * l2) for w, g in zip(expect, grads)]
        for p, e in zip(ps, expect):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_l1_proximal_reaches_exact_zeros_gradient_oscillates():
    """Zero data loss: only the L1 term acts. The proximal step lands on exact
    zeros; the subgradient step overshoots and flips sign forever."""
    init = torch.tensor([0.0123, -0.0377, 0.0211, -0.0049])
    lr, l1 = 0.1, 0.05  # lr * l1 = 0.005
    w_prox, w_grad = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    prox = pyreg.Regularized(torch.optim.SGD([w_prox], lr=lr), l1=l1, mode="proximal")
    grad = pyreg.Regularized(torch.optim.SGD([w_grad], lr=lr), l1=l1, mode="gradient")
    flips = torch.zeros(4, dtype=torch.int64)
    for _ in range(50):
        for w, o in ((w_prox, prox), (w_grad, grad)):
            w.grad = torch.zeros_like(w)
            before = w.detach().sign()
            o.step()
            if o is grad:
                flips += (w.detach().sign() != before).long()
                assert (w.detach() != 0).all()
    assert (w_prox.detach() == 0).all()
    assert (flips >= 10).all()  # keeps oscillating around 0
    assert w_grad.detach().abs().max() <= lr * l1
    assert float(prox.sparsity().overall) == 1.0 and float(grad.sparsity().overall) == 0.0


# --------------------------------------------------------------------------
# Matrix: inner optimizers x penalties x modes x dtypes vs a per-tensor reference
# --------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
}
PENALTIES = {"none": (0.0, 0.0), "l1": (0.2, 0.0), "l2": (0.0, 0.3), "elastic": (0.2, 0.3)}


def _groups(ps, l1, l2):
    """Three groups: defaults, a per-group override (scaled, other lr) and an excluded one."""
    return [{"params": ps[:1]},
            {"params": ps[1:2], "l1": 2 * l1, "l2": 0.5 * l2, "lr": 0.02},
            {"params": ps[2:], "l1": 0.0, "l2": 0.0}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["gradient", "proximal"])
@pytest.mark.parametrize("pen", list(PENALTIES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matrix_matches_reference(name, pen, mode, dtype):
    l1, l2 = PENALTIES[pen]
    ps, ref = _params(dtype), _params(dtype)
    opt = pyreg.Regularized(OPTIMIZERS[name](_groups(ps, l1, l2)), l1=l1, l2=l2, mode=mode)
    ref_opt = OPTIMIZERS[name](_groups(ref, l1, l2))
    coefs = [(l1, l2), (2 * l1, 0.5 * l2), (0.0, 0.0)]
    for step in range(3):
        for p, r, g in zip(ps, ref, _grads(ps, step)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        # Reference: the torch backend, one tensor at a time.
        with pyreg.use_backend("torch"):
            if mode == "gradient":
                for r, (c1, c2) in zip(ref, coefs):
                    pyreg.add_penalty_grad_([r], [r.grad], c1, c2)
            ref_opt.step()
            if mode == "proximal":
                for r, (c1, c2), group in zip(ref, coefs, ref_opt.param_groups):
                    pyreg.prox_([r], c1, c2, group["lr"])
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r, **TOL[dtype])
            if mode == "proximal" and dtype == torch.float32:
                assert torch.equal(p.detach() == 0, r.detach() == 0)


# --------------------------------------------------------------------------
# Convergence to scikit-learn
# --------------------------------------------------------------------------
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_proximal_gd_matches_sklearn(l1_ratio):
    sklm = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    n, d = 200, 12
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.zeros(d, dtype=torch.float64)
    w_true[:4] = torch.tensor([2.0, -1.5, 1.0, 0.5])
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    alpha = 0.1
    if l1_ratio == 1.0:
        sk = sklm.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100000)
    else:
        sk = sklm.ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-12, max_iter=100000)
    sk.fit(X.numpy(), y.numpy())
    expect = torch.from_numpy(sk.coef_)

    l1, l2 = pyreg.from_sklearn(alpha, l1_ratio)
    lr = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max())
    w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = pyreg.Regularized(torch.optim.SGD([w], lr=lr), l1=l1, l2=l2, mode="proximal")
    for _ in range(1500):
        opt.zero_grad()
        (0.5 * ((X @ w - y) ** 2).mean()).backward()
        opt.step()
    torch.testing.assert_close(w.detach(), expect, rtol=0, atol=1e-3)
    assert torch.equal(w.detach() == 0, expect == 0)
    assert (expect == 0).any()  # the problem does have zeros


# --------------------------------------------------------------------------
# torch.optim protocol: state dicts, schedulers, hooks, closures, GradScaler
# --------------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("mode", ["gradient", "proximal"])
def test_state_dict_round_trip(mode):
    m1 = _model()
    opt1 = pyreg.Regularized(torch.optim.Adam(pyreg.param_groups(m1, l1=1e-3, l2=1e-2), lr=0.01),
                             l1=0.5, l2=0.25, mode=mode)
    _train(m1, opt1, 3)
    opt1.param_groups[0]["l1"] = 0.02  # a run-time change is saved too
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    m2 = _model(seed=5)
    m2.load_state_dict(saved["model"])
    opt2 = pyreg.Regularized(torch.optim.Adam(pyreg.param_groups(m2, l1=1.0), lr=0.5), mode=mode)
    opt2.load_state_dict(saved["opt"])
    assert (opt2.l1, opt2.l2, opt2.mode) == (0.5, 0.25, mode)
    assert opt2.param_groups[0]["l1"] == 0.02 and opt2.param_groups[0]["l2"] == 1e-2
    assert opt2.param_groups[0]["lr"] == 0.01
    assert opt2.param_groups[0]["param_names"] == ["0.weight", "3.weight"]
    _train(m1, opt1, 3, seed=7)
    _train(m2, opt2, 3, seed=7)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt2.state is opt2.optimizer.state  # still shared after the load


def test_lr_scheduler_uses_current_lr():
    lr0, l2 = 0.2, 0.5
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = pyreg.Regularized(torch.optim.SGD([w], lr=lr0), l2=l2)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expect = torch.ones(3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for step in range(4):
            lr = lr0 * 0.5 ** step
            assert opt.param_groups[0]["lr"] == pytest.approx(lr)
            w.grad = torch.zeros_like(w)
            opt.step()
            sched.step()
            expect = expect / (1 + 2 * lr * l2)
    torch.testing.assert_close(w.detach(), expect)


def test_scheduler_two_groups_of_different_lr_in_one_bucket():
    # Both groups' tensors share one fused call (one device, one dtype) with a
    # per-tensor lr; StepLR changes both lrs every step. Against a float64
    # reference step by step (SGD, then the prox with the group's lr).
    g = torch.Generator().manual_seed(11)
    init = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4)]
    grads = [[torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4)] for _ in range(5)]
    ws = [nn.Parameter(x.clone()) for x in init]
    lrs0, l1, l2 = (0.2, 0.1), 0.3, 0.05
    inner = torch.optim.SGD([{"params": ws[:2], "lr": lrs0[0]}, {"params": ws[2:], "lr": lrs0[1]}])
    opt = pyreg.Regularized(inner, l1=l1, l2=l2, mode="proximal")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = [x.clone() for x in init]
    for step in range(5):
        for w, gr in zip(ws, grads[step]):
            w.grad = gr.clone()
        opt.step()
        sched.step()
        for i, gr in enumerate(grads[step]):
            lr = lrs0[i // 2] * 0.5 ** step
            v = ref[i] - lr * gr
            shrunk = torch.sign(v) * (v.abs() - lr * l1) / (1 + 2 * lr * l2)
            ref[i] = torch.where(v.abs() <= lr * l1, torch.zeros_like(v), shrunk)
        for i, w in enumerate(ws):
            torch.testing.assert_close(w.detach(), ref[i], rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"step {step}, tensor {i}: {m}")
            assert torch.equal(w.detach() == 0, ref[i] == 0)


def test_hooks_closure_zero_grad_add_param_group():
    w = nn.Parameter(torch.ones(4))
    opt = pyreg.Regularized(torch.optim.SGD([w], lr=0.1), l1=0.1, l2=0.05, mode="gradient")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o is opt)))

    def closure():
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [("pre", True), ("post", True)]
    assert float(loss.detach()) == 8.0
    # grad 2 + l1 * 1 + 2 * l2 * 1 = 2.2
    torch.testing.assert_close(w.detach(), torch.full((4,), 1 - 0.1 * 2.2))
    opt.zero_grad()
    assert w.grad is None

    v = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [v], "l2": 0.5})
    assert opt.param_groups[1]["l1"] == 0.1 and opt.param_groups[1]["l2"] == 0.5
    assert len(opt.optimizer.param_groups) == 2
    v.grad = torch.zeros(2)
    opt.step()  # w has no grad: untouched; v gets l1 * sign(v) + 2 * l2 * v = 1.1
    torch.testing.assert_close(v.detach(), torch.full((2,), 0.89))
    assert torch.equal(w.detach(), torch.full((4,), 1 - 0.1 * 2.2))


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_gradient_mode_with_lbfgs_minimizes_the_loss_plus_the_penalty(line_search):
    """LBFGS's line search compares the closure's values: in gradient mode they are the loss plus the
    penalty, whose gradient the grads hold (the step still returns the closure's own loss)."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    l2 = 0.3
    exact = torch.linalg.solve(X.T @ X / 32 + 2 * l2 * torch.eye(6, dtype=torch.float64), X.T @ y / 32)
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = pyreg.Regularized(torch.optim.LBFGS([w], lr=1, max_iter=50, line_search_fn=line_search), l2=l2,
                            mode="gradient")
    losses = []

    def closure():
        opt.zero_grad()
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
        return loss

    for _ in range(5):
        n = len(losses)
        out = opt.step(closure)
        assert torch.equal(out.detach(), losses[n])  # the first evaluation's loss, without the penalty
    torch.testing.assert_close(w.detach(), exact, rtol=0, atol=1e-5)


def test_gradient_mode_takes_the_penalty_gradient_back_out_where_the_inner_step_raises():
    w = nn.Parameter(torch.randn(4))
    opt = pyreg.Regularized(torch.optim.Adam([w], lr=0.1), l1=0.5, l2=0.1, mode="gradient")
    w.grad = torch.randn(4)
    opt.step()
    w.data = torch.randn(3)  # (Adam's state is still for 4 elements: torch's step raises)
    w.grad = torch.randn(3)
    before = w.grad.clone()
    with pytest.raises(RuntimeError):
        opt.step()
    torch.testing.assert_close(w.grad, before, rtol=0, atol=1e-6)  # (to rounding: added, then subtracted)


@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_a_group_sharing_memory_with_another_group_is_refused(family):
    a = nn.Parameter(torch.randn(20))
    alias = nn.Parameter(a.data[:7])
    make = ((lambda gs: pyreg.Regularized(torch.optim.SGD(gs, lr=0.1), l1=0.01)) if family == "Regularized"
            else (lambda gs: pyreg.optim.SGD(gs, lr=0.1, l1=0.01)))
    opt = make([a])
    with pytest.raises(ValueError, match=r"'param_groups.0.0' and 'param_groups.1.0' share memory"):
        opt.add_param_group({"params": [alias], "l1": 0.1})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.randn(7))], "l1": 0.1})  # apart: added
    with pytest.raises(ValueError, match="share memory"):  # two groups given at construction
        make([{"params": [a]}, {"params": [alias]}])


@pytest.mark.parametrize("mode", ["gradient", "proximal"])
def test_grad_scaler_skipped_step_does_not_regularize(mode):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("no torch.amp.GradScaler")
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no CPU GradScaler: {e}")
    w = nn.Parameter(torch.tensor([0.5, -0.3, 0.01]))
    opt = pyreg.Regularized(torch.optim.SGD([w], lr=0.1), l1=0.2, l2=0.1, mode=mode)
    opt.zero_grad()
    scaler.scale((w * 0).sum()).backward()
    w.grad[0] = float("inf")
    before = w.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), before)
    assert scaler.get_scale() < 1024.0
    # a finite step regularizes
    opt.zero_grad()
    scaler.scale((w * 0).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(w.detach(), before)
    if mode == "proximal":
        assert w.detach()[2] == 0


@pytest.mark.parametrize("mode", ["gradient", "proximal"])
def test_none_grad_and_frozen_params_untouched(mode):
    a, b, c = (nn.Parameter(torch.full((3,), 0.5)) for _ in range(3))
    c.requires_grad_(False)
    opt = pyreg.Regularized(torch.optim.SGD([a, b, c], lr=0.1), l1=0.1, l2=0.1, mode=mode)
    a.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(b.detach(), torch.full((3,), 0.5)) and b.grad is None
    assert torch.equal(c.detach(), torch.full((3,), 0.5))
    assert (a.detach() < 0.5).all()
    # the same with a penalty-carrying subset: the penalty counts only `a`
    expect = pyreg.penalty([a], 0.1, 0.1)
    if mode == "gradient":
        a.grad = torch.zeros(3)
        opt.step()
    torch.testing.assert_close(opt.penalty, expect)


def test_penalty_values():
    ps = _params(torch.float64)
    for mode in ("gradient", "proximal"):
        ws = [nn.Parameter(p.detach().clone()) for p in ps]
        opt = pyreg.Regularized(torch.optim.SGD([{"params": ws[:2]}, {"params": ws[2:], "l1": 0.7}], lr=0.1),
                                l1=0.1, l2=0.2, mode=mode)
        assert float(opt.penalty) == 0.0  # before any step
        for w, g in zip(ws, _grads(ws, 0)):
            w.grad = g
        before = pyreg.penalty(ws, [0.1, 0.1, 0.7], 0.2)
        opt.step()
        after = pyreg.penalty(ws, [0.1, 0.1, 0.7], 0.2)
        assert opt.penalty.dim() == 0
        torch.testing.assert_close(opt.penalty, before if mode == "gradient" else after)


def test_runtime_coefficient_change_and_plan_cache():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = pyreg.Regularized(torch.optim.SGD([w], lr=0.1), l1=0.0)
    w.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -1.0]))
    plan = opt._engine._plan
    opt.step()
    assert opt._engine._plan is plan  # cached while nothing changes
    opt.param_groups[0]["l1"] = 2.0
    opt.step()
    assert opt._engine._plan is not plan
    torch.testing.assert_close(w.detach(), torch.tensor([0.8, -0.8]))


def test_one_fused_call_per_bucket_per_step(monkeypatch):
    # Counted where the kernels are called: a step calls them directly or
    # through the ops, whose CPU fast path ends in the same functions.
    counts = {"prox_": 0, "add_penalty_grad_": 0}
    sizes = []
    be = pyreg.backends.cpu
    for op, fn in (("prox_", "prox_ptrs"), ("add_penalty_grad_", "add_penalty_grad_ptrs")):
        orig = getattr(be, fn)

        def counting(ptrs, *args, _orig=orig, _op=op, **kw):
            counts[_op] += 1
            sizes.append(len(ptrs))
            return _orig(ptrs, *args, **kw)

        monkeypatch.setattr(be, fn, counting)
    f32 = _params(torch.float32, shapes=[(3,)] * 5)
    f64 = _params(torch.float64, shapes=[(4,)] * 3)
    groups = [{"params": f32[:2] + f64[:1]}, {"params": f32[2:], "l1": 0.3},
              {"params": f64[1:], "l2": 0.4}]
    for mode, op in (("proximal", "prox_"), ("gradient", "add_penalty_grad_")):
        opt = pyreg.Regularized(torch.optim.SGD(copy.copy(groups), lr=0.1), l1=0.1, l2=0.1, mode=mode)
        for step in range(3):
            for p, g in zip(f32 + f64, _grads(f32 + f64, step)):
                p.grad = g
            counts[op] = 0
            sizes.clear()
            fast = opt._fast
            opt.step()
            if fast is not None and opt._fast is fast:  # Regularized's fast path: one C++ call per bucket
                assert mode == "proximal" and counts[op] == 0
                sizes[:] = fast[0].sizes()
            else:
                assert counts[op] == 2  # one per (device, dtype) bucket
            assert sorted(sizes) == [3, 5]
        assert mode == "gradient" or opt._fast is not None  # the last step was a fast one


def test_stats_and_sparsity():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.0, 1.0, -2.0, 0.0]] * 3))
        m[0].bias.zero_()
        m[1].weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, -4.0]]))
        m[1].bias.copy_(torch.tensor([1.0, 0.0]))
    opt = pyreg.Regularized(torch.optim.SGD(pyreg.param_groups(m, l1=0.1), lr=0.1))
    s = opt.stats()
    assert s.names == ["0.weight", "1.weight", "0.bias", "1.bias"]
    torch.testing.assert_close(s.l1, torch.tensor([9.0, 7.0, 0.0, 1.0]))
    torch.testing.assert_close(s.l2, torch.tensor([math.sqrt(15.0), 5.0, 0.0, 1.0]))
    torch.testing.assert_close(s.linf, torch.tensor([2.0, 4.0, 0.0, 1.0]))
    assert s.nnz.tolist() == [6, 2, 0, 1] and s.numel.tolist() == [12, 6, 3, 2]
    assert set(s.as_dict()) == set(s.names)
    sp = opt.sparsity()
    torch.testing.assert_close(sp.per_param, torch.tensor([0.5, 4 / 6, 1.0, 0.5]))
    torch.testing.assert_close(sp.overall, torch.tensor(1 - 9 / 23))
    assert sp.overall.dim() == 0 and sp.names == s.names


@pytest.mark.parametrize("how", ["fused", "proximal", "proximal closure", "gradient"])
def test_stats_between_steps_change_nothing(how):
    """stats() and sparsity() read: called while a group holds a value set
    for a while and then put back (the same object), they leave the next
    steps and the last step's penalty as they would have been."""
    def run(peek):
        w = nn.Parameter(torch.linspace(-3.0, 3.0, 7, dtype=torch.float64))
        l1 = 0.1
        groups = [{"params": [w], "l1": l1}]
        opt = (pyreg.optim.SGD(groups, lr=1.0) if how == "fused" else
               pyreg.Regularized(torch.optim.SGD(groups, lr=1.0), mode=how.split()[0]))
        closure = (lambda: None) if how.endswith("closure") else None
        w.grad = torch.ones_like(w)
        opt.step(closure)
        out = []
        for k in range(3):
            if peek:
                opt.param_groups[0]["l1"] = 0.5
                opt.stats()
                opt.sparsity()
                opt.param_groups[0]["l1"] = l1
            out.append(opt.penalty.clone())
            w.grad = torch.ones_like(w)
            opt.step(closure)
        return w.detach().clone(), out
    (w1, p1), (w2, p2) = run(True), run(False)
    assert torch.equal(w1, w2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_stats_of_a_complex_param_are_of_its_magnitudes(family):
    """A complex param (torch's own step) among the optimizer's: stats()
    gives the stats of |w| for it, the kernels' for the others."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 4))
    c = nn.Parameter(torch.tensor([[3 + 4j, 0j], [0j, 1j]], dtype=torch.complex64))
    groups = [{"params": [a], "l1": 0.1}, {"params": [c]}]
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.0)) if family == "Regularized" else \
        pyreg.optim.SGD(groups, lr=0.0)
    a.grad, c.grad = torch.zeros_like(a), torch.zeros_like(c)
    opt.step()
    s = opt.stats()
    torch.testing.assert_close(s.l1, torch.stack([a.detach().abs().sum(), torch.tensor(6.0)]))
    torch.testing.assert_close(s.l2[1], torch.tensor(math.sqrt(26.0)))
    torch.testing.assert_close(s.linf[1], torch.tensor(5.0))
    assert s.nnz.tolist() == [16, 2]
    torch.testing.assert_close(opt.sparsity().per_param, torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_sparsity_counts_a_param_replaced_through_data_at_its_new_size(family):
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    groups = pyreg.param_groups(m, l1=0.1)
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1)) if family == "Regularized" else \
        pyreg.optim.SGD(groups, lr=0.1)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.sparsity()
    m[0].weight.data = torch.zeros(50, 4)
    m[0].weight.data[0] = 1.0
    s = opt.stats()
    assert s.numel.tolist() == [200, 6, 3, 2] and int(s.nnz[0]) == 4
    assert float(opt.sparsity().per_param[0]) == pytest.approx(196 / 200)


# --------------------------------------------------------------------------
# param_groups
# --------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(4))
        self.rms = nn.RMSNorm(4) if hasattr(nn, "RMSNorm") else nn.GroupNorm(1, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(groups):
    return {n: (g["l1"], g["l2"]) for g in groups for n in g["param_names"]}


def test_param_groups_default_rule_and_names():
    net = _Net()
    groups = pyreg.param_groups(net, l1=0.1, l2=0.2)
    names = _names(groups)
    reg = {n for n, c in names.items() if c == (0.1, 0.2)}
    assert reg == {"conv.weight", "encoder.0.weight", "encoder.2.weight", "head.weight"}
    assert not any(n.startswith("frozen") for n in names)
    assert {"embed.weight", "bn.weight", "bn.bias", "encoder.1.weight", "scale", "head.bias",
            "rms.weight"} <= set(names) - reg
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    assert len(groups) == 2
    assert pyreg_optim.default_exclude("block.gain", torch.ones(4), nn.Identity())  # ndim <= 1
    assert not pyreg_optim.default_exclude("block.w", torch.ones(4, 4), nn.Identity())
    opt = pyreg.Regularized(torch.optim.AdamW(groups, lr=1e-3))
    assert set(opt.stats().names) == set(names)


def test_param_groups_overrides_and_custom_exclude():
    net = _Net()
    groups = pyreg.param_groups(net, l1=0.1, overrides={"encoder.*": {"l1": 0.5, "lr": 0.01},
                                                         "head": {"l2": 0.3},
                                                         "embed": {"l1": 0.05}})
    names = _names(groups)
    assert names["encoder.0.weight"] == (0.5, 0.0) and names["encoder.2.weight"] == (0.5, 0.0)
    assert names["encoder.0.bias"] == (0.5, 0.0)  # an explicit override beats the exclusion
    assert names["head.weight"] == (0.1, 0.3) and names["head.bias"] == (0.0, 0.3)
    assert names["embed.weight"] == (0.05, 0.0)
    assert names["conv.weight"] == (0.1, 0.0) and names["conv.bias"] == (0.0, 0.0)
    lrs = {n: g.get("lr") for g in groups for n in g["param_names"]}
    assert lrs["encoder.1.bias"] == 0.01 and lrs["conv.weight"] is None

    only_conv = pyreg.param_groups(net, l1=1.0, exclude=lambda n, p, m: not isinstance(m, nn.Conv1d))
    assert {n for n, c in _names(only_conv).items() if c[0] > 0} == {"conv.weight", "conv.bias"}
    pats = pyreg.param_groups(net, l2=1.0, exclude=["*.bias", "bn"])
    reg = {n for n, c in _names(pats).items() if c[1] > 0}
    assert "scale" in reg and "embed.weight" in reg and "bn.weight" not in reg and "head.bias" not in reg
    everything = pyreg.param_groups(net, l2=1.0, exclude=[])
    assert all(c == (0.0, 1.0) for c in _names(everything).values())
    with pytest.raises(ValueError, match="match no trainable"):
        pyreg.param_groups(net, overrides={"encodr.*": {"l1": 1.0}})
    with pytest.raises(ValueError, match=r"overrides\['head'\]\['l1'\]"):
        pyreg.param_groups(net, overrides={"head": {"l1": -1.0}})
    with pytest.raises(TypeError):
        pyreg.param_groups(net, exclude=3)


def test_param_groups_ref_of_a_wrapped_model_and_a_ref_that_matches_nothing():
    """Names match with or without the wrappers' prefixes (DataParallel/DDP ``module.``,
    torch.compile ``_orig_mod.``); a reference matching no regularized parameter is an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}

    class Wrap(nn.Module):  # names as DataParallel's and DDP's: module.*
        def __init__(self, m):
            super().__init__()
            self.module = m

    for m, r in ((Wrap(model), pretrained), (model, {f"module.{k}": v for k, v in pretrained.items()}),
                 (model, {f"_orig_mod.{k}": v for k, v in pretrained.items()})):
        groups = pyreg.param_groups(m, l2=0.1, ref=r)
        refs = {n: x for g in groups for n, x in zip(g["param_names"], g["ref"])}
        assert all(x is not None and torch.equal(x, pretrained[n.removeprefix("module.")]) for n, x in refs.items())
    with pytest.raises(ValueError, match="ref has no tensor of the name and shape of any regularized parameter"):
        pyreg.param_groups(model, l2=0.1, ref=nn.Sequential(nn.Linear(5, 3)))  # another model
    head = pyreg.param_groups(model, l2=0.1, ref={"0.weight": pretrained["0.weight"]})  # a new head: None
    assert {n: x is None for g in head for n, x in zip(g["param_names"], g["ref"])}["2.weight"]


def test_param_groups_default_rule_by_name():
    """Left out by name: attention's bias_k/bias_v, embeddings and tokens held as parameters, weight
    normalization's magnitude (a gain of any shape)."""
    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed, self.cls_token = nn.Parameter(torch.zeros(1, 5, 8)), nn.Parameter(torch.zeros(1, 1, 8))
            self.attn, self.fc = nn.MultiheadAttention(8, 2, add_bias_kv=True), nn.Linear(8, 2)
            nn.utils.parametrizations.weight_norm(self.fc)

    regularized = {n for g in pyreg.param_groups(ViT(), l1=0.1) if g["l1"] for n in g["param_names"]}
    assert regularized == {"attn.in_proj_weight", "attn.out_proj.weight", "fc.parametrizations.weight.original1"}


def test_param_groups_overrides_on_excluded_parameters_only():
    """An override whose keys apply only to regularized parameters (structured keys and the
    strengths) and that matches only excluded ones is an error: it would change nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.utils.parametrizations.weight_norm(model[0])  # its weight: 0.parametrizations.weight.original0/1
    for pattern in ("0", "0.parametrizations.weight"):  # (the layer's name, or the parametrization's)
        groups = pyreg.param_groups(model, overrides={pattern: {"group_l1": 1.0, "group_dim": 1}})
        assert [g["param_names"] for g in groups if g.get("group_l1")] == [["0.parametrizations.weight.original1"]]
    with pytest.raises(ValueError, match=r"\['0.bias'\] match only excluded parameters, where their keys "
                                         r"\(group_dim, group_l1\) do not apply.*parametrizations"):
        pyreg.param_groups(model, overrides={"0.bias": {"group_l1": 1.0, "group_dim": 1}})
    plain = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    for key in ("l1_strength", "target_sparsity"):
        groups = pyreg.param_groups(plain, overrides={"*": {key: 0.5}})  # not on the embedding or the bias
        assert [g["param_names"] for g in groups if g.get(key)] == [["1.weight"]], key
    assert _names(pyreg.param_groups(plain, overrides={"0": {"l1": 0.2}}))["0.weight"] == (0.2, 0.0)  # l1: it does
    class Compiled(nn.Module):  # names as torch.compile's OptimizedModule gives them: _orig_mod.*
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    with pytest.raises(ValueError, match="this model's names start with '_orig_mod.'"):
        pyreg.param_groups(Compiled(plain), overrides={"1": {"l1": 0.2}})


def test_param_groups_exclude_pattern_matching_nothing_warns():
    net = _Net()
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['hed\.\*'\] match no trainable"):
        groups = pyreg.param_groups(net, l1=0.1, exclude=["*.bias", "hed.*"])
    assert _names(groups)["head.weight"] == (0.1, 0.0)  # the typo excluded nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that all match, a rule, or none: no warning
        pyreg.param_groups(net, l1=0.1, exclude=["*.bias", "head"])
        pyreg.param_groups(net, l1=0.1, exclude=lambda n, p, m: False)
        pyreg.param_groups(net, l1=0.1, exclude=[])


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_bad_input_errors_leave_model_unchanged():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="Optimizer"):
        pyreg.Regularized([w])
    with pytest.raises(ValueError, match="mode"):
        pyreg.Regularized(torch.optim.SGD([w], lr=0.1), mode="decoupled")
    with pytest.raises(ValueError, match="l1"):
        pyreg.Regularized(torch.optim.SGD([w], lr=0.1), l1=-1.0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['l2'\]"):
        pyreg.Regularized(torch.optim.SGD([{"params": [w], "l2": float("nan")}], lr=0.1))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['l1'\]"):
        pyreg.Regularized(torch.optim.SGD([{"params": [w], "l1": "0.1"}], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns about duplicates in a group
        dup = torch.optim.SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match="once"):
        pyreg.Regularized(dup)

    for mode in ("gradient", "proximal"):
        a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        opt = pyreg.Regularized(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1),
                                l1=0.1, mode=mode)
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.param_groups[1]["l1"] = -0.5
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['l1'\]"):
            opt.step()
        assert torch.equal(a.detach(), torch.ones(3)) and torch.equal(b.detach(), torch.ones(2))
        assert torch.equal(a.grad, torch.ones(3))
        opt.param_groups[1]["l1"] = 0.1
        opt.param_groups[0]["lr"] = float("inf")
        if mode == "proximal":
            with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
                opt.step()
            assert torch.equal(a.detach(), torch.ones(3))
        opt.param_groups[0]["lr"] = 0.1
        with pytest.raises(ValueError, match=r"param_groups\[2\]\['l2'\]"):
            opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "l2": -1})
        assert len(opt.param_groups) == 2
        opt.step()  # valid again
        assert (a.detach() < 1).all()


class _SignSGD(torch.optim.Optimizer):
    """A minimal third-party optimizer following the torch.optim protocol."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
                    self.state[p]["n"] = self.state[p].get("n", 0) + 1


def test_third_party_optimizer_tensor_lr_and_pickle():
    w = nn.Parameter(torch.tensor([1.0, -0.5, 0.02]))
    opt = pyreg.Regularized(_SignSGD([w], lr=0.1), l1=0.5, l2=0.25)
    w.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    # (w - 0.1 * sign(g)) then prox with lr*l1 = 0.05, 1 + 2*lr*l2 = 1.05
    torch.testing.assert_close(w.detach(), torch.tensor([0.85, -0.35, 0.0]) / 1.05)
    assert opt.state[w]["n"] == 1
    clone = copy.deepcopy(opt)
    assert clone.state is clone.optimizer.state and clone.param_groups[0]["l1"] == 0.5

    # a tensor lr (Adam accepts one) is used as is, without .item()
    v, ref = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = pyreg.Regularized(torch.optim.Adam([v], lr=torch.tensor(0.1)), l1=0.3)
    ref_opt = torch.optim.Adam([ref], lr=0.1)
    for _ in range(2):
        v.grad, ref.grad = torch.ones(4), torch.ones(4)
        opt.step()
        ref_opt.step()
        pyreg.prox_([ref], 0.3, 0.0, 0.1)
    torch.testing.assert_close(v, ref)


# --------------------------------------------------------------------------
# Structured regularizers in Regularized: group lasso, toward a reference, max-norm
# --------------------------------------------------------------------------
class _Mlp(nn.Sequential):
    def __init__(self, seed=0, out=3):
        torch.manual_seed(seed)
        super().__init__(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, out))


def _set_grads(model, step):
    for p, g in zip(model.parameters(), _grads(list(model.parameters()), step)):
        p.grad = g


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_group_lasso_keys_match_the_ops(mode):
    model, ref = _Mlp(), _Mlp()
    groups = pyreg.param_groups(model, l1=0.01, l2=0.02, overrides={"0": {"group_l1": 0.3, "group_dim": 1}})
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.5), mode=mode)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    w0, w2 = ref[0].weight, ref[2].weight
    for step in range(12):
        _set_grads(model, step)
        _set_grads(ref, step)
        for m in (model, ref):  # four inputs the loss hardly uses
            m[0].weight.grad[:, :4] *= 0.01
        opt.step()
        if mode == "gradient":
            want_pen = (pyreg.add_penalty_grad_([w0, w2], [w0.grad, w2.grad], 0.01, 0.02)
                        + pyreg.add_group_penalty_grad_([w0], [w0.grad], 0.3, dim=1))
            torch.testing.assert_close(opt.penalty, want_pen)
            ref_opt.step()
        else:
            ref_opt.step()
            pyreg.group_prox_([w0], 0.3, 0.5, dim=1, element_l1=0.01, l2=0.02)
            pyreg.prox_([w2], 0.01, 0.02, 0.5)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if mode == "proximal":
        dead = (model[0].weight == 0).all(dim=0)
        assert 0 < int(dead.sum()) < 12  # whole input columns, exactly zero
        want = (pyreg.penalty([model[0].weight, model[2].weight], 0.01, 0.02)
                + pyreg.group_penalty([model[0].weight], 0.3, dim=1))
        torch.testing.assert_close(opt.penalty, want)


def test_group_lasso_value_change_needs_no_new_plan():
    model = _Mlp()
    opt = pyreg.Regularized(torch.optim.SGD(
        pyreg.param_groups(model, overrides={"0": {"group_l1": 0.1}}), lr=0.1))
    _set_grads(model, 0)
    opt.step()
    plan = opt._engine._plan
    opt.param_groups[0]["group_l1"] = 100.0  # kills every column on the next step
    _set_grads(model, 1)
    opt.step()
    assert opt._engine._plan is plan
    assert torch.equal(model[0].weight, torch.zeros_like(model[0].weight))


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_ref_key_regularizes_toward_pretrained(mode):
    pretrained = _Mlp(seed=1, out=5)  # its head has another shape: no reference for it
    model = _Mlp(seed=2)
    model[0].load_state_dict(pretrained[0].state_dict())
    groups = pyreg.param_groups(model, l1=0.02, l2=0.3, ref=pretrained)
    reg = [g for g in groups if g["l2"] > 0][0]
    assert [r is not None for r in reg["ref"]] == [True, False]  # 0.weight has one, 2.weight not
    assert reg["ref"][0] is not pretrained[0].weight and torch.equal(reg["ref"][0], pretrained[0].weight)
    ref_w = reg["ref"][0]
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1), mode=mode)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    a, b = twin[0].weight, twin[2].weight
    for step in range(10):
        _set_grads(model, step)
        _set_grads(twin, step)
        opt.step()
        if mode == "gradient":
            v = (pyreg.add_penalty_grad_([a], [a.grad], 0.02, 0.3, ref=[ref_w])
                 + pyreg.add_penalty_grad_([b], [b.grad], 0.02, 0.3))
            torch.testing.assert_close(opt.penalty, v)
            twin_opt.step()
        else:
            twin_opt.step()
            pyreg.prox_([a], 0.02, 0.3, 0.1, ref=[ref_w])
            pyreg.prox_([b], 0.02, 0.3, 0.1)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert torch.equal(ref_w, pretrained[0].weight)  # the reference never moves
    if mode == "proximal":
        assert int((model[0].weight == ref_w).sum()) > 0  # exactly back at the reference
        want = (pyreg.penalty([model[0].weight], 0.02, 0.3, ref=[ref_w])
                + pyreg.penalty([model[2].weight], 0.02, 0.3))
        torch.testing.assert_close(opt.penalty, want)


def test_ref_state_dict_round_trip():
    pretrained, model = _Mlp(seed=1), _Mlp(seed=2)
    opt = pyreg.Regularized(torch.optim.Adam(pyreg.param_groups(model, l2=0.1, ref=pretrained), lr=0.01))
    _set_grads(model, 0)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = _Mlp(seed=2)
    opt2 = pyreg.Regularized(torch.optim.Adam(pyreg.param_groups(other, l2=0.1), lr=0.01))
    opt2.load_state_dict(sd)
    g = [g for g in opt2.param_groups if g["l2"] > 0][0]
    assert torch.equal(g["ref"][0], pretrained[0].weight)
    other.load_state_dict(model.state_dict())
    for m, o in ((model, opt), (other, opt2)):
        _set_grads(m, 1)
        o.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_max_norm_key(mode):
    model = _Mlp()
    with torch.no_grad():
        model[0].weight.mul_(5)
    opt = pyreg.Regularized(torch.optim.SGD(
        pyreg.param_groups(model, l1=1e-3, overrides={"0": {"max_norm": 1.5}}), lr=0.1), mode=mode)
    _set_grads(model, 0)
    before = model[2].weight.detach().clone()
    opt.step()
    rows = model[0].weight.detach().norm(dim=1)
    assert float(rows.max()) <= 1.5 * (1 + 1e-6) and torch.allclose(rows, torch.full_like(rows, 1.5))
    assert not torch.equal(model[2].weight, before)  # regularized, but not max-normed
    assert float(model[2].weight.norm(dim=1).max()) != pytest.approx(1.5)


def test_structured_keys_bad_input_leaves_model_unchanged():
    model = _Mlp()
    state = copy.deepcopy(model.state_dict())
    ref_w = torch.zeros(8, 12)
    bad = [
        ({"group_l1": 0.1, "group_dim": 2}, ValueError, r"\['group_dim'\]=2 is out of range"),
        ({"group_l1": -0.1}, ValueError, r"\['group_l1'\] must be finite and >= 0"),
        ({"max_norm": -1.0}, ValueError, r"\['max_norm'\] must be finite and >= 0"),
        ({"group_l1": 0.1, "ref": [ref_w, None]}, ValueError, "group_l1' and 'ref'"),
        ({"ref": [ref_w]}, ValueError, r"\['ref'\] has 1 entries but the group has 2"),
        ({"ref": [torch.zeros(3, 3), None]}, ValueError, r"\['ref'\]\[0\] is \(3, 3\)"),
        ({"ref": ref_w}, TypeError, "one tensor \\(or None\\) per parameter"),
    ]
    for extra, exc, msg in bad:
        group = {"params": [model[0].weight, model[0].bias], "l1": 0.01, **extra}
        with pytest.raises(exc, match=msg):
            opt = pyreg.Regularized(torch.optim.SGD([group], lr=0.1))
            _set_grads(model, 0)
            opt.step()
        inner = torch.optim.SGD([{"params": [model[2].weight], "lr": 0.1}])
        opt = pyreg.Regularized(inner)
        with pytest.raises(exc, match=msg):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="may not set 'ref'"):
        pyreg.param_groups(model, overrides={"0": {"ref": [None, None]}})
    with pytest.raises(TypeError, match="ref must be an nn.Module or a state dict"):
        pyreg.param_groups(model, ref=[1, 2])


def test_param_groups_are_the_same_whatever_the_values():
    # A run with l1 = l2 = 0 and one with penalties build the same groups, so a
    # checkpoint of one loads into an optimizer built with the other.
    a, b = _Mlp(), _Mlp()
    ga, gb = pyreg.param_groups(a, l1=0.0, l2=0.0), pyreg.param_groups(b, l1=1e-3, l2=1e-4)
    assert [g["param_names"] for g in ga] == [g["param_names"] for g in gb] and len(ga) == 2
    oa = pyreg.Regularized(torch.optim.Adam(ga, lr=0.01))
    ob = pyreg.Regularized(torch.optim.Adam(gb, lr=0.01))
    _set_grads(b, 0)
    ob.step()
    oa.load_state_dict(ob.state_dict())
    assert oa.param_groups[0]["l1"] == 1e-3


def test_global_step_hooks_run_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = _Mlp()
    inner = torch.optim.SGD(pyreg.param_groups(model, l1=1e-3), lr=0.1)
    opt = pyreg.Regularized(inner)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__)))]
    inner.register_step_pre_hook(lambda o, a, k: calls.append(("inner pre", type(o).__name__)))
    inner.register_step_post_hook(lambda o, a, k: calls.append(("inner post", type(o).__name__)))
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("own pre", type(o).__name__)))
    try:
        for mode in ("proximal", "gradient"):
            opt.mode = mode
            calls.clear()
            _set_grads(model, 0)
            opt.step()
            assert calls == [("pre", "Regularized"), ("own pre", "Regularized"), ("inner pre", "SGD"),
                             ("inner post", "SGD"), ("post", "Regularized")], (mode, calls)
            calls.clear()
            opt.step(lambda: torch.tensor(1.0))  # with a closure
            assert [c for c in calls if c[0] in ("pre", "post")] == [("pre", "Regularized"),
                                                                      ("post", "Regularized")]
        # A bare inner step still runs the global hooks (once).
        calls.clear()
        inner.step()
        assert calls == [("pre", "SGD"), ("inner pre", "SGD"), ("inner post", "SGD"), ("post", "SGD")]
    finally:
        for h in handles:
            h.remove()


def test_a_scheduler_made_on_the_inner_optimizer_sees_its_steps():
    """A scheduler made on the inner optimizer before wrapping it: its first step does not warn
    that it came before the optimizer's (the wrapper runs the inner step past the scheduler's patch)."""
    w = nn.Parameter(torch.randn(4))
    inner = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, 2)
    opt = pyreg.Regularized(inner, l1=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            w.grad = torch.randn(4)
            opt.step()
            sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01)


def test_param_groups_l1_and_l1_strength_overrides_replace_each_other():
    """An override's l1 replaces the base strength on its parameters (and its strength the base l1):
    the groups build an optimizer; a strength with ref is refused by param_groups itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    groups = pyreg.param_groups(model, l1_strength=0.5, overrides={"2": {"l1": 0.1}})
    by = {n: (g["l1"], g.get("l1_strength")) for g in groups for n in g["param_names"]}
    assert by["0.weight"] == (0.0, 0.5) and by["2.weight"] == (0.1, None)
    pyreg.optim.AdamW(groups, lr=0.1)  # (a group with both would be refused)
    groups = pyreg.param_groups(model, l1=0.2, overrides={"0": {"l1_strength": 0.7}})
    by = {n: (g["l1"], g.get("l1_strength")) for g in groups for n in g["param_names"]}
    assert by["0.weight"] == (0.0, 0.7) and by["2.weight"] == (0.2, None)
    pyreg.optim.AdamW(groups, lr=0.1)
    with pytest.raises(ValueError, match="both l1_strength and ref"):
        pyreg.param_groups(model, l1_strength=0.5, ref=model)


def test_param_groups_an_override_of_l1_0_removes_the_strength():
    """An override's l1 replaces the base strength on its parameters, 0 included (0 is falsy)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    groups = pyreg.param_groups(model, l1_strength=0.8, overrides={"2": {"l1": 0.0}})
    by = {n: (g["l1"], g.get("l1_strength")) for g in groups for n in g["param_names"]}
    assert by["0.weight"] == (0.0, 0.8) and by["2.weight"] == (0.0, None)


def test_param_groups_are_the_same_when_an_override_equals_the_base():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    over = {"4": {"l1": 1e-3}, "0": {"lr": 0.1}}  # (with l1=1e-3, layer 4's options are layer 2's)
    ga, gb = (pyreg.param_groups(make(), l1=v, overrides=over) for v in (1e-4, 1e-3))
    assert [g["param_names"] for g in ga] == [g["param_names"] for g in gb]
    m = make()
    opt = pyreg.optim.Adam(pyreg.param_groups(m, l1=1e-4, overrides=over), lr=1e-2)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    other = pyreg.optim.Adam(pyreg.param_groups(make(), l1=1e-3, overrides=over), lr=1e-2)
    other.load_state_dict(opt.state_dict())
    assert [g["l1"] for g in other.param_groups] == [g["l1"] for g in opt.param_groups]


def test_param_groups_patterns_match_a_tied_parameter_under_each_of_its_names():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10)
            self.lm_head.weight = self.emb.weight

    net = LM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the pattern matches: no warning)
        groups = pyreg.param_groups(net, l1=0.1, exclude=["lm_head.weight"])
    assert _names(groups)["emb.weight"] == (0.0, 0.0) and _names(groups)["mid.weight"] == (0.1, 0.0)
    groups = pyreg.param_groups(net, l1=0.1, overrides={"lm_head.weight": {"l1": 0.5, "lr": 1e-4}})
    g = next(g for g in groups if "emb.weight" in g["param_names"])
    assert g["l1"] == 0.5 and g["lr"] == 1e-4 and g["param_names"] == ["emb.weight"]


@pytest.mark.parametrize("how", ["spectral_norm", "weight_norm"])
def test_param_groups_a_parametrized_embedding_is_left_out(how):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    getattr(nn.utils.parametrizations, how)(model[0])
    regularized = [n for g in pyreg.param_groups(model, l1=0.1) if g["l1"] for n in g["param_names"]]
    assert regularized == ["1.weight"]


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(exclude=nn.LayerNorm), TypeError, r"not a class \(LayerNorm\).*isinstance\(module, LayerNorm\)"),
    (dict(overrides="2"), TypeError, "overrides must be a dict .* got str"),
    (dict(overrides=5), TypeError, "overrides must be a dict .* got int"),
    (dict(overrides={"1.w*": {"l1": [0.1, 0.2]}}), ValueError,
     r"overrides\['1.w\*'\]\['l1'\] has 2 values, one per parameter, but the parameters it sets are 1"),
    (dict(overrides={"0": {"l1_strength": 0.5, "l1_refresh": 5}}), ValueError,
     r"\['0'\] match only excluded parameters, where their keys \(l1_refresh, l1_strength\)"),
])
def test_param_groups_bad_arguments_are_named(kwargs, exc, message):
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2), nn.LayerNorm(2))
    with pytest.raises(exc, match=message):
        pyreg.param_groups(model, **kwargs)


@pytest.mark.parametrize("first", ["embedding", "head"])
def test_param_groups_tied_embedding_left_out_whatever_the_order(first):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            if first == "head":
                self.head = nn.Linear(4, 10, bias=False)
            self.wte = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            if first != "head":
                self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.wte.weight

    groups = pyreg.param_groups(LM(), l1=0.1)
    regularized = [n for g in groups if g["l1"] for n in g["param_names"]]
    assert regularized == ["mid.weight"]
    assert sum(len(g["params"]) for g in groups) == 3  # the tied weight once


def test_regularized_copies_step_alone_after_a_scheduler_and_hooks():
    """A copy (deepcopy, pickle) of Regularized carries neither an LR
    scheduler's wrapped step (which held the original: the copy's step moved
    the original model) nor hooks, as torch's optimizers; it steps its own
    params, as a copy of the inner optimizer does."""
    import pickle
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = pyreg.Regularized(torch.optim.SGD(pyreg.param_groups(m, l1=1e-3), lr=0.1))
    torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.register_step_post_hook(lambda *a: None)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for m2, opt2 in (copy.deepcopy((m, opt)), pickle.loads(pickle.dumps((m, opt)))):
        before = [p.detach().clone() for p in m.parameters()]
        copied = [p.detach().clone() for p in m2.parameters()]
        for p in m2.parameters():
            p.grad = torch.ones_like(p)
        opt2.step()
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))  # the original did not move
        assert not all(torch.equal(a, b) for a, b in zip(m2.parameters(), copied))
        assert not opt2._optimizer_step_post_hooks


@pytest.mark.parametrize("inner", ["SGD", "Adam"])
def test_regularized_takes_a_tensor_weight_decay_as_torch_does(inner):
    """torch's SGD and Adam take a one-value tensor weight_decay (torch's own
    step reads it): so does Regularized around them (checked as a number
    where it is on the CPU: a negative one is refused); the fused optimizers,
    whose kernels take numbers, refuse it."""
    torch.manual_seed(0)
    m, ref = nn.Linear(4, 3), None
    ref = copy.deepcopy(m)
    cls = getattr(torch.optim, inner)
    opt = pyreg.Regularized(cls(pyreg.param_groups(m, l1=1e-3), lr=0.1, weight_decay=torch.tensor(0.01)))
    ropt = cls(pyreg.param_groups(ref, l1=1e-3), lr=0.1, weight_decay=0.01)
    for o, mm in ((opt, m), (ropt, ref)):
        for p in mm.parameters():
            p.grad = torch.ones_like(p)
        o.step()
    pyreg.prox_([ref.weight], l1=1e-3, lr=0.1)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="weight_decay"):
        pyreg.Regularized(cls(pyreg.param_groups(nn.Linear(4, 3), l1=1e-3), lr=0.1,
                              weight_decay=torch.tensor(-0.01)))
    with pytest.raises(TypeError, match="weight_decay"):
        getattr(pyreg.optim, inner)(nn.Linear(4, 3).parameters(), lr=0.1, weight_decay=torch.tensor(0.01))
