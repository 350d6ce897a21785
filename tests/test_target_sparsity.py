"""``target_sparsity``: every tensor at its fraction of exact zeros at every
step, in both optimizer families and on every backend; the step against the
rule written out in float64; its state in the state dict; bad values rejected
with nothing modified."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import pyreg
from pyreg.optim.apply import TARGET_STATE
from conftest import bad_key_changes_nothing, ieee_sqrt, needs_emu

BACKENDS = ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"]
OPTIMIZERS = {
    "Regularized(Adam)": lambda g: pyreg.Regularized(torch.optim.Adam(g, lr=1e-2)),
    "Regularized(SGD)": lambda g: pyreg.Regularized(torch.optim.SGD(g, lr=0.05, momentum=0.9)),
    "SGD": lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9),
    "Adam": lambda g: pyreg.optim.Adam(g, lr=1e-2),
    "AdamW": lambda g: pyreg.optim.AdamW(g, lr=1e-2),
    "Adagrad": lambda g: pyreg.optim.Adagrad(g, lr=0.05),
    "RMSprop": lambda g: pyreg.optim.RMSprop(g, lr=1e-3),
    "Adam-pre": lambda g: pyreg.optim.Adam(g, lr=1e-2, preconditioned=True),
    "Adagrad-pre": lambda g: pyreg.optim.Adagrad(g, lr=0.05, preconditioned=True),
    "RMSprop-pre": lambda g: pyreg.optim.RMSprop(g, lr=1e-3, preconditioned=True),
}
TARGETS = {"0": 0.7, "2": 0.35, "4": 0.9}


def task(dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(21, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 7)).to(dtype)
    x = torch.randn(128, 21, dtype=dtype)
    y = torch.tanh(x @ torch.randn(21, 7, dtype=dtype))
    return m, x, y


def sparsity(t):
    return float((t == 0).sum()) / t.numel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_tensor_at_its_target_at_every_step(name, dtype, backend):
    m, x, y = task(dtype)
    groups = pyreg.param_groups(m, overrides={k: {"target_sparsity": v} for k, v in TARGETS.items()})
    opt = OPTIMIZERS[name](groups)
    first = None
    with pyreg.use_backend(backend):
        for _ in range(25):
            opt.zero_grad()
            loss = (m(x) - y).float().pow(2).mean()
            loss.backward()
            first = float(loss.detach()) if first is None else first
            opt.step()
            for k, t in TARGETS.items():
                w = m[int(k)].weight
                # ceil(t * n) zeros, or the closest count where weights tie
                # at the threshold (bfloat16 has 256 values per octave, and
                # Adam moves weights from 0 by steps of nearly the same size)
                assert abs(sparsity(w) - t) <= (0.05 if dtype == torch.bfloat16 else 0.01), (k, sparsity(w))
            for layer in (0, 2, 4):  # biases are not regularized
                assert sparsity(m[layer].bias) == 0.0
    if dtype == torch.float32:
        assert float(loss.detach()) < first  # and it trains
    for k, t in TARGETS.items():
        s = opt.state[m[int(k)].weight]
        # (0 only where the k-th smallest weight was 0: weights that the loss no longer moves, in rows
        # that a later layer's zeros cut off, can make up the target)
        assert s[TARGET_STATE[0]].dtype == torch.float64
        assert float(s[TARGET_STATE[0]]) > 0 or sparsity(m[int(k)].weight) >= t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["Regularized", "SGD"])
def test_a_step_matches_the_rule(family, backend):
    """torch's SGD step, then per tensor l1 = tau / lr with tau the
    ceil(t * n)-th smallest |w|, and the prox with that l1 and the group's l2,
    in float64: the same bits."""
    g = torch.Generator().manual_seed(3)
    shapes, targets, lr, l2 = [(9, 7), (31,), (2, 3, 5), ()], [0.5, 0.13, 1.0, 0.0], 0.1, 0.02
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    want = [p.clone() for p in params]
    for p, gr, t in zip(want, grads, targets):
        p.sub_(lr * gr)
        k = math.ceil(t * p.numel() - 1e-9)
        tau = float(p.abs().flatten().sort().values[k - 1]) if k > 0 else 0.0
        l1 = tau / lr
        if lr * l1 < tau:  # the threshold lr * l1, rounded, must reach tau: one ulp up
            l1 = math.nextafter(l1, math.inf)
        p.copy_(torch.sign(p) * torch.clamp(p.abs() - lr * l1, min=0) / (1 + 2 * lr * l2))
    ps = [p.clone().requires_grad_() for p in params]
    group = {"params": ps, "l2": l2, "target_sparsity": targets}
    opt = pyreg.Regularized(torch.optim.SGD([group], lr=lr)) if family == "Regularized" else \
        pyreg.optim.SGD([group], lr=lr)
    for p, gr in zip(ps, grads):
        p.grad = gr.clone()
    with pyreg.use_backend(backend):
        opt.step()
    for a, b in zip(ps, want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-14, atol=1e-15)
    assert [sparsity(p) for p in ps[:3]] == [math.ceil(t * p.numel() - 1e-9) / p.numel()
                                             for t, p in zip(targets, ps[:3])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ["Regularized", "SGD"])
def test_the_count_of_zeros_is_exact_at_any_lr(family, dtype, backend):
    """ceil(t * n) exact zeros after every step, at 60 random lrs: the l1
    that zeroes the k-th smallest weight is tau / lr, raised by one ulp where
    the prox's threshold lr * l1 rounds below tau (about one lr in twenty),
    so that the k-th weight is zeroed too. Distinct magnitudes (no ties), so
    the count is exact."""
    g = torch.Generator().manual_seed(5)
    targets = [0.5, 0.3]
    for i in range(60):
        lr = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.3 + 1e-3
        ps = [torch.randn(37, generator=g, dtype=dtype).requires_grad_(),
              torch.randn(6, 5, generator=g, dtype=dtype).requires_grad_()]
        group = {"params": ps, "target_sparsity": targets}
        opt = pyreg.Regularized(torch.optim.SGD([group], lr=lr)) if family == "Regularized" else \
            pyreg.optim.SGD([group], lr=lr)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
            with pyreg.use_backend(backend):
                opt.step()
            got = [int((p == 0).sum()) for p in ps]
            assert got == [math.ceil(t * p.numel() - 1e-9) for t, p in zip(targets, ps)], (i, lr, got)


@pytest.mark.parametrize("family", ["Regularized", "SGD"])
def test_groups_with_their_own_lr_one_call_and_separate_calls(family, monkeypatch):
    """Two groups with different lrs in one bucket (a per-tensor lr: the CPU
    kernels' one-call path divides by each tensor's lr), one of them 0 (no
    step: an l1 of 0, nothing zeroed). The one call (selection, l1, prox) gives
    the bits of the separate calls it replaces (the op, the division in
    torch, the prox op), over several steps; and the torch backend's (the
    spec's) values."""
    def run(backend):
        m, x, y = task()
        groups = [{"params": [m[0].weight, m[2].weight], "lr": 0.05, "target_sparsity": [0.4, 0.6]},
                  {"params": [m[4].weight], "lr": 0.0, "target_sparsity": 0.3},
                  {"params": [m[0].bias, m[2].bias, m[4].bias]}]
        opt = (pyreg.Regularized(torch.optim.SGD(groups, lr=0.05)) if family == "Regularized"
               else pyreg.optim.SGD(groups, lr=0.05))
        with pyreg.use_backend(backend):
            for _ in range(3):
                opt.zero_grad()
                (m(x) - y).pow(2).mean().backward()
                opt.step()
        ws = [m[i].weight.detach().clone() for i in (0, 2, 4)]
        assert [sparsity(w) for w in ws[:2]] == pytest.approx([0.4, 0.6], abs=1.0 / 33)
        l1 = [opt.state[m[i].weight][TARGET_STATE[0]].clone() for i in (0, 2, 4)]
        assert sparsity(ws[2]) == 0.0 and float(l1[2]) == 0.0 and float(l1[0]) > 0
        return ws + l1

    assert pyreg.backends.cpu.fuses_target()
    one_call = run("cpu")
    spec = run("torch")
    monkeypatch.setattr(type(pyreg.backends.cpu), "fuses_target", lambda self: False)
    separate = run("cpu")
    for a, b, c in zip(one_call, separate, spec):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_tensor_and_changed_targets_and_penalty():
    m, x, y = task()
    groups = [{"params": [m[0].weight, m[2].weight], "target_sparsity": torch.tensor([0.2, 0.6])},
              {"params": [m[4].weight, m[0].bias, m[2].bias, m[4].bias]}]
    opt = pyreg.optim.AdamW(groups, lr=1e-2)
    for step in range(6):
        if step == 3:
            opt.param_groups[0]["target_sparsity"] = 0.8  # checked and applied at the next step
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
        want = (0.2, 0.6) if step < 3 else (0.8, 0.8)
        got = (sparsity(m[0].weight), sparsity(m[2].weight))
        assert got == pytest.approx(want, abs=1.0 / 33)
    l1 = [float(opt.state[p][TARGET_STATE[0]]) for p in (m[0].weight, m[2].weight)]
    want = sum(l * float(p.detach().abs().sum()) for l, p in zip(l1, (m[0].weight, m[2].weight)))
    assert float(opt.penalty) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
def test_state_dict_round_trip(family):
    m, x, y = task(torch.bfloat16)

    def make(model):
        groups = pyreg.param_groups(model, overrides={"0": {"target_sparsity": 0.5}})
        return (pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2)) if family == "Regularized"
                else pyreg.optim.AdamW(groups, lr=1e-2))

    opt = make(m)
    for _ in range(3):
        opt.zero_grad()
        (m(x) - y).float().pow(2).mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = copy.deepcopy(m)
    opt2 = make(m2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    a, b = opt.state[m[0].weight][TARGET_STATE[0]], opt2.state[m2[0].weight][TARGET_STATE[0]]
    assert b.dtype == torch.float64 and float(b) == float(a) > 0  # not cast to bfloat16


BAD = [({"target_sparsity": -0.1}, "target_sparsity"),
       ({"target_sparsity": 1.5}, "target_sparsity"),
       ({"target_sparsity": float("nan")}, "target_sparsity"),
       ({"target_sparsity": [0.5, 0.5, 0.5]}, "target_sparsity"),
       ({"target_sparsity": 0.5, "group_l1": 1e-3}, "group_l1")]


@pytest.mark.parametrize("family", ["Regularized", "AdamW"])
@pytest.mark.parametrize("keys,words", BAD)
def test_bad_values_raise_and_change_nothing(family, keys, words):
    bad_key_changes_nothing(family, {"target_sparsity": 0.3}, keys, words)


METRIC = {  # (optimizer, its arguments, the divisor of each weight's step after it (float64), lr's divisor)
    "Adam": (pyreg.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
             lambda s, t: s["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.95 ** t) + 1e-6, lambda t: 1.0),
    "AdamW-amsgrad": (pyreg.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
                      lambda s, t: s["max_exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999 ** t) + 1e-8, lambda t: 1.0),
    "Adagrad-lr_decay": (pyreg.optim.Adagrad, dict(lr=0.05, lr_decay=0.3, eps=1e-4),
                         lambda s, t: s["sum"].sqrt() + 1e-4, lambda t: 1 + (t - 1) * 0.3),
    "RMSprop-centered": (pyreg.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.5),
                         lambda s, t: (s["square_avg"] - s["grad_avg"] ** 2).sqrt() + 1e-8, lambda t: 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METRIC))
def test_the_metric_target_matches_the_rule(name, backend):
    """preconditioned=True: the optimizer's step (the same optimizer without
    the key), then per tensor u = w * d (d the divisor of each weight's step
    size, from the state the step left), tau the k-th smallest |u|, and
    w <- sign(u) * max(|u| - tau, 0) / (d + 2 * m * l2), m the metric's lr,
    with l1 = tau / m in the state, written out in float64, over three steps:
    the same zeros (exactly k of them) and the same values to float64's
    rounding."""
    cls, kw, divisor, lr_div = METRIC[name]
    g = torch.Generator().manual_seed(11)
    shapes, targets, l2 = [(9, 7), (31,), (2, 3, 5), (), (0, 4)], [0.5, 0.13, 1.0, 0.0, 0.4], 0.02
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ps = [p.clone().requires_grad_() for p in params]
    qs = [p.clone().requires_grad_() for p in params]  # the reference's: the step alone
    opt = cls([{"params": ps, "l2": l2, "target_sparsity": targets}], preconditioned=True, **kw)
    ref = cls([{"params": qs}], **kw)
    for t in range(1, 4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        with pyreg.use_backend(backend):
            opt.step()
            ref.step()
        m = kw["lr"] / lr_div(t)
        for i, (p, q, target) in enumerate(zip(ps, qs, targets)):
            with torch.no_grad():
                d = divisor(ref.state[q], t)
                u = q * d
                k = math.ceil(target * q.numel() - 1e-9)
                tau = float(u.abs().flatten().sort().values[k - 1]) if k > 0 else 0.0
                q.copy_(torch.sign(u) * torch.clamp(u.abs() - tau, min=0) / (d + 2 * m * l2))
            assert int((p == 0).sum()) == k, (t, i)
            assert torch.equal(p == 0, q == 0), (t, i)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
            if p.numel():
                l1 = float(opt.state[p][TARGET_STATE[0]])
                assert l1 == pytest.approx(tau / m, rel=1e-15, abs=0), (t, i)
            # (the reference's state stands for the optimizer's: the same step from the same weights)
            for key, v in ref.state[q].items():
                torch.testing.assert_close(opt.state[p][key], v, rtol=0, atol=0)


def test_ref_and_gradient_mode_are_refused():
    m = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="ref"):
        pyreg.optim.SGD([{"params": [m.weight], "target_sparsity": 0.5, "ref": [m.weight.detach().clone()]}],
                        lr=0.1)
    with pytest.raises(ValueError, match="mode='proximal'"):
        pyreg.Regularized(torch.optim.SGD([{"params": [m.weight], "target_sparsity": 0.5}], lr=0.1),
                          mode="gradient")
    opt = pyreg.Regularized(torch.optim.SGD([{"params": [m.weight], "target_sparsity": 0.5}], lr=0.1))
    opt.mode = "gradient"
    m(torch.randn(4, 5)).sum().backward()
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match="mode='proximal'"):
        opt.step()
    assert torch.equal(m.weight.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_and_metric_groups_in_one_optimizer(backend):
    """A group with preconditioned=True and one without, both with a target,
    in one optimizer: each as in an optimizer of its own (the metric is the
    group's, not the first group's)."""
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(13, 6, generator=g) for _ in range(2))

    pa, pb, qa, qb = (t.clone().requires_grad_() for t in (a, b, a, b))
    both = [{"params": [pa], "target_sparsity": 0.5, "preconditioned": True}, {"params": [pb], "target_sparsity": 0.5}]
    grads = {}

    def fixed(groups):  # the same grads for the same tensor in both runs
        opt = pyreg.optim.Adam(groups, lr=1e-2)
        for t in range(3):
            for grp in groups:
                for p, key in zip(grp["params"], grp["keys"]):
                    p.grad = grads.setdefault((key, t), torch.randn(p.shape, generator=g))
            with pyreg.use_backend(backend):
                opt.step()

    fixed([dict(both[0], keys=["a"]), dict(both[1], keys=["b"])])
    fixed([{"params": [qa], "target_sparsity": 0.5, "preconditioned": True, "keys": ["a"]}])
    fixed([{"params": [qb], "target_sparsity": 0.5, "keys": ["b"]}])
    assert torch.equal(pa, qa) and torch.equal(pb, qb)
    ra = a.clone().requires_grad_()
    fixed([{"params": [ra], "target_sparsity": 0.5, "keys": ["a"]}])
    assert not torch.equal(ra == 0, pa == 0)  # (the two rules zero different weights here)


KERNEL_CASES = {
    "Adam-eps0": (pyreg.optim.Adam, dict(lr=1e-2, eps=0.0)),
    "AdamW-amsgrad": (pyreg.optim.AdamW, dict(lr=3e-3, amsgrad=True, weight_decay=0.05)),
    "Adagrad-lr_decay": (pyreg.optim.Adagrad, dict(lr=0.05, lr_decay=0.3)),
    "RMSprop-centered": (pyreg.optim.RMSprop, dict(lr=1e-3, centered=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_the_metric_kernel_and_the_torch_ops_agree_bit_for_bit(name, dtype, monkeypatch):
    """preconditioned=True on the CPU: the one kernel call (metric_target)
    and the torch ops with pyreg's ops give the same weights and l1, bit for
    bit (torch's ops given a correctly rounded sqrt, as the kernel's: see
    conftest.ieee_sqrt): odd sizes, a 0-dim and an empty tensor, per-tensor l2 and targets
    (0 and 1 among them), weights that tie (0.25 steps) and grads that are 0
    (a weight whose v stays 0: with eps 0 its divisor is float's smallest
    normal), over four steps with two groups' lrs in one bucket."""
    from pyreg.backends import compiled
    cls, kw = KERNEL_CASES[name]
    g = torch.Generator().manual_seed(9)
    shapes = [(13, 7), (40,), (3, 5, 2), (), (0, 3)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    init[1] = (init[1] * 4).round() / 4  # ties
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(4)]
    for gs in grads:
        gs[0][:2] = 0.0  # two rows never pushed
    calls = []
    real = compiled.CompiledKernels.metric_target_ptrs

    def counted(self, *a):
        calls.append(1)
        return real(self, *a)

    def run(kernel):
        ps = [t.clone().requires_grad_() for t in init]
        groups = [{"params": ps[:3], "l2": [0.0, 0.03, 0.5], "target_sparsity": [0.4, 0.3, 1.0]},
                  {"params": ps[3:], "lr": kw["lr"] * 0.5, "target_sparsity": [0.0, 0.5]}]
        opt = cls(groups, preconditioned=True, **kw)
        with monkeypatch.context() as mp:
            mp.setattr(compiled.CompiledKernels, "metric_target_ptrs", counted)
            if not kernel:  # (torch's ops with a correctly rounded sqrt, as the kernel's)
                mp.setattr(compiled.CompiledKernels, "fuses_metric_target", lambda self: False)
                mp.setattr(torch, "_foreach_sqrt", lambda ts: [ieee_sqrt(t) for t in ts])
            for gs in grads:
                for p, gr in zip(ps, gs):
                    p.grad = gr.clone()
                with pyreg.use_backend("cpu"):
                    opt.step()
        return ps, [float(opt.state[p][TARGET_STATE[0]]) for p in ps]

    a, la = run(True)
    assert len(calls) == 4  # (the kernel ran at each step)
    b, lb = run(False)
    assert len(calls) == 4
    for x, y in zip(a, b):  # (with eps 0, the rows never pushed step by 0 / 0: NaN in both)
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(x == 0, y == 0)
    assert la == lb
    assert [int((p == 0).sum()) for p in a[:3]] == [37, 12, 30]
