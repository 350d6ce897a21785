"""The paths that keep a step's host cost low: the ops' CPU fast path (plain
contiguous lists, numbers or float64 coefficients), Regularized's cached
validation (settings and lrs re-checked only when their signature changes)
and its direct kernel calls, and small calls run inline on the calling thread.
Each must give exactly what the general path gives, and still reject every
bad input, changing nothing."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pyreg
from pyreg import _ops, _validate
from pyreg.optim import apply as A

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# Inline (small calls) and pooled execution compute the same bits
# --------------------------------------------------------------------------
_RUN = """
import sys, torch, pyreg
sys.path.insert(0, {tests!r})
from conftest import DTYPES, random_list
from test_structured import dims_for, group_list
torch.set_num_threads({threads})
out = {{}}
torch.manual_seed(0)
with pyreg.use_backend("cpu"):
    for k, dt in enumerate(DTYPES):
        ts = random_list(dt, seed=100 + k, more_layouts=True)
        ts.append(torch.randn(300000, dtype=dt))  # several work items
        gs = [torch.randn(t.shape, dtype=dt) for t in ts]
        st = pyreg.weight_stats(ts)
        p = pyreg.penalty(ts, 0.37, [0.11] * len(ts))
        v = pyreg.add_penalty_grad_(ts, gs, 0.3, 0.7)
        nnz = pyreg.prox_(ts, 0.21, 0.13, 0.9)
        out[str(dt)] = [*st, p, v, nnz] + gs + ts
        ws = group_list(dt, seed=300 + k) + [torch.randn(700, 500, dtype=dt)]
        for which in ("rows", "cols"):
            dims = dims_for(ws, which)
            ggs = [w.clone() for w in ws]
            res = [*pyreg.group_norms(ws, dim=dims), pyreg.group_penalty(ws, 0.3, dim=dims),
                   pyreg.add_group_penalty_grad_(ws, ggs, 0.3, dim=dims),
                   pyreg.group_prox_(ws, 0.5, 0.9, dim=dims, element_l1=0.1, l2=0.2),
                   pyreg.max_norm_(ws, 1.0, dim=dims)]
            out[str(dt) + which] = res + ggs + ws
torch.save(out, {path!r})
"""


def _bits(x):
    x = x.contiguous()
    if x.is_floating_point():
        return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])
    return x


def test_inline_and_pooled_calls_compute_the_same_bits(tmp_path):
    """PYREG_CPU_INLINE_BYTES=0 sends every call to the thread pool; a huge
    value runs every call inline on the calling thread. Same bits."""
    results = {}
    for name, threads, inline in (("inline", 1, "1000000000000"), ("pool2", 2, "0"), ("pool3", 3, "0")):
        path = tmp_path / f"{name}.pt"
        env = dict(os.environ, PYREG_CPU_INLINE_BYTES=inline)
        subprocess.run([sys.executable, "-c", _RUN.format(tests=str(TESTS), path=str(path), threads=threads)],
                       check=True, env=env, cwd=str(tmp_path), timeout=600)
        results[name] = torch.load(path)
    base = results["inline"]
    for name in ("pool2", "pool3"):
        for key, xs in base.items():
            ys = results[name][key]
            assert len(xs) == len(ys)
            for i, (a, b) in enumerate(zip(xs, ys)):
                assert torch.equal(_bits(a), _bits(b)), f"{name} {key}[{i}]"


# --------------------------------------------------------------------------
# The ops' fast path
# --------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.0, 1.5, 3, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), True,
                               1e308, [0.1, 0.2], "x", None])
def test_fast_coefficient_accepts_only_what_coefficient_accepts(c):
    fast = _validate.fast_coefficient(c, 2)
    try:
        slow = _validate.coefficient(c, 2, torch.device("cpu"), "l1")
    except (TypeError, ValueError):
        assert fast is None
        return
    if fast is not None:
        assert isinstance(fast, float) and fast == slow


@pytest.mark.parametrize("values", [[0.0, 1.0], [1.0, -1.0], [float("nan"), 1.0], [1.0, float("inf")]])
def test_fast_coefficient_tensor(values):
    c = torch.tensor(values, dtype=torch.float64)
    ok = all(math.isfinite(v) and v >= 0 for v in values)
    assert (_validate.fast_coefficient(c, 2) is c) == ok
    assert _validate.fast_coefficient(c, 3) is None                         # wrong length
    assert _validate.fast_coefficient(c.float(), 2) is None                 # not float64
    assert _validate.fast_coefficient(torch.stack([c, c], 1)[:, 0], 2) is None  # not contiguous


def test_plain_cpu_only_takes_the_common_case():
    a, b = torch.randn(3), torch.nn.Parameter(torch.randn(4))
    assert _validate.plain_cpu([a, b])
    assert not _validate.plain_cpu([])
    assert not _validate.plain_cpu([a, b.double()])                 # two dtypes
    assert not _validate.plain_cpu([a, torch.randn(2, 3).t()])      # not contiguous
    assert not _validate.plain_cpu([a, torch.arange(3)])            # unsupported dtype
    assert not _validate.plain_cpu([a, torch.randn(3).to_sparse()])
    assert not _validate.plain_cpu([a, torch.empty(3, device="meta")])
    assert not _validate.plain_cpu([a, 1.0])
    assert not _validate.plain_cpu([a, a.as_subclass(type("Sub", (torch.Tensor,), {}))])
    assert not _validate.plain_cpu([a, _nested()])


def _plain_lists():
    """Lists the ops' fast-path test must take or refuse, each with a name."""
    a, b = torch.randn(3), torch.randn(2, 4)
    buf = torch.randn(10)
    p = torch.nn.Parameter(torch.randn(5))
    with torch.inference_mode():
        inf = torch.randn(4)
    e1, e2 = torch.empty(0), buf[3:3]  # empty tensors: empty ranges (one inside buf's)
    sub = a.as_subclass(type("Sub", (torch.Tensor,), {}))
    return {
        "two": [a, b], "tuple": (a, b), "one": [a], "empty list": [], "0-dim": [torch.tensor(2.0), a],
        "parameter": [p, a], "requires grad": [torch.randn(3, requires_grad=True)],
        "float64": [a.double(), b.double()], "float16": [a.half()], "bfloat16": [a.bfloat16(), b.bfloat16()],
        "two dtypes": [a, b.double()], "int": [a, torch.arange(3)], "not contiguous": [a, torch.randn(2, 3).t()],
        "sparse": [a, torch.randn(3).to_sparse()], "meta": [a, torch.empty(3, device="meta")],
        "not a tensor": [a, 1.0], "subclass": [a, sub], "generator": (t for t in [a, b]),
        "views apart": [buf[:5], buf[5:]], "views overlap": [buf[:6], buf[4:]], "twice": [a, a],
        "empty ones": [e1, e2, buf], "empty twice": [e1, e1], "inference": [a, inf],
        "negative bit": [a, torch._neg_view(b)], "zerotensor": [a, torch._efficientzerotensor(3)],
        "nested": [a, _nested()],
    }


def _nested():
    """A contiguous (strided) nested tensor: a torch.Tensor whose memory is its components' elements."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype warning
        return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])


@pytest.mark.parametrize("name", list(_plain_lists()))
@pytest.mark.parametrize("written", [False, True])
@pytest.mark.parametrize("inference_mode", [False, True])
def test_the_fast_path_test_takes_what_the_python_checks_take(name, written, inference_mode):
    """plain_list (one pass in C) against the checks it stands for:
    plain_cpu, and for a written list no inference tensor outside inference
    mode and disjoint_pointers; the same pointers, element counts and dtype
    codes as plain_description where it takes the list."""
    from pyreg import ops
    from pyreg.backends._marshal import plain_description, plain_list

    ts = _plain_lists()[name]
    listed = list(ts) if name != "generator" else None
    want = None
    if listed is not None and type(ts) in (list, tuple) and _validate.plain_cpu(listed):
        ptrs = list(map(torch.Tensor.data_ptr, listed))
        if written:
            if not inference_mode and any(t.is_inference() for t in listed):
                ptrs = None
            elif ptrs is not None:
                ptrs = _validate.disjoint_pointers(listed)
        want = None if ptrs is None else plain_description(listed, ptrs)
    with torch.inference_mode(inference_mode):
        got = plain_list(ts, written)
        fast = ops._fast(ts, written)
    assert (got is None) == (want is None), (name, got, want)
    if want is not None:
        assert tuple(map(list, got)) == tuple(map(list, want)) and tuple(fast[1]) == tuple(got)
    assert (fast is None) == (want is None)


@pytest.mark.parametrize("bad, err, match", [
    (dict(l1=-1.0), ValueError, "l1 must be finite"),
    (dict(l2=float("nan")), ValueError, "l2 must be finite"),
    (dict(lr=float("inf")), ValueError, "lr must be finite"),
    (dict(l1=torch.tensor([0.1, -0.1], dtype=torch.float64)), ValueError, r"l1\[1\] must be finite"),
    (dict(l1=True), TypeError, "l1 must be a number"),
])
def test_fast_path_still_rejects_bad_coefficients(bad, err, match):
    ts = [torch.randn(5), torch.randn(3, 4)]
    before = [t.clone() for t in ts]
    kwargs = dict(dict(l1=0.1, l2=0.1, lr=0.5), **bad)
    with pytest.raises(err, match=match):
        pyreg.prox_(ts, **kwargs)
    assert all(torch.equal(t, b) for t, b in zip(ts, before))


def test_fast_path_matches_the_custom_op_with_tensor_coefficients():
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=g) for n in (7, 300, 4097)]
    gs = [torch.randn(n, generator=g) for n in (7, 300, 4097)]
    c1 = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    c2 = torch.tensor([0.05, 0.0, 0.2], dtype=torch.float64)
    lr = torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64)
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    assert torch.equal(pyreg.prox_(a, c1, c2, lr), _ops.prox_op(b, c1, c2, lr, []))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g1, g2 = [x.clone() for x in gs], [x.clone() for x in gs]
    assert torch.equal(pyreg.add_penalty_grad_(ts, g1, c1, c2), _ops.add_penalty_grad_op(ts, g2, c1, c2, []))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_fast_path_rejects_overlap_and_shape_mismatch():
    buf = torch.randn(10)
    with pytest.raises(ValueError, match="share memory"):
        pyreg.prox_([buf[:6], buf[4:]], l1=0.1)
    w = [torch.randn(4)]
    with pytest.raises(ValueError, match=r"grads\[0\] is \(5,\)"):
        pyreg.add_penalty_grad_(w, [torch.randn(5)], l1=0.1)
    with pytest.raises(ValueError, match="shares memory"):
        pyreg.add_penalty_grad_(w, [w[0]], l1=0.1)


# --------------------------------------------------------------------------
# Regularized: cached validation and direct kernel calls
# --------------------------------------------------------------------------
def _setup(mode, seed=0, overrides=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    groups = pyreg.param_groups(model, l1=1e-2, l2=1e-3, overrides=overrides)
    opt = pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2), mode=mode)
    x, y = torch.randn(16, 8), torch.randn(16, 3)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, step


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            {k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
             for k, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _same(a, b):
    ps_a, gs_a, st_a, gr_a = a
    ps_b, gs_b, st_b, gr_b = b
    assert all(torch.equal(x, y) for x, y in zip(ps_a, ps_b))
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(gs_a, gs_b))
    assert st_a.keys() == st_b.keys()
    for k in st_a:
        for n in st_a[k]:
            x, y = st_a[k][n], st_b[k][n]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert len(gr_a) == len(gr_b)


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
@pytest.mark.parametrize("key, bad, err", [
    ("l1", -1.0, ValueError), ("l1", float("nan"), ValueError), ("l2", float("inf"), ValueError),
    ("l1", True, TypeError), ("l1", "0.1", TypeError), ("group_l1", -0.5, ValueError),
    ("max_norm", float("nan"), ValueError), ("lr", -1e-3, ValueError),
])
def test_a_bad_value_set_after_good_steps_raises_and_changes_nothing(mode, key, bad, err):
    model, opt, step = _setup(mode)
    step()
    step()
    if key == "lr" and mode == "gradient":
        pytest.skip("gradient mode does not read the lr")
    _bad_step_changes_nothing(model, opt, 0, key, bad, err)


def _bad_step_changes_nothing(model, opt, group, key, bad, err):
    """Sets ``param_groups[group][key] = bad``: the next step raises ``err``
    and leaves the params, grads, state and groups as they were."""
    opt.param_groups[group][key] = bad
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 3)).backward()
    before = _snapshot(model, opt)
    with pytest.raises(err):
        opt.step()
    _same(before, _snapshot(model, opt))


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_a_coefficient_tensor_changed_in_place_is_checked_again(mode):
    model, opt, step = _setup(mode)
    opt.param_groups[0]["l1"] = torch.tensor(1e-2)
    step()
    opt.param_groups[0]["l1"].fill_(-1.0)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 3)).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['l1'\] must be finite and >= 0"):
        opt.step()
    _same(before, _snapshot(model, opt))
    opt.param_groups[0]["l1"].fill_(2e-2)   # a good value again: used
    opt.step()
    assert opt._plan().buckets[0].values["l1"][0] == pytest.approx(2e-2)


def test_schedule_changes_are_applied_every_step():
    model, opt, step = _setup("proximal", seed=4)
    ref_model, ref_opt, ref_step = _setup("proximal", seed=4)
    for k in range(5):  # a new l1 and lr at every step (a schedule)
        for o in (opt, ref_opt):
            o.param_groups[0]["l1"] = 1e-2 * (k + 1)
            o.param_groups[0]["lr"] = 1e-2 / (k + 1)
        ref_opt._engine._quick = None  # the reference re-validates everything at every step
        step()
        ref_step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
@pytest.mark.parametrize("overrides", [None, {"0": {"l1": 3e-2, "lr": 2e-2}}])
def test_direct_kernel_calls_match_the_ops(mode, overrides, monkeypatch):
    """A plain eager CPU step calls the kernels directly (with numbers, or
    per-tensor coefficients and lrs when the groups differ); the same step
    through the public ops gives the same bits."""
    outs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(A, "direct_backend", lambda: None)
        model, opt, step = _setup(mode, seed=7, overrides=overrides)
        for _ in range(3):
            step()
        outs.append([p.detach().clone() for p in model.parameters()] + [opt.penalty.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_direct_path_checks_parameters_again_when_their_memory_changes():
    model, opt, step = _setup("proximal")
    step()
    w0, w1 = model[0].weight, model[2].weight
    # the second weight now shares the first one's memory (same size: a view of it)
    w1.data = w0.data.reshape(-1)[: w1.numel()].view_as(w1)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 3)).backward()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()


def test_direct_path_checks_grads_that_moved():
    """Gradient mode: grads found apart from the params once are checked
    again as soon as one of them is elsewhere in memory."""
    model, opt, step = _setup("gradient")
    step()
    step()
    w0, w2 = model[0].weight, model[2].weight
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 3)).backward()
    w2.grad = w0.detach().reshape(-1)[: w2.numel()].view_as(w2)  # shares the first weight's memory
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    _same(before, _snapshot(model, opt))


@pytest.mark.parametrize("op", ["penalty", "weight_stats", "prox_", "max_norm_", "group_prox_"])
def test_fast_path_leaves_non_tensors_to_the_general_check(op):
    args = {"max_norm_": (1.0,), "group_prox_": (0.1,)}.get(op, ())
    with pytest.raises(TypeError, match=r"tensors\[1\] is a float, not a torch.Tensor"):
        getattr(pyreg, op)([torch.randn(3), 1.0], *args)


@pytest.mark.parametrize("dims", [[1, 0, 2, 0], (-1, 0, 1, -1), [1, 0, 2, 3], [1, 0, 2], [1, 0.0, 2, 0],
                                  [1, True, 2, 0]],
                         ids=["list", "tuple", "out-of-range", "short", "float", "bool"])
def test_group_ops_take_the_fast_path_with_one_dim_per_tensor(dims, monkeypatch):
    """``group_prox_`` and ``max_norm_`` with one group dimension per tensor
    (a list or tuple of ints, as the optimizers pass them) take the fast
    path, with the bits of the general path; any other ``dims`` (out of
    range, of another length, not ints) goes to the general path, which
    explains it."""
    from pyreg import ops
    g = torch.Generator().manual_seed(31)
    shapes = [(5, 7), (6,), (3, 4, 5), ()]
    init = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    general = []
    args = {"group_prox_": (0.4, 0.9), "max_norm_": (0.8,)}
    calls = []
    group_args = ops._group_args
    monkeypatch.setattr(ops, "_group_args", lambda *a: calls.append(1) or group_args(*a))
    for op, a in args.items():
        ws = [t.clone() for t in init]
        try:  # (the general path, with its checks: the tensors from an iterator, not a list)
            general.append((getattr(pyreg, op)(iter(ws), *a, dim=dims), ws))
        except (TypeError, ValueError) as e:
            general.append(e)
    assert len(calls) == 2
    calls.clear()
    for (op, a), want in zip(args.items(), general):
        ws = [t.clone() for t in init]
        if isinstance(want, Exception):
            with pytest.raises(type(want), match=re.escape(str(want))):
                getattr(pyreg, op)(ws, *a, dim=dims)
            assert calls and all(torch.equal(x, y) for x, y in zip(ws, init))
            continue
        out = getattr(pyreg, op)(ws, *a, dim=dims)
        assert not calls
        assert torch.equal(out, want[0]) and all(torch.equal(x, y) for x, y in zip(ws, want[1]))
        assert not all(torch.equal(x, y) for x, y in zip(ws, init))


# --------------------------------------------------------------------------
# Regularized's fast path (pyreg._C.FastProx): a step that finds the groups as
# the previous steps left them goes straight from the inner step to the CPU
# prox kernel. It must give the bits of the full path, and hand every change
# to it.
# --------------------------------------------------------------------------
from pyreg.optim import regularized as R  # noqa: E402


def _count_fast(monkeypatch):
    """Counts the steps that took the fast path."""
    calls = []
    bump = R._bump
    monkeypatch.setattr(R, "_bump", lambda ps: (calls.append(1), bump(ps)))
    return calls


def _l1_groups(model):
    return pyreg.param_groups(model, l1=1.0, l2=1e-3)


def _strength_groups(model):
    """l1_strength, refreshed every 3 steps, with an l2."""
    return pyreg.param_groups(model, l1_strength=0.6, l2=1e-3, overrides={"*": {"l1_refresh": 3}})


def _run_both(monkeypatch, between, steps=6, opt_class=torch.optim.Adam, groups=_l1_groups):
    """The same training with and without the fast path, ``between(k, model,
    opt)`` before step k: (params and penalty with it, without it, fast steps)."""
    calls = _count_fast(monkeypatch)
    outs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(R, "fast_prox", lambda *a: None)
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        opt = pyreg.Regularized(opt_class(groups(model), lr=1e-2))
        gen = torch.Generator().manual_seed(5)
        for k in range(steps):
            between(k, model, opt)
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 3, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            between(-1 - k, model, opt)  # after backward, before the step
            opt.step()
        outs.append([p.detach().clone() for p in model.parameters()] + [opt.penalty.clone()])
        if fast:
            n_fast = len(calls)
    return outs[0], outs[1], n_fast


def _bits_equal(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def test_fast_path_takes_new_lrs_and_gives_the_full_paths_bits(monkeypatch):
    def schedule(k, model, opt):
        if k >= 3:  # a scheduler: a new float lr in every group at every step
            for g in opt.param_groups:
                g["lr"] = 1e-2 / (k + 1)
    with_fast, without, n_fast = _run_both(monkeypatch, schedule, steps=8)
    assert n_fast == 6  # the first two steps check everything; then every step is fast
    assert _bits_equal(with_fast, without)
    assert any(bool((p == 0).any()) for p in with_fast[:-1])  # the prox made zeros


def test_fast_path_hands_a_new_coefficient_to_the_full_path(monkeypatch):
    def change(k, model, opt):
        if k == 4:
            opt.param_groups[0]["l1"] = 0.2
    with_fast, without, n_fast = _run_both(monkeypatch, change, steps=8)
    assert n_fast == 5  # steps 2, 3; step 4 checks all (the plan keeps its buckets); 5, 6, 7
    assert _bits_equal(with_fast, without)


def test_fast_path_skips_a_param_without_grad(monkeypatch):
    def drop(k, model, opt):
        if k == -5:  # after backward of step 4: the first weight has no grad this step
            model[0].weight.grad = None
    with_fast, without, n_fast = _run_both(monkeypatch, drop, steps=7)
    assert n_fast == 3
    assert _bits_equal(with_fast, without)


def test_fast_path_follows_memory_replaced_before_the_step(monkeypatch):
    def move(k, model, opt):
        if k == 4:
            model[2].weight.data = model[2].weight.data.clone()  # new memory, same values
    with_fast, without, n_fast = _run_both(monkeypatch, move, steps=7)
    # steps 2, 3, 5, 6 fast: step 4 finds the memory moved before its inner step (the full path,
    # which checks it for sharing; before, the fast step found it after) and makes the fast path again
    assert n_fast == 4
    assert _bits_equal(with_fast, without)


class _CopyingSGD(torch.optim.SGD):
    """An SGD whose step puts each param's new value in new memory."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data = p.data - g["lr"] * p.grad
        return None


def test_fast_path_follows_memory_the_inner_step_replaced(monkeypatch):
    with_fast, without, n_fast = _run_both(monkeypatch, lambda k, m, o: None, steps=6, opt_class=_CopyingSGD)
    assert n_fast == 0  # each step found new memory after the inner step: the full path's prox
    assert _bits_equal(with_fast, without)


def test_fast_path_runs_the_inner_optimizers_own_hooks(monkeypatch):
    """The whole fast step (one call into C) leaves an inner optimizer with
    step hooks to the fast step that runs them: each hook once per step, in
    order, and the full path's bits; without hooks again, the one call."""
    seen, handles = {}, []

    def hooks(k, model, opt):
        calls = seen.setdefault(id(opt), [])
        if k == 4:
            inner = opt.optimizer
            handles.append(inner.register_step_pre_hook(lambda o, a, kw: calls.append(("pre", o is inner))))
            handles.append(inner.register_step_post_hook(lambda o, a, kw: calls.append(("post", o is inner))))
        if k == 6:
            for h in handles:
                h.remove()
            handles.clear()
    with_fast, without, n_fast = _run_both(monkeypatch, hooks, steps=8)
    assert _bits_equal(with_fast, without)
    assert n_fast == 6  # steps 2..7, hooks or not
    assert all(c == [("pre", True), ("post", True)] * 2 for c in seen.values())  # steps 4 and 5 only


def test_fast_path_with_l1_strength_gives_the_full_paths_bits(monkeypatch):
    """l1_strength's buckets take the fast path too: their prox reads the l1
    vector that the refreshes (every 3 steps, after the prox) update."""
    def schedule(k, model, opt):
        if k >= 5:
            for g in opt.param_groups:
                g["lr"] = 1e-2 / (k + 1)
    with_fast, without, n_fast = _run_both(monkeypatch, schedule, steps=9, groups=_strength_groups)
    assert n_fast == 7
    assert _bits_equal(with_fast, without)
    assert any(bool((p == 0).any()) for p in with_fast[:-1])  # the refreshed l1 made zeros


def test_fast_path_with_l1_strength_follows_l1_values_replaced_in_the_state(monkeypatch):
    """Another l1 tensor put into the state (as a state loaded by hand): the
    step finds its l1 vector gone and takes the full path, which reads the
    state's values."""
    def replace(k, model, opt):
        if k == 4:
            for s in opt.state.values():
                if "strength_l1" in s:
                    s["strength_l1"] = s["strength_l1"] * 1.5
    with_fast, without, n_fast = _run_both(monkeypatch, replace, steps=9, groups=_strength_groups)
    assert n_fast == 6  # steps 2, 3; 4 checks all (the plan stays: fast again from 5); 5, 6, 7, 8
    assert _bits_equal(with_fast, without)


def test_fast_path_with_l1_strength_follows_memory_the_inner_step_replaced(monkeypatch):
    """Each fast step's prox finds new memory and hands the step to the full
    path (steps 3, 5, 7: a refresh at 3), whose refreshes still measure the
    push from the weights before the step."""
    with_fast, without, n_fast = _run_both(monkeypatch, lambda k, m, o: None, steps=8, opt_class=_CopyingSGD,
                                           groups=_strength_groups)
    assert n_fast == 0
    assert _bits_equal(with_fast, without)


#: The strength keys of the two weights of :func:`_staggered_strength_run`.
STAGGERED = {"l1": ("l1_strength", "l1_strength"), "group": ("group_strength", "group_strength"),
             "mixed": ("group_strength", "l1_strength")}


def _staggered_strength_run(make_opt, skip_at=None, keys="l1", reset_at=None):
    """16 steps of an l1_strength MLP (the two weights refreshed every 3 and 4
    steps: a bucket of two slices) from ``make_opt(groups)``: the second
    weight without a grad at step 7, an lr schedule from step 10, a state
    dict loaded after step 11, at ``skip_at`` a step GradScaler skips and
    before step ``reset_at`` the second weight's state deleted (its moments
    and its count start again).
    ``keys``: the weights' strengths, as :data:`STAGGERED` names them
    (group_strength over the input columns). Per step and weight: (the
    state's step count, the l1's (group_l1's) bits, the weight's bits)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(300, 240), torch.nn.ReLU(), torch.nn.Linear(240, 5))
    names = STAGGERED[keys]
    groups = pyreg.param_groups(model, overrides={
        "0.weight": {names[0]: 0.5, "l1_refresh": 3, **({"group_dim": 1} if names[0] == "group_strength" else {})},
        "2.weight": {names[1]: 0.5, "l1_refresh": 4, **({"group_dim": 1} if names[1] == "group_strength" else {})}})
    state_keys = ["strength_group_l1" if n == "group_strength" else "strength_l1" for n in names]
    opt = make_opt(groups)
    gen = torch.Generator().manual_seed(6)
    seen = []
    for k in range(16):
        x, y = torch.randn(32, 300, generator=gen), torch.randn(32, 5, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if k == 7:
            model[2].weight.grad = None
        if k >= 10:
            for g in opt.param_groups:
                g["lr"] = 1e-2 / k
        if k == skip_at:
            opt.found_inf = torch.ones(())  # (as GradScaler sets it: the step is skipped)
        if k == reset_at:
            del opt.state[model[2].weight]
        opt.step()
        opt.__dict__.pop("found_inf", None)
        if k == 11:
            opt.load_state_dict(opt.state_dict())
        seen.append([(opt.state[p].get("strength_step"), _bits(opt.state[p][key]).item(), _bits(p.detach()).clone())
                     for p, key in zip((model[0].weight, model[2].weight), state_keys)])
    return seen


def test_fast_path_with_l1_strength_counts_and_refreshes_as_the_full_path(monkeypatch):
    """The whole fast step (one call into C) counts each l1_strength param's
    steps in the state and hands a step with a refresh due to Python: over
    staggered refreshes (a bucket of two slices), two refresh periods, a
    step where one weight has no grad (it is not counted there), a state
    dict loaded in the middle and an lr schedule, the counts, the l1 and the
    weights are the full path's, bit for bit, at every step."""
    calls = _count_fast(monkeypatch)
    runs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(R, "fast_prox", lambda *a: None)
        runs.append(_staggered_strength_run(lambda groups: pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2))))
        if fast:
            n_fast = len(calls)
    assert [[(t, q) for t, q, _ in step] for step in runs[0]] == [[(t, q) for t, q, _ in step] for step in runs[1]]
    assert all(torch.equal(a[2], b[2]) for s0, s1 in zip(*runs) for a, b in zip(s0, s1))
    assert [t for t, _, _ in runs[0][-1]] == [16, 15]  # (the second weight had no grad at one step)
    assert len({q for step in runs[0] for _, q, _ in step}) > 4  # refreshed several times
    assert n_fast >= 8


@pytest.mark.parametrize("family", ["fused", "Regularized"])
@pytest.mark.parametrize("key", ["group_l1", "group_strength"])
def test_group_buckets_go_straight_to_the_kernel_with_the_bits_of_the_op(key, family, monkeypatch):
    """A group bucket of plain CPU tensors takes the kernel directly
    (Bucket.group_direct: its description and group shapes kept): over
    steps with groups along columns and rows, a 3-D weight, a weight
    replaced through .data by a copy (described again) and by a
    non-contiguous one (the op's checked path then), the weights
    and coefficients are those of the checked op's path, bit for bit."""
    from pyreg.backends.compiled import CompiledKernels
    from pyreg.optim.plan import Bucket
    calls = []
    ptrs = CompiledKernels.group_prox_ptrs
    monkeypatch.setattr(CompiledKernels, "group_prox_ptrs", lambda self, *a: calls.append(1) or ptrs(self, *a))
    value = 0.6 if key == "group_strength" else 50.0
    runs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(Bucket, "group_direct", lambda self: None)
        g = torch.Generator().manual_seed(3)
        ws = [torch.nn.Parameter(torch.randn(sh, generator=g, dtype=torch.float64))
              for sh in ((7, 5), (4, 6), (3, 4, 5))]
        groups = [{"params": ws[:2], key: value, "group_dim": 1, "l1_refresh": 2},
                  {"params": ws[2:], key: value, "group_dim": 0, "l1_refresh": 2}]
        opt = (pyreg.optim.AdamW(groups, lr=1e-2) if family == "fused"
               else pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2)))
        seen = []
        for step in range(9):
            if step == 4:  # (other memory: described again)
                ws[1].data = ws[1].data.clone()
            if step == 6:  # (not contiguous: the checked op)
                ws[1].data = ws[1].data.t().contiguous().t()
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
            opt.step()
            seen.append([w.detach().clone() for w in ws]
                        + [opt.state[w].get("strength_group_l1", torch.zeros(())).clone() for w in ws])
        runs.append(seen)
        if direct:
            n_direct = len(calls)
    assert all(torch.equal(a, b) for s0, s1 in zip(*runs) for a, b in zip(s0, s1))
    if key == "group_l1":
        assert all(bool((w == 0).all(dim=0).any()) for w in runs[0][-1][:2])  # (whole columns zeroed)
    else:
        assert all(float(c) > 0 for c in runs[0][-1][3:])  # (refreshed)
    assert n_direct >= 6 and len(calls) == n_direct


@pytest.mark.parametrize("keys", list(STAGGERED))
def test_regularized_full_path_counts_strength_steps_in_c_as_python_does(keys, monkeypatch):
    """Regularized's full path (group_strength, or l1_strength where the fast
    path is not taken) counts the strengths' steps at C speed after the inner
    step where no refresh is due and nothing changed (R._count_in_c), and
    in Python at the others: over staggered refreshes, two refresh periods,
    a step where one weight has no grad, a state dict loaded in the middle
    and an lr schedule, the counts, the coefficients and the weights are
    those of the steps counted in Python only, bit for bit, at every step;
    and steps were counted in C."""
    monkeypatch.setattr(R, "fast_prox", lambda *a: None)
    answers = []
    count_in_c = R._count_in_c
    monkeypatch.setattr(R, "_count_in_c", lambda *a: answers.append(count_in_c(*a)) or answers[-1])
    runs = []
    for in_c in (True, False):
        if not in_c:
            monkeypatch.setattr(R, "_count_in_c", lambda *a: None)
        runs.append(_staggered_strength_run(lambda groups: pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2)),
                                            keys=keys))
    assert [[(t, q) for t, q, _ in step] for step in runs[0]] == [[(t, q) for t, q, _ in step] for step in runs[1]]
    assert all(torch.equal(a[2], b[2]) for s0, s1 in zip(*runs) for a, b in zip(s0, s1))
    assert [t for t, _, _ in runs[0][-1]] == [16, 15]  # (the second weight had no grad at one step)
    assert len({q for step in runs[0] for _, q, _ in step}) > 4  # refreshed several times
    assert sum(a is not None for a in answers) >= 6


@pytest.mark.parametrize("keys", list(STAGGERED))
@pytest.mark.parametrize("family", ["fused", "Regularized", "Regularized-fast"])
def test_a_deleted_state_counts_again_from_zero_on_every_path(family, keys, monkeypatch):
    """The state is the counts' one record: a param whose state is deleted
    mid-run (to restart its optimizer's moments) counts its steps again from
    0, whether the steps count in C or in Python, with the same counts,
    coefficients and weights, bit for bit (fused optimizers, Regularized's
    full path and its compiled fast path)."""
    if family == "Regularized":
        monkeypatch.setattr(R, "fast_prox", lambda *a: None)
    make = ((lambda groups: pyreg.optim.AdamW(groups, lr=1e-2)) if family == "fused"
            else (lambda groups: pyreg.Regularized(torch.optim.Adam(groups, lr=1e-2))))
    runs = []
    for in_c in (True, False):
        if not in_c:
            monkeypatch.setattr(FZ, "strength_counter", lambda *a: None)
            monkeypatch.setattr(R, "_count_in_c", lambda *a: None)
            monkeypatch.setattr(R, "fast_prox", lambda *a: None)
        runs.append(_staggered_strength_run(make, keys=keys, reset_at=9))
    assert [[(t, q) for t, q, _ in step] for step in runs[0]] == [[(t, q) for t, q, _ in step] for step in runs[1]]
    assert all(torch.equal(a[2], b[2]) for s0, s1 in zip(*runs) for a, b in zip(s0, s1))
    assert [t for t, _, _ in runs[0][-1]] == [16, 7]  # (steps 9 to 15 since its state was deleted)


def test_regularized_counts_in_c_again_after_the_inner_optimizer_loads_a_state(monkeypatch):
    """After the inner optimizer's own load_state_dict (new state dicts),
    Regularized's full path counts the strengths' steps in Python once, then
    in C again with a counter of the new state."""
    answers = []
    count_in_c = R._count_in_c
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    opt = pyreg.Regularized(torch.optim.Adam([{"params": [w], "group_strength": 0.5, "group_dim": 1,
                                               "l1_refresh": 3}], lr=1e-2))
    monkeypatch.setattr(R, "_count_in_c", lambda *a: answers.append(count_in_c(*a)) or answers[-1])
    for k in range(12):
        w.grad = torch.randn(6, 5, generator=g)
        opt.step()
        if k == 4:
            opt.optimizer.load_state_dict(opt.optimizer.state_dict())
    assert [a is not None for a in answers[6:]].count(True) >= 3
    assert opt.state[w]["strength_step"] == 12


@pytest.mark.parametrize("key", ["l1_strength", "group_strength"])
def test_regularized_takes_back_a_c_count_when_the_inner_step_raises(key, monkeypatch):
    """Regularized's full path counts a step in C before its inner step: an
    inner step that raises leaves every count as it was (a failed step is
    not counted), and the next steps count on."""
    monkeypatch.setattr(R, "fast_prox", lambda *a: None)
    counted = []
    count_in_c = R._count_in_c
    monkeypatch.setattr(R, "_count_in_c", lambda *a: counted.append(count_in_c(*a)) or counted[-1])
    g = torch.Generator().manual_seed(4)
    ws = [torch.nn.Parameter(torch.randn(6, 5, generator=g)) for _ in range(2)]
    opt = pyreg.Regularized(torch.optim.Adam([{"params": ws, key: 0.5, "l1_refresh": 4,
                                               **({"group_dim": 1} if key == "group_strength" else {})}], lr=1e-2))
    for k in range(6):
        for w in ws:
            w.grad = torch.randn(6, 5, generator=g)
        opt.step()
    before = [opt.state[w]["strength_step"] for w in ws]

    def fail(*args):
        raise RuntimeError("the inner step fails")
    hook = opt.optimizer.register_step_pre_hook(fail)
    with pytest.raises(RuntimeError, match="the inner step fails"):
        opt.step()
    hook.remove()
    assert counted[-1] is not None  # (counted in C, then taken back)
    assert [opt.state[w]["strength_step"] for w in ws] == before == [6, 6]
    for w in ws:
        w.grad = torch.randn(6, 5, generator=g)
    opt.step()
    assert [opt.state[w]["strength_step"] for w in ws] == [7, 7]


def test_strength_counts_count_as_the_python_rule_and_refuse_what_they_cannot_keep():
    """pyreg._C.StrengthCounts (the strengths' counts at C speed): a step
    counts each param's step in its state where no refresh is due (0), says
    1 where one is (t >= k and (t + shift) % k == 0 for the count t of this
    step) and -1 where the state is not as seen (another state object, dict
    or l1 entry, a count that is not an int), changing nothing then; it
    takes only params with a state dict holding their l1, a period of at
    least 1 and a shift of at least 0 (else a ValueError)."""
    from pyreg._lib import _C
    if _C is None or not hasattr(_C, "StrengthCounts"):
        pytest.skip("no compiled module")
    a, b = torch.zeros(3), torch.zeros(2)
    l1 = torch.zeros(2, dtype=torch.float64)
    # (b: a group_strength param, its coefficient under its own key, named by its entry)
    state = {a: {"strength_l1": l1[0], "strength_step": 4}, b: {"strength_group_l1": l1[1], "strength_step": 0}}

    class B:
        steps_taken = [4, 0]
    bucket = B()
    c = _C.StrengthCounts(state, "strength_l1", "strength_step", [(a, 3, 0), (b, 5, 2, "strength_group_l1")],
                          [bucket])
    got = []
    for _ in range(4):
        got.append(c.step(state))
        if got[-1] == 1:  # (the refresh step, counted in Python)
            for s in state.values():
                s["strength_step"] += 1
    # a counts 5, then 6 (6 >= 3 and 6 % 3 == 0: a refresh), 7, 8; b 1 to 4 (below its period, 5)
    assert got == [0, 1, 0, 0]
    assert [s["strength_step"] for s in state.values()] == [8, 4] and bucket.steps_taken is None
    for changed in ({**state}, {a: dict(state[a]), b: state[b]}, {a: {**state[a], "strength_l1": l1[0] + 0},
                                                                    b: state[b]},
                    {a: state[a], b: {**state[b], "strength_group_l1": l1[1] + 0}}):
        if changed is not state:
            assert c.step(changed) == -1
    state[b]["strength_step"] = 4.0
    assert c.step(state) == -1 and state[a]["strength_step"] == 8  # nothing counted
    good = ("strength_l1", "strength_step")
    for entries, st, match in [([(a, 0, 0)], state, "period"), ([(a, 3, -1)], state, "shift"),
                               ([(torch.zeros(1), 3, 0)], state, "no state dict"), ([(a, 3, 0)], {a: {}}, "no l1"),
                               ([(a, 3)], state, "3-tuple"), ([(a, 3, 0)], [], "not a dict"),
                               ([(a, 3, 0, "strength_group_l1")], state, "no l1"), ([(b, 3, 0)], state, "no l1")]:
        with pytest.raises(ValueError, match=match):
            _C.StrengthCounts(st, *good, entries, [])
    with pytest.raises(TypeError, match="StrengthCounts"):
        _C.FastProx([], []).bind_counts(object())


def test_fast_path_takes_an_added_group(monkeypatch):
    extra = {}

    def add(k, model, opt):
        if k == 4:
            extra["w"] = torch.nn.Parameter(torch.randn(5, 7, generator=torch.Generator().manual_seed(9)))
            opt.add_param_group({"params": [extra["w"]], "param_names": ["extra"], "l1": 0.05})
        if k < 0 and "w" in extra:
            extra["w"].grad = torch.full_like(extra["w"], 0.01)
    with_fast, without, n_fast = _run_both(monkeypatch, add, steps=8)
    assert _bits_equal(with_fast, without)
    assert n_fast == 4  # steps 2, 3; step 4 makes a new plan, checked at 4 and 5; then 6, 7


@pytest.mark.parametrize("key, bad, err", [
    ("lr", float("nan"), ValueError), ("lr", -1e-3, ValueError), ("lr", float("inf"), ValueError),
    ("lr", "0.1", TypeError), ("l1", -1.0, ValueError), ("l2", float("nan"), ValueError),
])
def test_fast_path_then_a_bad_value_raises_and_changes_nothing(key, bad, err, monkeypatch):
    calls = _count_fast(monkeypatch)
    model, opt, step = _setup("proximal")
    for _ in range(3):
        step()
    assert calls and opt._fast is not None
    _bad_step_changes_nothing(model, opt, 1, key, bad, err)


def test_fast_path_is_not_taken_under_another_backend_or_a_dispatch_mode(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = _count_fast(monkeypatch)
    model, opt, step = _setup("proximal")
    for _ in range(3):
        step()
    n = len(calls)
    assert n == 1
    with pyreg.use_backend("torch"):
        step()
    with Passthrough():
        step()
    assert len(calls) == n
    step()  # all checked again
    step()
    assert len(calls) == n + 1


# --------------------------------------------------------------------------
# The fused optimizers keep a step's buckets (fused._Gathered) and, while
# nothing they were made from changed, give the next steps only new grads.
# Every change must send the step back through the full gather, with the
# bits of an optimizer that never keeps them.
# --------------------------------------------------------------------------
from pyreg.optim import fused as FZ  # noqa: E402


def _gather_both(monkeypatch, opt_factory, between, steps=7):
    """The same training with the kept buckets and without; ``between(k,
    model, opt)`` after backward of step k: (params and state with, without,
    steps that reused the buckets)."""
    reused = []
    reuse = FZ._Gathered.reuse

    def counting(self, *a):
        out = reuse(self, *a)
        reused.append(out is not None)
        return out

    outs = []
    for keep in (True, False):
        monkeypatch.setattr(FZ._Gathered, "reuse", counting if keep else (lambda self, *a: None))
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        opt = opt_factory(model)
        gen = torch.Generator().manual_seed(5)
        for k in range(steps):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 3, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            between(k, model, opt)
            opt.step()
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        outs.append([p.detach().clone() for p in model.parameters()] + [t.clone() for t in state])
    return outs[0], outs[1], sum(reused)


_FACTORIES = {
    "AdamW": lambda m: pyreg.optim.AdamW(pyreg.param_groups(m, l1=0.05), lr=1e-2, weight_decay=0.1),
    "SGD momentum": lambda m: pyreg.optim.SGD(pyreg.param_groups(m, l1=0.05), lr=0.05, momentum=0.9),
    "SGD": lambda m: pyreg.optim.SGD(pyreg.param_groups(m, l1=0.05), lr=0.05),
    "Adagrad": lambda m: pyreg.optim.Adagrad(pyreg.param_groups(m, l1=0.05), lr=0.05),
    "RMSprop centered": lambda m: pyreg.optim.RMSprop(pyreg.param_groups(m, l1=0.05), lr=1e-2, momentum=0.5,
                                                      centered=True),
    "Adam l1_strength": lambda m: pyreg.optim.Adam(pyreg.param_groups(m, l1_strength=0.5,
                                                                       overrides={"*": {"l1_refresh": 3}}), lr=1e-2),
}


@pytest.mark.parametrize("name", list(_FACTORIES))
def test_kept_buckets_give_the_full_gathers_bits(monkeypatch, name):
    with_kept, without, reused = _gather_both(monkeypatch, _FACTORIES[name], lambda k, m, o: None)
    assert _bits_equal(with_kept, without)
    assert reused >= (3 if "strength" in name else 5)  # the steps after the first (l1_strength: but its refreshes)


def _replace_a_buffer(k, model, opt):
    if k == 3:  # a new tensor in the state, as a user resetting a moment would put it
        s = opt.state[model[0].weight]
        s["exp_avg"] = torch.zeros_like(s["exp_avg"])


def _drop_a_grad(k, model, opt):
    if k in (2, 3):
        model[2].weight.grad = None


def _add_a_state_key(k, model, opt):
    if k == 3:
        opt.state[model[0].bias]["max_exp_avg_sq"] = torch.zeros_like(model[0].bias)
        opt.param_groups[1]["amsgrad"] = True


def _drop_state(k, model, opt):
    if k == 3:
        del opt.state[model[2].weight]


def _load_state(k, model, opt):
    if k == 4:
        opt.load_state_dict(opt.state_dict())


def _new_lr(k, model, opt):
    if k >= 2:
        for g in opt.param_groups:
            g["lr"] = 1e-2 / (k + 1)


def _swap_memory(k, model, opt):
    if k == 3:
        model[2].weight.data = model[2].weight.data.clone()


def _amsgrad_on(k, model, opt):
    if k == 3:
        opt.param_groups[0]["amsgrad"] = True


def _new_betas(k, model, opt):
    if k == 3:
        opt.param_groups[0]["betas"] = (0.8, 0.99)


def _differentiable_on(k, model, opt):
    if k == 3:  # torch's own step for the group's params from now on (a setting that no run row holds)
        opt.param_groups[1]["differentiable"] = True


@pytest.mark.parametrize("between", [_replace_a_buffer, _drop_a_grad, _add_a_state_key, _drop_state, _load_state,
                                     _new_lr, _swap_memory, _amsgrad_on, _new_betas, _differentiable_on])
def test_kept_buckets_follow_every_change(monkeypatch, between):
    with_kept, without, reused = _gather_both(monkeypatch, _FACTORIES["AdamW"], between)
    assert _bits_equal(with_kept, without)
    assert reused >= 2


def test_kept_buckets_follow_a_renamed_state_key():
    """A buffer moved to another key is as a missing buffer: the step raises as
    the full gather does (torch's own step would too), never steps with it."""
    m = torch.nn.Linear(4, 3)
    opt = pyreg.optim.AdamW(m.parameters(), lr=1e-2, l1=0.01)
    for _ in range(3):
        m.weight.grad, m.bias.grad = torch.ones_like(m.weight), torch.ones_like(m.bias)
        opt.step()
    s = opt.state[m.weight]
    last = list(s)[-1]
    s["moved"] = s.pop(last)  # the same objects in the same order, under another key
    with pytest.raises(KeyError):
        opt.step()


def test_kept_buckets_follow_a_sparse_grad(monkeypatch):
    """A grad that turns sparse goes to torch's own step (the kernels take
    dense memory), as in the full gather, and back."""
    def sparse(k, model, opt):
        if k in (3, 4):
            model[0].weight.grad = model[0].weight.grad.to_sparse()
    with_kept, without, reused = _gather_both(monkeypatch, _FACTORIES["SGD"], sparse)
    assert _bits_equal(with_kept, without)
    assert reused >= 2


@pytest.mark.parametrize("name", ["AdamW", "SGD momentum"])
def test_kept_buckets_keep_no_grad_alive(name):
    """After a step and zero_grad (set_to_none), a step's grads are freed:
    the kept buckets hold no reference to them (a model's worth of memory)."""
    import gc
    import weakref

    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    opt = _FACTORIES[name](m)
    for _ in range(4):
        opt.zero_grad()
        m(torch.randn(5, 8)).sum().backward()
        refs = [weakref.ref(p.grad) for p in m.parameters()]
        opt.step()
    assert opt._gathered is not None and opt._gathered.hits >= 2
    opt.zero_grad()
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("keys", list(STAGGERED))
@pytest.mark.parametrize("cls", [pyreg.optim.AdamW, pyreg.optim.SGD])
def test_kept_buckets_count_l1_strength_steps_as_python_does(cls, keys, monkeypatch):
    """The steps that keep their buckets count l1_strength's and
    group_strength's steps at C speed (apply.strength_counter) and leave a
    step with a refresh due to Python: over staggered refreshes (a bucket of
    two slices), two refresh periods, a step where one weight has no grad, a
    step GradScaler skips, a state dict loaded in the middle and an lr
    schedule, the counts, the l1 (group_l1) and the weights are those of the
    steps counted in Python only, bit for bit, at every step; and steps were
    counted in C."""
    answers = []
    count_kept = FZ.FusedOptimizer._count_kept
    monkeypatch.setattr(FZ.FusedOptimizer, "_count_kept", lambda self, s: answers.append(count_kept(self, s))
                        or answers[-1])
    runs = []
    for in_c in (True, False):
        if not in_c:
            monkeypatch.setattr(FZ, "strength_counter", lambda *a: None)
        runs.append(_staggered_strength_run(lambda groups: cls(groups, lr=1e-2), skip_at=13, keys=keys))
        if in_c:
            in_c_answers = list(answers)
    assert [[(t, q) for t, q, _ in step] for step in runs[0]] == [[(t, q) for t, q, _ in step] for step in runs[1]]
    assert all(torch.equal(a[2], b[2]) for s0, s1 in zip(*runs) for a, b in zip(s0, s1))
    assert [t for t, _, _ in runs[0][-1]] == [15, 14]  # (one step skipped; the second weight had no grad at one)
    assert len({q for step in runs[0] for _, q, _ in step}) > 4  # refreshed several times
    assert in_c_answers.count(0) >= 3 and 1 in in_c_answers
