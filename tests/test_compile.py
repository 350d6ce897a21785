"""pyreg.Regularized inside torch.compile and CUDA graphs.

A whole training step (forward, backward, ``opt.step()``) is compiled. Under
torch.compile, torch.optim guards every Python number in the param groups,
so coefficients that change at run time are kept as tensors, as torch
recommends for ``lr``: ``l1``, ``l2`` and ``lr`` are 0-dim CPU tensors
changed in place; then changing them recompiles nothing.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import pyreg

MODES = ["proximal", "gradient"]


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


def _data(step, device="cpu"):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 6, generator=g).to(device), torch.randn(32, 3, generator=g).to(device)


def _opt(model, mode, inner="sgd"):
    groups = pyreg.param_groups(model, l1=0.02, l2=0.01)  # [weights, biases (0, 0)]
    groups[0]["l1"], groups[0]["l2"] = torch.tensor(0.02), torch.tensor(0.01)
    if inner == "sgd":
        opt = torch.optim.SGD(groups, lr=torch.tensor(0.1), momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=torch.tensor(0.01))
    return pyreg.Regularized(opt, mode=mode)


def _train_step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _change_coefs(opt, step):
    """Run-time changes (schedules): in place, as a compiled step needs."""
    g = opt.param_groups[0]
    if step == 2:
        g["l1"].fill_(0.3)
    if step == 3:
        g["l2"].fill_(0.03)
    if step == 4:
        g["lr"].fill_(0.05)
        g["l2"].fill_(0.0)  # a zero value is a value too: same plan, no recompilation


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", MODES)
def test_compiled_step_matches_eager_without_recompiling(mode, inner):
    me, mc = _model(), _model()
    oe, oc = _opt(me, mode, inner), _opt(mc, mode, inner)
    counter = CompileCounterWithBackend("aot_eager")
    step_c = torch.compile(_train_step, backend=counter)
    frames_after_warmup = None
    for s in range(6):
        _change_coefs(oe, s)
        _change_coefs(oc, s)
        x, y = _data(s)
        le = _train_step(me, oe, x, y)
        lc = step_c(mc, oc, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for a, b in zip(mc.parameters(), me.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            if mode == "proximal":
                assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(oc.penalty, oe.penalty, rtol=1e-5, atol=1e-6)
        if s == 1:
            frames_after_warmup = counter.frame_count
    assert frames_after_warmup > 0
    # Changing l1, l2 and lr at steps 2, 3 and 4 compiled nothing new.
    assert counter.frame_count == frames_after_warmup
    if mode == "proximal":
        assert any((p == 0).any() for p in mc.parameters())  # L1 made exact zeros


@pytest.mark.parametrize("key", ["l1_strength", "group_strength"])
def test_a_strength_step_compiles_once(key):
    """With l1_strength (group_strength), the compiled step matches eager,
    refreshes at the same steps, and compiles nothing new after its first
    steps: the host counts, the refreshes and the prox run eagerly, outside
    the graph (traced, they were guarded on counts that change at every
    step, and recompiled until Dynamo's limit)."""
    me, mc = _model(), _model()

    def make(model):
        extra = {"group_strength": 0.5, "group_dim": 1} if key == "group_strength" else {"l1_strength": 0.5}
        groups = pyreg.param_groups(model, overrides={"0.weight": {**extra, "l1_refresh": 3}})
        return pyreg.Regularized(torch.optim.SGD(groups, lr=torch.tensor(0.05)))

    oe, oc = make(me), make(mc)
    counter = CompileCounterWithBackend("eager")
    step_c = torch.compile(_train_step, backend=counter)
    frames = []
    for s in range(12):
        x, y = _data(s)
        _train_step(me, oe, x, y)
        step_c(mc, oc, x, y)
        frames.append(counter.frame_count)
        for a, b in zip(mc.parameters(), me.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert torch.equal(a == 0, b == 0)
    assert frames[3] > 0 and frames[-1] == frames[3], frames
    st = oc.state[mc[0].weight]  # the refreshes set an l1 (group_l1), as eager's
    got = {k: float(v) for k, v in st.items() if k.startswith("strength_") and k != "strength_step"}
    assert got and all(v > 0 for v in got.values()) and st["strength_step"] == oe.state[me[0].weight]["strength_step"]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_a_sparsity_schedule_compiles_once(as_tensor):
    """target_sparsity set to a new value at every step (a schedule; a
    float, or a tensor changed in place): the compiled step meets each
    target, as eager does, and compiles nothing new after its first two
    steps (the counts of zeros are host integers, never baked into a graph)."""
    me, mc = _model(), _model()

    def make(model):
        t = torch.tensor(0.0) if as_tensor else 0.0
        return pyreg.Regularized(torch.optim.SGD(pyreg.param_groups(model, overrides={"0": {"target_sparsity": t}}),
                                                 lr=0.3))

    oe, oc = make(me), make(mc)
    counter = CompileCounterWithBackend("aot_eager")
    step_c = torch.compile(_train_step, backend=counter)
    frames = []
    for s in range(7):
        for o in (oe, oc):
            g = o.param_groups[0]
            if as_tensor:
                g["target_sparsity"].fill_(0.1 * s)
            else:
                g["target_sparsity"] = 0.1 * s
        x, y = _data(s)
        _train_step(me, oe, x, y)
        step_c(mc, oc, x, y)
        frames.append(counter.frame_count)
        assert int((mc[0].weight == 0).sum()) == int((me[0].weight == 0).sum()) == math.ceil(0.1 * s * 96 - 1e-9)
        for a, b in zip(mc.parameters(), me.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert frames[1] > 0 and frames[-1] == frames[1], frames


def test_plan_keeps_coefficient_tensors_across_value_changes():
    """New coefficient values go into the cached plan's tensors in place (what
    a compiled step or a CUDA graph reads), for floats and tensors alike."""
    model = _model()
    opt = pyreg.Regularized(torch.optim.SGD(pyreg.param_groups(model, l1=0.1), lr=0.1))
    plan = opt._plan()
    l1 = plan.buckets[0].coefs["l1"]
    opt.param_groups[0]["l1"] = 0.3
    assert opt._plan() is plan and plan.buckets[0].coefs["l1"] is l1
    assert torch.equal(l1, torch.full_like(l1, 0.3))
    opt.param_groups[0]["l1"] = torch.tensor(0.2)
    assert opt._plan() is plan and torch.equal(l1, torch.full_like(l1, float(torch.tensor(0.2))))
    opt.param_groups[0]["l1"] = 0.0  # the group leaves the plan: a new plan
    assert opt._plan() is not plan and not opt._plan().buckets
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        opt.param_groups[0]["l1"] = torch.tensor(-1.0)
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("keys", ["l1_l2", "target_and_l2_bound"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_step_replays_equal_to_eager(mode, keys):
    dev = "cuda"

    def make():
        model = _model(dev)
        if keys == "l1_l2":
            groups = pyreg.param_groups(model, l1=0.02, l2=0.01)
        else:  # the multipliers and thresholds stay on the device: capturable after a warm-up
            over = {"2": {"l2_bound": 0.2, "l2_mu": 0.5}}
            if mode == "proximal":
                over["0"] = {"target_sparsity": 0.6}
            groups = pyreg.param_groups(model, l2=0.01, overrides=over)
        inner = torch.optim.Adam(groups, lr=0.01, capturable=True)  # step count on the device
        return model, pyreg.Regularized(inner, mode=mode)

    warmup, steps = 3, 4
    me, oe = make()
    for s in range(warmup + steps):
        _train_step(me, oe, *_data(s, dev))

    mg, og = make()
    static_x, static_y = (t.clone() for t in _data(0, dev))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (lazy state, cached plan) off the capture
        for s in range(warmup):
            x, y = _data(s, dev)
            static_x.copy_(x), static_y.copy_(y)
            _train_step(mg, og, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    og.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = nn.functional.mse_loss(mg(static_x), static_y)
        static_loss.backward()
        og.step()
    for s in range(warmup, warmup + steps):
        x, y = _data(s, dev)
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(mg.parameters(), me.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if mode == "proximal":
            assert torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["group_and_max_norm", "ref", "target_and_l2_bound"])
def test_compiled_step_with_structured_regularizers(mode, kind):
    """Group lasso, max-norm and regularization toward a reference inside a
    compiled training step match eager, exact zeros included."""
    def opt_for(model):
        if kind == "ref":
            pretrained = _model()
            with torch.no_grad():
                for p in pretrained.parameters():
                    p.add_(0.1)
            groups = pyreg.param_groups(model, l1=0.01, l2=0.05, ref=pretrained)
        elif kind == "target_and_l2_bound":
            groups = pyreg.param_groups(model, l2=0.01, overrides={
                "0": {"target_sparsity": 0.0 if mode == "gradient" else 0.6},
                "2": {"l2_bound": 0.2, "l2_mu": 0.5}})
            if mode == "gradient":  # a target needs the proximal step
                groups = [{k: v for k, v in g.items() if k != "target_sparsity"} for g in groups]
        else:
            groups = pyreg.param_groups(model, l1=0.005, l2=0.01,
                                        overrides={"0": {"group_l1": 2.0, "group_dim": 1},
                                                   "2": {"max_norm": 0.5}})
        return pyreg.Regularized(torch.optim.SGD(groups, lr=0.1), mode=mode)

    me, mc = _model(), _model()
    oe, oc = opt_for(me), opt_for(mc)
    step_c = torch.compile(_train_step, backend="aot_eager")
    for s in range(5):
        x, y = _data(s)
        le = _train_step(me, oe, x, y)
        lc = step_c(mc, oc, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for a, b in zip(mc.parameters(), me.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(oc.penalty, oe.penalty, rtol=1e-5, atol=1e-6)
    if kind == "target_and_l2_bound":
        if mode == "proximal":
            assert float((mc[0].weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / 96)
        assert float(oc.state[mc[2].weight]["l2_bound_lambda"]) > 0  # the bound acted
    elif kind != "ref":
        assert float(mc[2].weight.detach().norm(dim=1).max()) <= 0.5 + 1e-6
        if mode == "proximal":
            assert bool((mc[0].weight == 0).all(dim=0).any())  # whole input columns


def test_outside_graph_runs_directly_in_eager_and_disabled_under_compile(monkeypatch):
    """pyreg's ``outside_graph``: called eagerly (torch._dynamo loaded, as
    torch's optimizers load it) the function runs directly, with no
    disabling wrapper; called from a function torch.compile runs it runs
    eagerly, not traced, and gives the eager result."""
    from pyreg import _common

    through, traced = [], []
    orig = torch._disable_dynamo

    def disable(fn):
        inner = orig(fn)

        def disabled(*args, **kwargs):
            through.append(1)
            return inner(*args, **kwargs)
        return disabled

    monkeypatch.setattr(torch, "_disable_dynamo", disable)

    @_common.outside_graph
    def host(t):
        traced.append(torch.compiler.is_compiling())
        return t * float(t.sum())  # (a host read: not traceable in one graph)

    monkeypatch.setattr(torch, "_disable_dynamo", orig)
    importlib.import_module("torch._dynamo")  # (loaded, as torch's optimizers load it)
    x = torch.arange(3.0)
    assert torch.equal(host(x), x * 3.0) and not through and traced == [False]
    counter = CompileCounterWithBackend("eager")
    f = torch.compile(lambda t: host(t + 1) * 2, backend=counter)
    assert torch.equal(f(x), (x + 1) * 6.0 * 2) and torch.equal(f(x + 1), (x + 2) * 9.0 * 2)
    assert traced == [False] * 3
