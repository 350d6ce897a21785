"""One engine behind both optimizer families (pyreg.optim.keys, engine, plan,
apply): every key in every accepted form gives the same result in
Regularized and in the fused optimizers; hyperparameters and keys set after
construction are checked at the step, in both, and a bad one changes
nothing; a fused optimizer is not wrapped twice; state dicts keep the
settings; the functional layer computes what the classes compute."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyreg
from pyreg import optim
from pyreg.optim import functional as F

FUSED = {"SGD": optim.SGD, "Adam": optim.Adam, "AdamW": optim.AdamW, "Adagrad": optim.Adagrad,
         "RMSprop": optim.RMSprop}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW,
         "Adagrad": torch.optim.Adagrad, "RMSprop": torch.optim.RMSprop}
LR = 0.05


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy({k: v for k, v in opt.state_dict()["state"].items()}))


def _same(a, b):
    pa, sa = a
    pb, sb = b
    if not all(torch.equal(x, y) for x, y in zip(pa, pb)) or sa.keys() != sb.keys():
        return False
    for k in sa:
        if sa[k].keys() != sb[k].keys():
            return False
        for name in sa[k]:
            x, y = sa[k][name], sb[k][name]
            if isinstance(x, torch.Tensor) and not torch.equal(x, y):
                return False
    return True


# --------------------------------------------------------------------------
# Composition: a fused optimizer is not regularized twice
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FUSED))
def test_wrapping_a_fused_optimizer_is_refused(name):
    m = nn.Linear(40, 20)
    inner = FUSED[name](m.parameters(), lr=1e-2, l1=0.02)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(TypeError, match="regularize twice"):
        pyreg.Regularized(inner)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))


def test_wrapping_a_regularized_optimizer_is_refused():
    m = nn.Linear(40, 20)
    inner = pyreg.Regularized(torch.optim.SGD(m.parameters(), lr=1e-2), l1=0.02)
    groups = [dict(g) for g in inner.param_groups]
    with pytest.raises(TypeError, match="not another Regularized.*regularize twice"):
        pyreg.Regularized(inner, l1=0.5)
    assert [dict(g) for g in inner.param_groups] == groups  # the inner one's groups as they were


def test_the_fused_optimizer_alone_matches_regularized_around_torch():
    """What the refused composition was for: the fused optimizer alone gives
    Regularized(torch's)'s result, with the same observability."""
    torch.manual_seed(0)
    a, b = nn.Linear(40, 20), nn.Linear(40, 20)
    b.load_state_dict(a.state_dict())
    fa = optim.AdamW(a.parameters(), lr=1e-2, l1=0.02)
    rb = pyreg.Regularized(torch.optim.AdamW(b.parameters(), lr=1e-2), l1=0.02)
    for step in range(30):
        x = torch.randn(16, 40, generator=torch.Generator().manual_seed(step))
        for m, o in ((a, fa), (b, rb)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p == 0, q == 0)
    assert int((a.weight == 0).sum()) > 0
    torch.testing.assert_close(fa.penalty, rb.penalty)
    torch.testing.assert_close(fa.sparsity().per_param, rb.sparsity().per_param)


# --------------------------------------------------------------------------
# Every key, every accepted form, both families
# --------------------------------------------------------------------------
def _forms(value, n):
    """A coefficient in every accepted form, for a group of n parameters."""
    return {"number": value, "int-like": float(value), "sequence": [value] * n, "tuple": tuple([value] * n),
            "tensor-0d": torch.tensor(value), "tensor-1": torch.tensor([value]),
            "tensor-n": torch.full((n,), value, dtype=torch.float64), "float32-tensor": torch.tensor(value)}


# Values exact in float32, so that a float32 tensor holds the number itself.
KEY_CASES = {
    "l1": {"l1": 0.25},
    "l2": {"l2": 0.75},
    "elastic": {"l1": 0.125, "l2": 0.375},
    "group_l1": {"group_l1": 0.875, "group_dim": 1},
    "max_norm": {"max_norm": 0.375, "max_norm_dim": 0},
    "ref": {"l1": 0.25, "ref": True},
}


def _groups(model, keys, form):
    w = [model[0].weight, model[2].weight]
    group = {"params": w}
    for k, v in keys.items():
        if k == "ref":
            group["ref"] = [p.detach() * 0.5 for p in w]
        elif k.endswith("_dim"):
            group[k] = v
        else:
            group[k] = _forms(v, len(w))[form]
    rest = {"params": [model[0].bias, model[2].bias]}
    return [group, rest]


def _run(family, name, keys, form, steps=3):
    model = _model()
    groups = _groups(model, keys, form)
    if family == "fused":
        opt = FUSED[name](groups, lr=LR)
    else:
        opt = pyreg.Regularized(TORCH[name](groups, lr=LR))
    for s in range(steps):
        _grads(model, 100 + s)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("form", list(_forms(0.5, 2)))
@pytest.mark.parametrize("key", list(KEY_CASES))
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_every_key_in_every_form_in_both_families(name, key, form):
    """A key in any accepted form gives what its number gives, in both
    families; and the two families give the same result (the fused step is
    torch's step then the prox, within float32 rounding)."""
    keys = KEY_CASES[key]
    out = {(fam, f): _run(fam, name, keys, f) for fam in ("fused", "wrapper") for f in ("number", form)}
    for fam in ("fused", "wrapper"):
        for a, b in zip(out[(fam, "number")], out[(fam, form)]):
            assert torch.equal(a, b), (fam, form)
    for a, b in zip(out[("fused", form)], out[("wrapper", form)]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("family", ["fused", "wrapper"])
def test_per_parameter_coefficients_apply_to_their_parameter(family):
    """A sequence (or 1-D tensor) gives each parameter its own value: each
    parameter ends as a group of its own with that value."""
    for form in ("sequence", "tensor"):
        model, ref = _model(), _model()
        w, rw = [model[0].weight, model[2].weight], [ref[0].weight, ref[2].weight]
        vals = [0.5, 0.0]
        l1 = vals if form == "sequence" else torch.tensor(vals)
        one = [{"params": w, "l1": l1}]
        apart = [{"params": [rw[0]], "l1": vals[0]}, {"params": [rw[1]], "l1": vals[1]}]
        if family == "fused":
            oa, ob = optim.SGD(one, lr=LR), optim.SGD(apart, lr=LR)
        else:
            oa = pyreg.Regularized(torch.optim.SGD(one, lr=LR))
            ob = pyreg.Regularized(torch.optim.SGD(apart, lr=LR))
        for p, q in zip(w, rw):
            p.grad = torch.zeros_like(p)
            q.grad = torch.zeros_like(q)
        oa.step()
        ob.step()
        for p, q in zip(w, rw):
            assert torch.equal(p, q)
        assert int((w[0] == 0).sum()) > 0 and int((w[1] == 0).sum()) == 0


@pytest.mark.parametrize("family", ["fused", "wrapper"])
@pytest.mark.parametrize("value, exc, msg", [
    (-1.0, ValueError, "must be finite and >= 0, got -1.0"),
    (float("nan"), ValueError, "must be finite and >= 0, got nan"),
    (float("inf"), ValueError, "must be finite and >= 0, got inf"),
    ([0.1], ValueError, "has 1 values but the group has 2 parameters"),
    ([0.1, -0.1], ValueError, r"\['l1'\]\[1\] must be finite and >= 0"),
    (torch.tensor([0.1, float("nan")]), ValueError, r"\['l1'\]\[1\] must be finite and >= 0, got nan"),
    (torch.ones(3), ValueError, "expected one value or one per parameter"),
    ("0.1", TypeError, "must be a number, a sequence"),
    (True, TypeError, "must be a number, a sequence with one number per parameter or a tensor, got bool"),
])
def test_bad_coefficients_are_rejected_alike(family, value, exc, msg):
    """The same error from both families, at construction and when set after
    construction (then at the next step, with nothing changed)."""
    def build(l1):
        model = _model()
        groups = [{"params": [model[0].weight, model[2].weight], "l1": l1}]
        opt = optim.SGD(groups, lr=LR) if family == "fused" else pyreg.Regularized(torch.optim.SGD(groups, lr=LR))
        return model, opt

    with pytest.raises(exc, match=msg):
        build(value)
    model, opt = build(0.1)
    _grads(model, 0)
    opt.step()
    opt.param_groups[0]["l1"] = value
    _grads(model, 1)
    before = _snapshot(model, opt)
    with pytest.raises(exc, match=msg):
        opt.step()
    assert _same(before, _snapshot(model, opt))


# --------------------------------------------------------------------------
# Hyperparameters set after construction
# --------------------------------------------------------------------------
HYPER_CASES = {
    "SGD": [("lr", float("nan")), ("lr", -1.0), ("weight_decay", -0.1), ("momentum", float("nan")),
            ("dampening", float("inf"))],
    "Adam": [("lr", float("nan")), ("lr", -1.0), ("betas", (1.0, 0.999)), ("betas", (0.9, float("nan"))),
             ("eps", -1e-8), ("weight_decay", float("inf"))],
    "AdamW": [("lr", float("nan")), ("betas", (-0.1, 0.999)), ("eps", float("nan"))],
    "Adagrad": [("lr", float("nan")), ("lr_decay", -1.0), ("eps", float("nan"))],
    "RMSprop": [("lr", float("nan")), ("alpha", -0.5), ("momentum", -1.0), ("eps", float("inf"))],
}


@pytest.mark.parametrize("family", ["fused", "wrapper"])
@pytest.mark.parametrize("name, key, value",
                         [(n, k, v) for n, cases in HYPER_CASES.items() for k, v in cases],
                         ids=[f"{n}-{k}-{v}" for n, cases in HYPER_CASES.items() for k, v in cases])
def test_bad_hyperparameter_set_after_construction_changes_nothing(family, name, key, value):
    kw = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    model = _model()
    groups = pyreg.param_groups(model, l1=1e-3)
    opt = (FUSED[name](groups, lr=LR, **kw) if family == "fused"
           else pyreg.Regularized(TORCH[name](groups, lr=LR, **kw)))
    _grads(model, 0)
    opt.step()
    opt.param_groups[0][key] = value
    _grads(model, 1)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


@pytest.mark.parametrize("family", ["fused", "wrapper"])
@pytest.mark.parametrize("change", [{"dampening": 0.5}, {"momentum": 0.0}])
def test_nesterov_set_after_construction_is_checked(family, change):
    """torch's SGD refuses nesterov without momentum or with dampening at construction only; a step
    checks it again (the fused kernel would take it)."""
    model = _model()
    groups = pyreg.param_groups(model, l1=1e-3)
    opt = (FUSED["SGD"](groups, lr=LR, momentum=0.9, nesterov=True) if family == "fused"
           else pyreg.Regularized(TORCH["SGD"](groups, lr=LR, momentum=0.9, nesterov=True)))
    _grads(model, 0)
    opt.step()
    opt.param_groups[0].update(change)
    _grads(model, 1)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] sets nesterov=True"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


@pytest.mark.parametrize("family", ["fused", "wrapper"])
@pytest.mark.parametrize("write", ["numpy", ".data"])
def test_a_coefficient_tensor_written_without_a_version_bump_is_read_again(family, write):
    """An l1 tensor (one value per parameter) changed where torch counts no in-place version: a bad
    value is refused before anything changes, a good one acts from that step on."""
    def make():
        model = _model()
        groups = pyreg.param_groups(model, l1=1e-3)
        l1 = torch.full((len(groups[0]["params"]),), 1e-3, dtype=torch.float64)
        groups[0]["l1"] = l1
        opt = FUSED["SGD"](groups, lr=LR) if family == "fused" else pyreg.Regularized(TORCH["SGD"](groups, lr=LR))
        return model, opt, l1

    def put(l1, value):
        if write == "numpy":
            l1.numpy()[:] = value
        else:
            l1.data.fill_(value)

    model, opt, l1 = make()
    for k in range(3):  # (the kept and fast paths)
        _grads(model, k)
        opt.step()
    version = l1._version
    put(l1, -1.0)
    assert l1._version == version
    _grads(model, 3)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['l1'\]\[0\] must be finite and >= 0"):
        opt.step()
    assert _same(before, _snapshot(model, opt))
    put(l1, 0.5)
    opt.step()
    ref, ref_opt, ref_l1 = make()  # the same run with 0.5 set in place from that step
    for k in range(3):
        _grads(ref, k)
        ref_opt.step()
    ref_l1.fill_(0.5)
    _grads(ref, 3)
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("name", sorted(FUSED))
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_fused_l1_set_after_construction_is_checked(name, value):
    model = _model()
    opt = FUSED[name](pyreg.param_groups(model, l1=1e-3), lr=LR)
    _grads(model, 0)
    opt.step()
    opt.param_groups[0]["l1"] = value
    _grads(model, 1)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['l1'\]"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


@pytest.mark.parametrize("family", ["fused", "wrapper"])
@pytest.mark.parametrize("key", ["group_l1", "l2_mu", "max_norm_dim"])
def test_a_key_added_as_none_after_a_step_is_checked_as_at_construction(family, key):
    """A key the group did not hold, set to None (which is no value of it):
    refused at the next step as when the group is given, nothing changed."""
    model = _model()
    make = ((lambda g: FUSED["Adam"](g, lr=LR)) if family == "fused"
            else (lambda g: pyreg.Regularized(TORCH["Adam"](g, lr=LR))))
    extra = {"max_norm": 1.0} if key == "max_norm_dim" else {}
    groups = [dict(g, **extra) if g["l1"] else g for g in pyreg.param_groups(model, l1=1e-3)]
    with pytest.raises((TypeError, ValueError), match=rf"\['{key}'\]"):
        make([dict(groups[0], **{key: None})] + groups[1:])
    opt = make(groups)
    for step in range(2):
        _grads(model, step)
        opt.step()
    assert key not in opt.param_groups[0]
    opt.param_groups[0][key] = None
    _grads(model, 2)
    before = _snapshot(model, opt)
    with pytest.raises((TypeError, ValueError), match=rf"param_groups\[0\]\['{key}'\]"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


def test_tensor_l1_in_a_fused_group():
    """A one-value tensor l1 (set after construction, as torch allows for lr)
    works in the fused optimizers as in Regularized, and a change of its
    value in place takes effect at the next step."""
    for family in ("fused", "wrapper"):
        w = nn.Parameter(torch.tensor([1.0, -0.5, 0.02]))
        l1 = torch.tensor(0.0)
        opt = (optim.SGD([w], lr=0.1) if family == "fused" else pyreg.Regularized(torch.optim.SGD([w], lr=0.1)))
        opt.param_groups[0]["l1"] = l1
        w.grad = torch.zeros(3)
        opt.step()
        assert torch.equal(w.detach(), torch.tensor([1.0, -0.5, 0.02]))
        l1.fill_(0.5)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.tensor([0.95, -0.45, 0.0]))


# --------------------------------------------------------------------------
# The survivors: bugs no test caught before
# --------------------------------------------------------------------------
def test_regularized_uses_each_groups_own_lr():
    torch.manual_seed(3)
    b = nn.Parameter(torch.randn(5))
    w = nn.Parameter(torch.randn(6, 4))
    w0 = w.detach().clone()
    opt = pyreg.Regularized(torch.optim.SGD([{"params": [b], "lr": 1.0, "l1": 0.0},
                                             {"params": [w], "lr": 0.01, "l1": 1.0}]))
    b.grad, w.grad = torch.zeros(5), torch.zeros(6, 4)
    opt.step()
    expected = torch.sign(w0) * torch.clamp(w0.abs() - 0.01, min=0)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_loading_a_state_dict_keeps_its_settings(name):
    model = _model()
    src = FUSED[name](model.parameters(), lr=LR, l1=0.5, l2=0.25, preconditioned=True)
    _grads(model, 0)
    src.step()
    sd = src.state_dict()
    dst = FUSED[name](_model().parameters(), lr=LR, l1=0.0)
    dst.load_state_dict(sd)
    for g in dst.param_groups:
        assert (g["l1"], g["l2"], g["preconditioned"]) == (0.5, 0.25, True)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_a_bad_state_dict_loads_nothing(name):
    model = _model()
    src = FUSED[name](model.parameters(), lr=LR, l1=0.5)
    _grads(model, 0)
    src.step()
    sd = src.state_dict()
    sd["param_groups"][0]["l1"] = -1.0
    dst = FUSED[name](_model().parameters(), lr=LR, l1=0.1)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match="l1"):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(v, before["state"][k][n]) for k, s in after["state"].items() for n, v in s.items())


# --------------------------------------------------------------------------
# The functional layer
# --------------------------------------------------------------------------
def test_hyperparameter_rows_are_built_by_name():
    r = F.row({"lr": 0.1, "eps": 1e-8, "l1": 0.3})
    assert len(r) == len(F.HYPER)
    assert r[F.HYPER.index("lr")] == 0.1 and r[F.HYPER.index("eps")] == 1e-8 and r[F.HYPER.index("l1")] == 0.3
    assert sum(1 for v in r if v != 0.0) == 3
    with pytest.raises(KeyError, match="beta3"):
        F.row({"beta3": 0.5})


def test_compiled_kernels_name_the_same_columns():
    from pyreg._lib import _C
    if _C is None or not hasattr(_C, "hyper_fields"):
        pytest.skip("pyreg's compiled module is not loaded")
    assert tuple(_C.hyper_fields()) == F.HYPER


@pytest.mark.parametrize("name", sorted(FUSED))
def test_functional_step_equals_the_class_step(name):
    torch.manual_seed(1)
    kw = dict(l1=0.05, l2=0.1)
    ps = [torch.randn(7, 5), torch.randn(11)]
    qs = [nn.Parameter(p.clone()) for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    opt = FUSED[name](qs, lr=LR, **kw)
    for q, g in zip(qs, gs):
        q.grad = g.clone()
    opt.step()
    st = [opt.state[q] for q in qs]
    steps = [torch.zeros(()) for _ in ps]
    zeros = [torch.zeros_like(p) for p in ps]
    if name == "SGD":
        F.sgd(ps, [g.clone() for g in gs], [None, None], lr=LR, **kw)
    elif name in ("Adam", "AdamW"):
        F.adam(ps, [g.clone() for g in gs], [z.clone() for z in zeros], [z.clone() for z in zeros], [], steps,
               lr=LR, decoupled=name == "AdamW", weight_decay=0.01 if name == "AdamW" else 0.0, **kw)
    elif name == "Adagrad":
        F.adagrad(ps, [g.clone() for g in gs], [z.clone() for z in zeros], steps, lr=LR, **kw)
    else:
        F.rmsprop(ps, [g.clone() for g in gs], [z.clone() for z in zeros], [], [], steps, lr=LR, **kw)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q.detach())
    if name != "SGD":
        assert all(float(s["step"]) == 1.0 for s in st) and all(float(s) == 1.0 for s in steps)


# --------------------------------------------------------------------------
# RMSprop
# --------------------------------------------------------------------------
RMSPROP_CONFIGS = [dict(), dict(momentum=0.9), dict(centered=True), dict(centered=True, momentum=0.5,
                   weight_decay=0.1), dict(maximize=True, alpha=0.9, eps=1e-6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", RMSPROP_CONFIGS, ids=lambda kw: "-".join(map(str, kw.values())) or "default")
def test_rmsprop_matches_torch(kw, dtype):
    torch.manual_seed(2)
    a = [nn.Parameter(torch.randn(13, 7, dtype=dtype)), nn.Parameter(torch.randn(5, dtype=dtype))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    oa = optim.RMSprop(a, lr=1e-2, **kw)
    ob = torch.optim.RMSprop(b, lr=1e-2, foreach=False, **kw)
    for s in range(15):
        g = torch.Generator().manual_seed(s)
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
            q.grad = p.grad.clone()
        oa.step()
        ob.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(a, b):
        for k, v in ob.state[q].items():
            torch.testing.assert_close(oa.state[p][k], v, **tol)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_preconditioned_threshold_is_in_its_metric(centered):
    """With preconditioned=True each element's threshold is lr*l1/(sqrt(v)+eps),
    v RMSprop's own average after the update (centered: minus grad_avg^2)."""
    torch.manual_seed(4)
    a = nn.Parameter(torch.randn(40, 30))
    b = nn.Parameter(a.detach().clone())
    oa = optim.RMSprop([a], lr=1e-2, l1=0.5, preconditioned=True, centered=centered)
    ob = torch.optim.RMSprop([b], lr=1e-2, centered=centered, foreach=False)
    for s in range(5):
        a.grad = torch.randn(40, 30, generator=torch.Generator().manual_seed(s))
        b.grad = a.grad.clone()
        oa.step()
        ob.step()
        st = ob.state[b]
        v = st["square_avg"].double()
        if centered:
            v = v - st["grad_avg"].double() ** 2
        lr_e = 1e-2 / (v.sqrt() + 1e-8)
        x = b.detach().double()
        shrunk = torch.sign(x) * torch.clamp(x.abs() - lr_e * 0.5, min=0)
        with torch.no_grad():
            b.copy_(shrunk.to(b.dtype))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int((a == 0).sum()) > 0


@pytest.mark.parametrize("family", ["fused", "proximal", "gradient"])
def test_an_lr_changed_every_step_is_used_and_checked(family):
    """A scheduler's new lr at every step takes effect (the cheap path that
    re-checks only the lr) and a bad one still raises with nothing changed."""
    def build(model):
        groups = pyreg.param_groups(model, l1=0.05)
        if family == "fused":
            return optim.SGD(groups, lr=LR)
        return pyreg.Regularized(torch.optim.SGD(groups, lr=LR), mode=family)

    a, b = _model(), _model()
    oa, ob = build(a), build(b)
    for s in range(6):
        lr = LR * (1 + s)
        for g in oa.param_groups:
            g["lr"] = lr  # a new float object at every step
        ob = build(b)  # the reference: built afresh with this lr (every key checked anew)
        for g in ob.param_groups:
            g["lr"] = lr
        _grads(a, s)
        _grads(b, s)
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):  # SGD without momentum keeps no state
        assert torch.equal(p, q)
    oa.param_groups[0]["lr"] = float("nan")
    _grads(a, 9)
    before = _snapshot(a, oa)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        oa.step()
    assert _same(before, _snapshot(a, oa))


@pytest.mark.parametrize("family", ["fused", "Regularized"])
def test_adding_groups_one_by_one_reads_each_group_once(family, monkeypatch):
    """add_param_group checks the new group against the regularized
    parameters of the groups already there: it reads the new group, and each
    earlier group once while it stays the same (it read every group again at
    every add: adding groups one by one cost time quadratic in their number).
    A group changed since is read again, and its overlap found."""
    from pyreg.optim.engine import Engine

    reads = []
    read = Engine.read
    monkeypatch.setattr(Engine, "read", lambda self, groups, *a: reads.append(len(groups)) or read(self, groups, *a))
    ps = [nn.Parameter(torch.randn(4)) for _ in range(40)]
    if family == "fused":
        opt = optim.Adam([ps[0]], lr=1e-3, l1=1e-3)
    else:
        opt = pyreg.Regularized(torch.optim.Adam([ps[0]], lr=1e-3), l1=1e-3)
    reads.clear()
    for p in ps[1:]:
        opt.add_param_group({"params": [p]})
    assert sum(reads) <= 3 * len(ps[1:]), sum(reads)  # a read of the new group, and of the last one added
    shared = nn.Parameter(ps[5].detach()[:2])  # (a view of a regularized parameter)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [shared]})
    opt.param_groups[7]["l1"] = 0.0  # ps[7] no longer regularized: a view of it may come in
    opt.add_param_group({"params": [nn.Parameter(ps[7].detach()[:2])], "l1": 1e-3})
