"""pyreg's fused optimizers (pyreg.optim.SGD, Adam, AdamW, Adagrad).

* the kernels (every backend) against the float64 spec, torch_ref.optim_step,
  on fresh random data: every algorithm and flag, every dtype, odd sizes,
  empty and 0-dim tensors, dense non-contiguous layouts, misaligned starts,
  more tensors than one CUDA launch takes, GradScaler's scalars; RMSprop (the
  kernels and the spec) also against torch.optim.RMSprop's step;
* the optimizers against torch's: with l1 = l2 = 0 the same values over many
  steps; with l1/l2 torch's step followed by pyreg.prox_ (same zeros);
  preconditioned=True against the prox computed from torch's own state;
  TensorFlow's ProximalAdagrad test values;
* the protocol: state dicts across torch and pyreg, GradScaler, schedulers,
  closures, hooks, pickling, parameters torch's own step takes (sparse and
  complex grads), bad input (an error and nothing changed).
"""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import pyreg
from pyreg import backends, optim
from pyreg._tolerance import tolerance
from pyreg.backends import torch_ref as spec

from conftest import DTYPE_IDS, DTYPES, bits_equal, needs_emu

CLASSES = {"SGD": optim.SGD, "Adam": optim.Adam, "AdamW": optim.AdamW, "Adagrad": optim.Adagrad}
ALGO = {"SGD": spec.SGD, "Adam": spec.ADAM, "AdamW": spec.ADAM, "Adagrad": spec.ADAGRAD}

# Optimizer settings covered for each class (torch's constructor arguments).
CONFIGS = {
    "SGD": [dict(), dict(weight_decay=0.1, maximize=True), dict(momentum=0.9),
            dict(momentum=0.8, dampening=0.3, weight_decay=0.05), dict(momentum=0.9, nesterov=True)],
    "Adam": [dict(), dict(weight_decay=0.1, maximize=True), dict(amsgrad=True, betas=(0.8, 0.95))],
    "AdamW": [dict(weight_decay=0.1), dict(amsgrad=True, weight_decay=0.0, eps=1e-6)],
    "Adagrad": [dict(), dict(lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2),
                dict(maximize=True, eps=1e-6)],
}
CASES = [pytest.param(name, kw, id=f"{name}-{i}") for name, kws in CONFIGS.items() for i, kw in enumerate(kws)]


def shapes_list(dtype, seed, device="cpu", big=False):
    """Dense tensors of every layout the kernels take: odd sizes, empty ones
    (first, middle, last), a 0-dim one, transposed and permuted views, and a
    view starting one element in (not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return [r(0), r(1), r(4097), r(0, 3), r(140001 if big else 20011), r(()), r(61, 37).t(),
            r(5, 6, 7).permute(2, 0, 1), r(3001)[1:], r(5, 0)]


def like(ts, seed, positive=False):
    """Fresh random tensors laid out exactly like ts (grads and state)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        x = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if positive:
            x = x.abs() + 0.01
        out.append(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(x))
    return out


# --------------------------------------------------------------------------
# The kernels against the float64 spec
# --------------------------------------------------------------------------
def rmsprop_state(ps, seed, centered):
    """RMSprop's square_avg and grad_avg (centered; else []) like ps, with
    square_avg >= grad_avg^2 + 0.5 (as a running mean of squares is), so the
    centered variance stays positive."""
    ga = like(ps, seed)
    sq = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
          .copy_(a.double() ** 2 + b.double().abs() + 0.5) for t, a, b in zip(ps, ga, like(ps, seed + 1))]
    return sq, ga if centered else []


def kernel_case(algo, dtype, seed, *, sgd_state="momentum", amsgrad=False, steps_dtype=torch.float32,
                device="cpu", big=False, rms_momentum=False, centered=False):
    """Inputs of one optim_step call: params, grads, state, step counters, two
    groups with their hyperparameter rows."""
    ps = shapes_list(dtype, seed, device, big)
    n = len(ps)
    gs = like(ps, seed + 1)
    s1 = s2 = s3 = []
    fresh = []
    if algo == spec.SGD:
        if sgd_state != "none":
            s1 = like(ps, seed + 2)
            fresh = [int(sgd_state == "fresh" or (sgd_state == "mixed" and i % 2 == 0)) for i in range(n)]
    elif algo == spec.ADAM:
        s1, s2 = like(ps, seed + 2), like(ps, seed + 3, positive=True)
        s3 = like(ps, seed + 4, positive=True) if amsgrad else []
    elif algo == spec.RMSPROP:
        s1, s3 = rmsprop_state(ps, seed + 2, centered)
        s2 = like(ps, seed + 4) if rms_momentum else []
    else:
        s1 = like(ps, seed + 2, positive=True)
    steps = ([] if algo == spec.SGD else
             [torch.tensor(float(i % 4), dtype=steps_dtype, device=device) for i in range(n)])
    group = [i % 2 for i in range(n)]
    # lr, beta1, beta2, eps, weight_decay, momentum, dampening, lr_decay, alpha, l1, l2 (spec.HYPER)
    hyper = torch.tensor([[0.05, 0.9, 0.99, 1e-3, 0.01, 0.9, 0.1, 0.02, 0.99, 0.3, 0.2],
                          [0.02, 0.8, 0.95, 1e-6, 0.0, 0.5, 0.0, 0.0, 0.9, 1.5, 0.0]],
                         dtype=torch.float64, device=device)
    return dict(params=ps, grads=gs, s1=s1, s2=s2, s3=s3, steps=steps, group=group, fresh=fresh, hyper=hyper)


def clone_case(case, dtype=None):
    out = {}
    for k, v in case.items():
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.detach().clone() if dtype is None or k == "steps" else t.detach().to(dtype) for t in v]
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = list(v)
    return out


def run_kernel(be, algo, case, **flags):
    be.optim_step(algo, case["params"], case["grads"], case["s1"], case["s2"], case["s3"], case["steps"],
                  case["group"], case["fresh"], case["hyper"], **flags)


def step_tol(dtype):
    """The optimizer-step tolerance, with an absolute floor of a few ulps of
    1 (state such as a momentum buffer may cancel to near zero)."""
    tol = tolerance("optimizer_step", dtype)
    tol["atol"] = max(tol["atol"], 8 * torch.finfo(dtype).eps)
    return tol


def assert_matches_spec(got, want, dtype, what):
    for k in ("params", "grads", "s1", "s2", "s3"):
        for i, (a, b) in enumerate(zip(got[k], want[k])):
            torch.testing.assert_close(a.cpu(), b.to(dtype).cpu(), **step_tol(dtype),
                                       msg=lambda m: f"{what}: {k}[{i}]: {m}")
    for i, (a, b) in enumerate(zip(got["steps"], want["steps"])):
        assert bits_equal(a.cpu(), b.cpu()), f"{what}: step {i}: {a} != {b}"


def test_hyper_fields_are_the_specs():
    """The compiled module's hyperparameter columns (csrc/common/hyper.h) are
    the spec's, in order; a module with others is refused at load."""
    from pyreg._lib import _C
    from pyreg.backends import compiled

    if _C is None:
        pytest.skip("pyreg._C is not built")
    assert tuple(_C.hyper_fields()) == spec.HYPER
    assert len(spec.HYPER) == 11 and spec.HYPER.index("alpha") == spec.HYPER.index("l1") - 1
    compiled.check_hyper_fields(tuple(_C.hyper_fields()))
    for bad in (None, spec.HYPER[:-1], tuple(reversed(spec.HYPER))):
        with pytest.raises(ImportError, match="hyperparameter columns"):
            compiled.check_hyper_fields(bad)


KERNEL_CASES = [
    pytest.param(spec.SGD, dict(sgd_state="none"), dict(maximize=True), id="sgd"),
    pytest.param(spec.SGD, dict(sgd_state="momentum"), dict(), id="sgd-momentum"),
    pytest.param(spec.SGD, dict(sgd_state="mixed"), dict(nesterov=True), id="sgd-nesterov-fresh"),
    pytest.param(spec.ADAM, dict(), dict(), id="adam"),
    pytest.param(spec.ADAM, dict(amsgrad=True), dict(amsgrad=True, maximize=True), id="adam-amsgrad"),
    pytest.param(spec.ADAM, dict(steps_dtype=torch.float64), dict(decoupled=True), id="adamw-f64-steps"),
    pytest.param(spec.ADAGRAD, dict(), dict(), id="adagrad"),
    pytest.param(spec.ADAGRAD, dict(steps_dtype=torch.float64), dict(maximize=True), id="adagrad-maximize"),
    pytest.param(spec.RMSPROP, dict(), dict(), id="rmsprop"),
    pytest.param(spec.RMSPROP, dict(rms_momentum=True), dict(maximize=True), id="rmsprop-momentum-maximize"),
    pytest.param(spec.RMSPROP, dict(centered=True), dict(centered=True), id="rmsprop-centered"),
    pytest.param(spec.RMSPROP, dict(centered=True, rms_momentum=True, steps_dtype=torch.float64),
                 dict(centered=True, maximize=True), id="rmsprop-centered-momentum-maximize"),
]
PROX_IDS = {spec.NO_PROX: "noprox", spec.PLAIN_PROX: "prox", spec.METRIC_PROX: "metric"}


@pytest.mark.parametrize("prox", list(PROX_IDS), ids=list(PROX_IDS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("algo,make,flags", KERNEL_CASES)
def test_kernel_matches_spec(B, algo, make, flags, dtype, prox):
    case = kernel_case(algo, dtype, seed=11, device=B.dev, **make)
    want = clone_case(case, torch.float64)
    got = clone_case(case)
    all_flags = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=prox)
    all_flags.update(flags)
    spec.optim_step(algo, **want, **all_flags)
    run_kernel(B.be, algo, got, **all_flags)
    assert_matches_spec(got, want, dtype, f"{B.name}")


def misaligned_copy(t):
    """t's values in a view of t's layout that starts one element into its
    buffer (not 16-byte aligned, whatever the dtype)."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
    buf = torch.empty(span + 1, dtype=t.dtype, device=t.device)
    return buf.as_strided(t.shape, t.stride(), 1).copy_(t)


@pytest.mark.parametrize("array", ["params", "grads", "s1", "s2", "s3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("algo,make,flags", KERNEL_CASES)
def test_kernel_one_array_misaligned(B, algo, make, flags, dtype, array):
    """One array (params, grads or one state buffer) misaligned while the
    others are aligned: the kernels' 16-byte path must see it and take the
    scalar one (a GPU faults on a misaligned vector access; the emulator stops)."""
    case = kernel_case(algo, dtype, seed=13, device=B.dev, **make)
    if not case[array]:
        pytest.skip(f"{array} is not used by this algorithm")
    case[array] = [misaligned_copy(t) for t in case[array]]
    want = clone_case(case, torch.float64)
    got = clone_case(case)
    got[array] = [misaligned_copy(t) for t in case[array]]
    all_flags = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=spec.PLAIN_PROX)
    all_flags.update(flags)
    spec.optim_step(algo, **want, **all_flags)
    run_kernel(B.be, algo, got, **all_flags)
    assert_matches_spec(got, want, dtype, f"{B.name}, {array} misaligned")


@pytest.mark.parametrize("algo,make,flags", KERNEL_CASES)
def test_kernel_grad_scale_and_found_inf(B, algo, make, flags):
    """GradScaler's scalars: grads divided by grad_scale (and stored so); with
    found_inf != 0 nothing changes, step counters included."""
    dtype = torch.float32
    base = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=spec.PLAIN_PROX)
    base.update(flags)
    case = kernel_case(algo, dtype, seed=5, device=B.dev, **make)
    scale = torch.tensor(4.0, device=B.dev)
    got, want = clone_case(case), clone_case(case, torch.float64)
    run_kernel(B.be, algo, got, **base, grad_scale=scale, found_inf=torch.tensor(0.0, device=B.dev))
    spec.optim_step(algo, **want, **base, grad_scale=scale, found_inf=torch.tensor(0.0, device=B.dev))
    assert_matches_spec(got, want, dtype, "grad_scale")
    for a, b in zip(got["grads"], case["grads"]):
        torch.testing.assert_close(a, b / 4)
    skipped = clone_case(case)
    run_kernel(B.be, algo, skipped, **base, grad_scale=scale, found_inf=torch.tensor(1.0, device=B.dev))
    for k in ("params", "grads", "s1", "s2", "s3", "steps"):
        for a, b in zip(skipped[k], case[k]):
            assert bits_equal(a, b), k


@pytest.mark.parametrize("n", [47, 48, 49, 97])
def test_kernel_many_tensors(B, n):
    """More tensors than one CUDA launch describes (48), some empty, in two groups."""
    g = torch.Generator().manual_seed(n)
    ps = [torch.randn(int(torch.randint(0, 300, (), generator=g)), generator=g, dtype=torch.float64).float()
          .to(B.dev) for _ in range(n)]
    case = dict(params=ps, grads=like(ps, 1), s1=like(ps, 2), s2=like(ps, 3, positive=True), s3=[],
                steps=[torch.tensor(float(i % 3), device=B.dev) for i in range(n)], group=[i % 2 for i in range(n)],
                fresh=[], hyper=kernel_case(spec.ADAM, torch.float32, 0, device=B.dev)["hyper"])
    flags = dict(decoupled=True, amsgrad=False, maximize=False, nesterov=False, prox=spec.METRIC_PROX)
    got, want = clone_case(case), clone_case(case, torch.float64)
    run_kernel(B.be, spec.ADAM, got, **flags)
    spec.optim_step(spec.ADAM, **want, **flags)
    assert_matches_spec(got, want, torch.float32, f"{n} tensors")


@pytest.mark.parametrize("algo", [spec.SGD, spec.ADAM, spec.ADAGRAD, spec.RMSPROP],
                         ids=["sgd", "adam", "adagrad", "rmsprop"])
def test_kernel_same_bits_any_thread_count(algo, restore_threads):
    cpu = backends.get("cpu")
    rms = algo == spec.RMSPROP
    flags = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=spec.METRIC_PROX,
                 centered=rms)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        case = kernel_case(algo, torch.float32, seed=3, big=True, rms_momentum=rms, centered=rms)
        run_kernel(cpu, algo, case, **flags)
        outs.append(case)
    for other in outs[1:]:
        for k in ("params", "s1", "s2", "s3"):
            for a, b in zip(outs[0][k], other[k]):
                assert bits_equal(a, b)


@pytest.mark.parametrize("algo", [spec.ADAM, spec.ADAGRAD, spec.RMSPROP], ids=["adam", "adagrad", "rmsprop"])
def test_kernel_counts_each_step_once(B, algo):
    """The step counters go up by one per call, however many blocks a launch
    has (a CUDA launch's last block counts them), in batches with and without
    elements; the ticket an optimizer keeps is zero again after each call,
    and a skipped step (found_inf) leaves both as they were."""
    g = torch.Generator().manual_seed(algo)
    sizes = [0, 3, 70_001, 0, 1, 200_003] + [0] * 90 + [5]  # CUDA: 3 launch batches (48 tensors each), one of empties
    ps = [torch.randn(n, generator=g).to(B.dev) for n in sizes]
    s1 = like(ps, 2, positive=True)
    s2 = like(ps, 3, positive=True) if algo == spec.ADAM else []
    case = dict(params=ps, grads=like(ps, 1), s1=s1, s2=s2, s3=[],
                steps=[torch.tensor(float(i % 5), device=B.dev) for i in range(len(ps))],
                group=[0] * len(ps), fresh=[], hyper=kernel_case(algo, torch.float32, 0, device=B.dev)["hyper"])
    flags = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=spec.PLAIN_PROX)
    ticket = torch.zeros(1, dtype=torch.int32, device=B.dev)
    start = [float(t) for t in case["steps"]]
    for k in range(1, 4):
        B.be.optim_step(algo, *(case[x] for x in ("params", "grads", "s1", "s2", "s3", "steps", "group", "fresh",
                                                    "hyper")), **flags, ticket=ticket)
        assert [float(t) for t in case["steps"]] == [s + k for s in start]
        assert int(ticket) == 0
    B.be.optim_step(algo, *(case[x] for x in ("params", "grads", "s1", "s2", "s3", "steps", "group", "fresh",
                                                "hyper")), **flags, ticket=ticket,
                    found_inf=torch.tensor(1.0, device=B.dev), grad_scale=torch.tensor(2.0, device=B.dev))
    assert [float(t) for t in case["steps"]] == [s + 3 for s in start]
    assert int(ticket) == 0


def test_optimizer_keeps_one_ticket_per_device():
    m = nn.Linear(4, 3)
    opt = optim.AdamW(m.parameters(), lr=1e-2, l1=1e-3)
    for _ in range(3):
        m(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert list(opt._tickets) == [torch.device("cpu")] and int(opt._tickets[torch.device("cpu")]) == 0


def test_kernel_nan_and_inf_propagate(B):
    """NaN and Inf in grads reach the params and state as in the spec."""
    ps = [torch.tensor([1.0, -2.0, 3.0, 0.5], device=B.dev)]
    case = dict(params=ps, grads=[torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=B.dev)],
                s1=[torch.zeros(4, device=B.dev)], s2=[torch.zeros(4, device=B.dev)],
                s3=[torch.tensor([0.0, float("nan"), 0.0, 0.0], device=B.dev)],
                steps=[torch.tensor(0.0, device=B.dev)], group=[0], fresh=[],
                hyper=kernel_case(spec.ADAM, torch.float32, 0, device=B.dev)["hyper"])
    flags = dict(decoupled=False, amsgrad=True, maximize=False, nesterov=False, prox=spec.PLAIN_PROX)
    got, want = clone_case(case), clone_case(case, torch.float64)
    run_kernel(B.be, spec.ADAM, got, **flags)
    spec.optim_step(spec.ADAM, **want, **flags)
    for k in ("params", "s1", "s2", "s3"):
        torch.testing.assert_close(got[k][0], want[k][0].float(), equal_nan=True, msg=k)


@pytest.mark.parametrize("algo", [spec.ADAGRAD, spec.RMSPROP], ids=["adagrad", "rmsprop"])
def test_kernel_nan_and_inf_propagate_adagrad_rmsprop(B, algo):
    """As above, for Adagrad and centered RMSprop with momentum."""
    ps = [torch.tensor([1.0, -2.0, 3.0, 0.5, 0.25], device=B.dev)]
    grads = [torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 0.0], device=B.dev)]
    rms = algo == spec.RMSPROP
    case = dict(params=ps, grads=grads, s1=[torch.tensor([0.0, 0.0, 0.0, float("inf"), 1.0], device=B.dev)],
                s2=[torch.zeros(5, device=B.dev)] if rms else [],
                s3=[torch.tensor([0.0, 0.0, 0.0, 0.0, float("nan")], device=B.dev)] if rms else [],
                steps=[torch.tensor(0.0, device=B.dev)], group=[0], fresh=[],
                hyper=kernel_case(algo, torch.float32, 0, device=B.dev)["hyper"])
    flags = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=spec.PLAIN_PROX,
                 centered=rms)
    got, want = clone_case(case), clone_case(case, torch.float64)
    run_kernel(B.be, algo, got, **flags)
    spec.optim_step(algo, **want, **flags)
    for k in ("params", "s1", "s2", "s3"):
        for a, b in zip(got[k], want[k]):
            torch.testing.assert_close(a, b.float(), equal_nan=True, msg=k)


# Settings of torch.optim.RMSprop covered against the spec and the kernels.
RMSPROP_CONFIGS = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(weight_decay=0.1, maximize=True), id="wd-maximize"),
    pytest.param(dict(momentum=0.9, alpha=0.9), id="momentum"),
    pytest.param(dict(centered=True, eps=1e-6), id="centered"),
    pytest.param(dict(centered=True, momentum=0.5, weight_decay=0.05, maximize=True), id="centered-momentum"),
]


def rmsprop_steps(run, ps, steps, dtype, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, maximize=False, device="cpu"):
    """``steps`` RMSprop steps through run(algo, case, flags) (an optim_step)
    on copies of ps with the grads of train(); returns (params, state by torch's keys)."""
    params = [p.clone().to(device) for p in ps]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    sq, buf, ga = zeros(), zeros() if momentum > 0 else [], zeros() if centered else []
    counters = [torch.tensor(0.0, device=device) for _ in params]
    # lr, beta1, beta2, eps, weight_decay, momentum, dampening, lr_decay, alpha, l1, l2
    hyper = torch.tensor([[lr, 0.0, 0.0, eps, weight_decay, momentum, 0.0, 0.0, alpha, 0.0, 0.0]],
                         dtype=torch.float64, device=device)
    flags = dict(decoupled=False, amsgrad=False, maximize=maximize, nesterov=False, prox=spec.NO_PROX,
                 centered=centered)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = []
        for p in params:
            gr = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            grads.append((gr.t().contiguous().t() if not p.is_contiguous() else gr).to(device))
        run(spec.RMSPROP, dict(params=params, grads=grads, s1=sq, s2=buf, s3=ga, steps=counters,
                               group=[0] * len(params), fresh=[], hyper=hyper), flags)
    state = [dict(step=c, square_avg=s, **({"momentum_buffer": buf[i]} if buf else {}),
                  **({"grad_avg": ga[i]} if ga else {})) for i, (c, s) in enumerate(zip(counters, sq))]
    return params, state


def test_spec_rmsprop_equals_torch_rmsprop():
    """The spec's RMSprop (l1 = l2 = 0) is torch.optim.RMSprop's single-tensor
    step, in float64, state included."""
    for p in RMSPROP_CONFIGS:
        kw = p.values[0]
        ps = model_params(torch.float64)
        want, topt = train(torch.optim.RMSprop, ps, 5, lr=0.01, foreach=False, **kw)
        got, state = rmsprop_steps(lambda a, c, f: spec.optim_step(a, **c, **f), ps, 5, torch.float64, **kw)
        for a, b, st in zip(got, want, state):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
            tst = topt.state[b]
            assert sorted(tst) == sorted(st), p.id
            for k in tst:
                torch.testing.assert_close(torch.as_tensor(st[k]).double(), torch.as_tensor(tst[k]).double(),
                                           rtol=1e-12, atol=1e-12, msg=lambda m: f"{p.id} {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kw", RMSPROP_CONFIGS)
def test_kernel_rmsprop_equals_torch_rmsprop(B, kw, dtype):
    """The kernels' RMSprop over 15 steps against torch.optim.RMSprop."""
    ps = model_params(dtype)
    want, _ = train(torch.optim.RMSprop, ps, 15, lr=0.01, foreach=False, **kw)
    got, _ = rmsprop_steps(lambda a, c, f: run_kernel(B.be, a, c, **f), ps, 15, dtype, device=B.dev, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.detach(), **tol)


# --------------------------------------------------------------------------
# The optimizers against torch's
# --------------------------------------------------------------------------
def model_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (100,), (), (0, 3), (7, 9)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    ps.append(torch.randn(9, 7, generator=g, dtype=torch.float64).to(dtype).t())  # transposed
    return ps


def train(opt_cls, ps, steps, seed=1, closure=False, **kw):
    """Runs ``steps`` steps of opt_cls on parameters copied from ps, with the
    same fresh random grads for every optimizer; returns (params, optimizer)."""
    params = [nn.Parameter(p.clone()) for p in ps]
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if not p.is_contiguous():
                p.grad = p.grad.t().contiguous().t()  # laid out like its param, as autograd does
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kw", CASES)
def test_equals_torch_without_regularization(name, kw, dtype, backend):
    ps = model_params(dtype)
    want, topt = train(getattr(torch.optim, name), ps, 15, lr=0.01, **kw)
    with pyreg.use_backend(backend):
        got, popt = train(CLASSES[name], ps, 15, lr=0.01, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
    for p, q in zip(got, want):  # the same state, under torch's keys
        sp, sq = popt.state[p], topt.state[q]
        assert sorted(sp) == sorted(sq)
        for k in sq:
            torch.testing.assert_close(torch.as_tensor(sp[k]).float(), torch.as_tensor(sq[k]).float(), **tol)


class _ThenProx:
    """A torch optimizer followed by pyreg.prox_ with each group's lr: what the
    fused optimizers compute with l1/l2 (Regularized's proximal mode)."""

    def __init__(self, cls, l1, l2):
        self.cls, self.l1, self.l2 = cls, l1, l2

    def __call__(self, params, **kw):
        inner = self.cls(params, **kw)
        l1, l2 = self.l1, self.l2

        class Opt:
            state = inner.state

            def step(self):
                inner.step()
                with torch.no_grad():
                    for group in inner.param_groups:
                        pyreg.prox_([p for p in group["params"] if p.grad is not None], l1, l2, group["lr"])
        return Opt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kw", CASES)
def test_equals_torch_then_prox(name, kw, dtype):
    ps = model_params(dtype)
    l1, l2 = 0.3, 0.2
    want, _ = train(_ThenProx(getattr(torch.optim, name), l1, l2), ps, 10, lr=0.05, **kw)
    got, _ = train(CLASSES[name], ps, 10, lr=0.05, l1=l1, l2=l2, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    zeros = 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        assert torch.equal(a == 0, b == 0), "the zero pattern differs"
        zeros += int((a == 0).sum())
    assert zeros > 0  # the l1 term did make exact zeros


def _metric_prox_reference(name, kw, ps, steps, l1, l2, lr=0.05):
    """preconditioned=True computed from torch's own optimizer: after each torch
    step, the prox with each element's step size lr_e = lr / (sqrt(v_hat) + eps)
    (Adam) or clr / (sqrt(sum) + eps) (Adagrad), read from torch's state."""
    params = [nn.Parameter(p.clone().double()) for p in ps]
    opt = getattr(torch.optim, name)(params, lr=lr, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        with torch.no_grad():
            for p in params:
                st = opt.state[p]
                group = opt.param_groups[0]
                step = float(st["step"])
                if name == "Adagrad":
                    clr = lr / (1 + (step - 1) * group["lr_decay"])
                    lr_e = clr / (st["sum"].sqrt() + group["eps"])
                else:
                    beta2 = group["betas"][1]
                    v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
                    lr_e = lr / (v.sqrt() / (1 - beta2 ** step) ** 0.5 + group["eps"])
                t = lr_e * l1
                p.copy_(torch.where(p.abs() <= t, 0.0, torch.sign(p) * (p.abs() - t) / (1 + 2 * lr_e * l2)))
    return params


@pytest.mark.parametrize("name,kw", [c for c in CASES if c.values[0] != "SGD"])
def test_preconditioned_is_the_prox_in_the_optimizers_metric(name, kw):
    ps = model_params(torch.float64)
    want = _metric_prox_reference(name, kw, ps, 8, l1=0.2, l2=0.1)
    got, _ = train(CLASSES[name], ps, 8, lr=0.05, l1=0.2, l2=0.1, preconditioned=True, **kw)
    zeros = 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
        assert torch.equal(a == 0, b == 0)
        zeros += int((a == 0).sum())
    assert zeros > 0


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "metric"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_every_dtype_against_the_spec(name, preconditioned, dtype, backend):
    """The whole optimizer in every dtype, against its float64 spec run on the
    same inputs each step (16-bit training drifts apart from float64 training,
    so each step starts from the kernel's own result)."""
    ps = model_params(dtype, seed=4)
    params = [nn.Parameter(p.clone()) for p in ps]
    kw = dict(momentum=0.9) if name == "SGD" else dict(weight_decay=0.01)
    opt = CLASSES[name](params, lr=0.05, l1=0.1, l2=0.05, preconditioned=preconditioned, **kw)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            if not p.is_contiguous():
                p.grad = p.grad.t().contiguous().t()
        before = {id(p): (p.detach().double().clone(), {k: v.double().clone() for k, v in opt.state[p].items()})
                  for p in params}
        with pyreg.use_backend(backend):
            opt.step()
        ref = [nn.Parameter(before[id(p)][0].clone()) for p in params]
        ropt = CLASSES[name](ref, lr=0.05, l1=0.1, l2=0.05, preconditioned=preconditioned, **kw)
        for r, p in zip(ref, params):
            r.grad = p.grad.double()
            if before[id(p)][1]:
                ropt.state[r] = {k: v.clone() for k, v in before[id(p)][1].items()}
        with pyreg.use_backend("torch"):
            ropt.step()
        for r, p in zip(ref, params):
            torch.testing.assert_close(p.detach(), r.detach().to(dtype), **tolerance("optimizer_step", dtype))


# ---- TensorFlow's ProximalAdagrad test values (tensorflow/python/training/proximal_adagrad_test.py)
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emu", marks=needs_emu), "torch"])
@pytest.mark.parametrize("v0,v1,l1,l2_tf,steps,want0,want1", [
    ([0.0, 0.0], [0.0, 0.0], 0.0, 0.0, 3, [-2.60260963, -4.29698515], [-0.28432083, -0.56694895]),
    ([1.0, 2.0], [4.0, 3.0], 0.0, 0.0, 3, [-1.60261, -2.296985], [3.715679, 2.433051]),
    ([1.0, 2.0], [4.0, 3.0], 0.001, 0.0, 10, [-6.663634, -9.190331], [2.959304, 1.029232]),
    ([1.0, 2.0], [4.0, 3.0], 0.001, 2.0, 10, [-0.0495, -0.0995], [-0.0045, -0.0095]),
], ids=["no-reg-from-0", "no-reg", "l1", "l1-l2"])
def test_tensorflow_proximal_adagrad_values(v0, v1, l1, l2_tf, steps, want0, want1, backend):
    p0, p1 = nn.Parameter(torch.tensor(v0)), nn.Parameter(torch.tensor(v1))
    # TF's ProximalAdagrad: lr 3, accumulators from 0.1, no epsilon; its l2
    # divides by 1 + lr_e * l2, pyreg's by 1 + 2 * lr_e * l2.
    opt = optim.Adagrad([p0, p1], lr=3.0, initial_accumulator_value=0.1, eps=0.0, l1=l1, l2=l2_tf / 2,
                        preconditioned=True)
    with pyreg.use_backend(backend):
        for _ in range(steps):
            p0.grad, p1.grad = torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.02])
            opt.step()
    # TF's assertAllClose tolerance
    torch.testing.assert_close(p0.detach(), torch.tensor(want0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p1.detach(), torch.tensor(want1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# The optimizer protocol
# --------------------------------------------------------------------------
def test_regularized_is_the_same_class():
    assert optim.Regularized is pyreg.Regularized
    for name, cls in CLASSES.items():
        assert issubclass(cls, getattr(torch.optim, name))


@pytest.mark.parametrize("name,kw", CASES)
def test_state_dicts_load_across_torch_and_pyreg(name, kw):
    """A checkpoint of torch's optimizer continues in pyreg's, and the other
    way round, as if training had not been interrupted."""
    ps = model_params()
    full, _ = train(getattr(torch.optim, name), ps, 10, lr=0.01, **kw)

    def resume(first, second):
        params = [nn.Parameter(p.clone()) for p in ps]
        g = torch.Generator().manual_seed(1)
        opt = first(params, lr=0.01, **kw)
        for i in range(10):
            if i == 5:
                sd = copy.deepcopy(opt.state_dict())
                opt = second(params, lr=0.01, **kw)
                opt.load_state_dict(sd)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
                if not p.is_contiguous():
                    p.grad = p.grad.t().contiguous().t()
            opt.step()
        return params

    for first, second in ((getattr(torch.optim, name), CLASSES[name]), (CLASSES[name], getattr(torch.optim, name))):
        got = resume(first, second)
        for a, b in zip(got, full):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_state_dict_keeps_pyreg_keys_and_loads_torch_ones():
    p = nn.Parameter(torch.randn(4))
    opt = optim.AdamW([p], lr=0.1, l1=0.01, preconditioned=True)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["l1"] == 0.01 and sd["param_groups"][0]["preconditioned"] is True
    fresh = optim.AdamW([p], lr=0.1, l1=0.5)
    fresh.load_state_dict(torch.optim.AdamW([p], lr=0.1).state_dict())  # torch's: no pyreg keys
    assert fresh.param_groups[0]["l1"] == 0.5 and fresh.param_groups[0]["preconditioned"] is False


@pytest.mark.parametrize("family", ["pyreg.optim", "Regularized"])
def test_a_torch_checkpoint_keeps_each_groups_pyreg_keys(family):
    """A group's own keys (here target_sparsity and group_l1) survive loading a checkpoint of torch's optimizer,
    which holds none of them (they vanished: the run went on unregularized, silently)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    t = torch.optim.AdamW(m.parameters(), lr=0.01)
    m(torch.randn(4, 16)).sum().backward()
    t.step()
    groups = [{"params": [m[0].weight], "target_sparsity": 0.9}, {"params": [m[1].weight], "group_l1": 0.5},
              {"params": [m[0].bias, m[1].bias]}]
    opt = optim.AdamW(groups, lr=0.01) if family == "pyreg.optim" else pyreg.Regularized(torch.optim.AdamW(groups,
                                                                                                          lr=0.01))
    ck = torch.optim.AdamW([{"params": [m[0].weight]}, {"params": [m[1].weight]}, {"params": [m[0].bias, m[1].bias]}],
                           lr=0.01).state_dict()
    opt.load_state_dict(ck)
    assert opt.param_groups[0]["target_sparsity"] == 0.9 and opt.param_groups[1]["group_l1"] == 0.5
    m(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert float((m[0].weight == 0).float().mean()) == pytest.approx(0.9, abs=1 / 128)


_OWN_KEYS = {"l2_bound_lambda": {"l2_bound": 0.5}, "l2_bound_kappa": {"l2_bound": 0.5},
             "l2_bound_step": {"l2_bound": 0.5}, "target_l1": {"target_sparsity": 0.5},
             "strength_l1": {"l1_strength": 0.5, "l1_refresh": 2},
             "strength_group_l1": {"group_strength": 0.5, "l1_refresh": 2},
             "strength_step": {"l1_strength": 0.5, "l1_refresh": 2}}


@pytest.mark.parametrize("family", ["pyreg.optim", "Regularized"])
@pytest.mark.parametrize("entry, bad", [("l2_bound_lambda", torch.zeros(2)), ("l2_bound_lambda", "x"),
                                        ("l2_bound_lambda", float("nan")), ("l2_bound_lambda", -1.0),
                                        ("l2_bound_kappa", -1.0), ("l2_bound_kappa", float("-inf")),
                                        ("l2_bound_step", -1), ("l2_bound_step", torch.tensor(1.5)),
                                        ("target_l1", -0.5), ("strength_l1", -1.0), ("strength_l1", float("inf")),
                                        ("strength_group_l1", -1.0), ("strength_step", "x"),
                                        ("strength_step", -2), ("strength_step", 2.5)])
def test_a_bad_own_state_entry_is_refused_before_anything_is_loaded(family, entry, bad):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    groups = [{"params": [w], **_OWN_KEYS[entry]}]
    opt = optim.Adam(groups, lr=0.1) if family == "pyreg.optim" else pyreg.Regularized(torch.optim.Adam(groups, lr=0.1))
    for _ in range(3):
        w.grad = torch.randn(4, 4)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert entry in sd["state"][0]
    before = copy.deepcopy(opt.state_dict())
    sd["state"][0][entry] = bad
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises((ValueError, TypeError), match=rf"state_dict\['state'\]\[0\]\['{entry}'\]"):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)  # nothing loaded: groups and state as they were


@pytest.mark.parametrize("family", ["pyreg.optim", "Regularized"])
@pytest.mark.parametrize("missing", ["l2_bound_lambda", "l2_bound_kappa", "l2_bound_step"])
def test_an_l2_bound_state_without_one_of_its_entries_is_refused(family, missing):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    groups = [{"params": [w], "l2_bound": "warm_start", "l2_warmup": 2}]
    opt = optim.Adam(groups, lr=0.1) if family == "pyreg.optim" else pyreg.Regularized(torch.optim.Adam(groups, lr=0.1))
    for _ in range(4):
        w.grad = torch.randn(4, 4)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    del sd["state"][0][missing]
    with pytest.raises(ValueError, match=rf"without {missing}.*nothing was loaded"):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW, optim.Adagrad, optim.RMSprop])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 2.5, torch.full((7, 5), 3.0), torch.tensor(2 + 1j),
                                 "x"])
def test_a_bad_step_counter_in_a_loaded_state_is_refused_by_the_fused_optimizers(cls, bad):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    opt = cls([{"params": [w], "l1": 0.01}], lr=0.1)
    for _ in range(3):
        w.grad = torch.randn(4, 4)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = bad
    with pytest.raises((ValueError, TypeError), match=r"state_dict\['state'\]\[0\]\['step'\]"):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)
    sd["state"][0]["step"] = torch.tensor(3.0)  # (a good one loads)
    opt.load_state_dict(sd)


@pytest.mark.parametrize("family", ["pyreg.optim", "Regularized"])
def test_a_checkpoint_within_the_l2_bound_warm_up_resumes_as_the_run_goes_on(family):
    def make(w):
        groups = [{"params": [w], "l2_bound": "warm_start", "l2_warmup": 5}]
        return (optim.Adam(groups, lr=0.1) if family == "pyreg.optim"
                else pyreg.Regularized(torch.optim.Adam(groups, lr=0.1)))

    torch.manual_seed(0)
    grads = [torch.randn(4, 4) for _ in range(10)]
    w = nn.Parameter(torch.randn(4, 4))
    w2 = nn.Parameter(w.detach().clone())
    opt = make(w)
    for g in grads[:3]:
        w.grad = g.clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert math.isinf(float(sd["state"][0]["l2_bound_kappa"]))  # (within the warm-up: no bound yet)
    w2.data.copy_(w.detach())
    resumed = make(w2)
    resumed.load_state_dict(sd)
    for g in grads[3:]:
        w.grad, w2.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(w, w2) and float(opt.state[w]["l2_bound_lambda"]) > 0  # the bound set and acting
    assert torch.equal(opt.state[w]["l2_bound_kappa"], resumed.state[w2]["l2_bound_kappa"])


@pytest.mark.parametrize("name", list(CLASSES))
def test_pickle_and_deepcopy(name):
    params = [nn.Parameter(torch.randn(5, 3))]
    opt = CLASSES[name](params, lr=0.1, l1=0.01)
    params[0].grad = torch.randn(5, 3)
    opt.step()
    for other in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert other.param_groups[0]["l1"] == 0.01
        q = other.param_groups[0]["params"][0]
        q.grad = torch.ones(5, 3)
        other.step()  # a usable optimizer


@pytest.mark.parametrize("form", ["class", "functional"])
def test_a_skipped_first_step_makes_no_momentum_buffer(form):
    """SGD's momentum buffer starts as the grad at its first step: where GradScaler skips that step,
    no buffer is left (a zero one would be taken for history: with dampening, the next steps differed
    from torch's)."""
    w0, grads = torch.tensor([1.0, -2.0, 3.0]), [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0])]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ref = nn.Parameter(w0.clone())
    topt = torch.optim.SGD([ref], **kw)
    for g in grads:
        ref.grad = g.clone()
        topt.step()
    w = nn.Parameter(w0.clone())
    if form == "class":
        opt = optim.SGD([w], **kw)
        opt.found_inf, opt.grad_scale = torch.ones(()), torch.ones(())  # (as GradScaler sets them)
        w.grad = torch.full((3,), float("inf"))
        opt.step()
        assert w not in opt.state and torch.equal(w.detach(), w0)
        del opt.found_inf, opt.grad_scale
        for g in grads:
            w.grad = g.clone()
            opt.step()
    else:
        bufs = [None]
        optim.functional.sgd([w.detach()], [torch.full((3,), float("inf"))], bufs, found_inf=torch.ones(()), **kw)
        assert bufs == [None] and torch.equal(w.detach(), w0)
        for g in grads:
            optim.functional.sgd([w.detach()], [g.clone()], bufs, **kw)
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CLASSES))
def test_grad_scaler(name):
    """GradScaler hands the fused step grad_scale and found_inf: an overflow
    skips the step (nothing changes) and a finite step equals unscaled training."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ref = copy.deepcopy(model)
    opt = CLASSES[name](model.parameters(), lr=0.1, l1=0.01)
    ropt = _ThenProx(getattr(torch.optim, name), 0.01, 0.0)(list(ref.parameters()), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 6)
    for i in range(3):
        opt.zero_grad()
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if i == 1:  # an overflow: the step is skipped
            model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt.state_dict()["state"])
        scaler.step(opt)
        scaler.update()
        if i == 1:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            for k, st in opt.state_dict()["state"].items():
                for key, v in st.items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(state[k][key])), key
            continue
        for p in ref.parameters():
            p.grad = None
        ref(x).square().mean().backward()
        ropt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() < 1024.0


def test_load_state_dict_hooks_see_and_set_pyregs_keys():
    """Load pre-hooks run first, once, and what they return is what is checked and loaded (pyreg's
    keys included); post-hooks run once, last, on the groups as loaded."""
    w = nn.Parameter(torch.randn(4))
    torch_sd = torch.optim.AdamW([nn.Parameter(w.detach().clone())], lr=0.1).state_dict()  # no pyreg keys
    opt = optim.AdamW([w], lr=0.1)
    calls = []

    def pre(o, sd):
        calls.append("pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0].update(l1=0.005, lr=0.123)
        return sd

    def post(o):
        calls.append(("post", o.param_groups[0]["l1"], o.param_groups[0]["lr"]))

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(torch_sd)
    assert calls == ["pre", ("post", 0.005, 0.123)]
    assert opt.param_groups[0]["l1"] == 0.005 and opt.param_groups[0]["lr"] == 0.123
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["l1"] = None  # a hook that mends it: loaded
    fresh = optim.AdamW([w], lr=0.1)
    fresh.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "param_groups": [
        dict(sd["param_groups"][0], l1=1e-3)]})
    fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["l1"] == 1e-3
    with pytest.raises(TypeError, match="l1"):  # without it: refused
        optim.AdamW([w], lr=0.1).load_state_dict(bad)


def test_scheduler_closure_and_hooks():
    params = [nn.Parameter(torch.randn(5))]
    opt = optim.SGD(params, lr=1.0, l1=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append("post"))
    try:
        before = params[0].detach().clone()

        def closure():
            calls.append("closure")
            params[0].grad = torch.ones(5)
            return torch.tensor(3.0)

        assert opt.step(closure).item() == 3.0
        sched.step()  # lr 0.5 from now on
        opt.step(closure)
    finally:
        h1.remove()
        h2.remove()
    assert calls == ["pre", "closure", "post", "pre", "closure", "post"]
    torch.testing.assert_close(params[0].detach(), before - 1.5)


def test_lr_and_coefficient_changes_take_effect():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 0.05]))
    opt = optim.SGD([p], lr=0.1, l1=0.0)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -1.0, 0.05]))
    opt.param_groups[0]["l1"] = 1.0  # threshold lr * l1 = 0.1
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -0.9, 0.0]))
    opt.param_groups[0]["lr"] = 0.5
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.4, -0.4, 0.0]))


def test_tensor_lr_on_the_cpu():
    p = nn.Parameter(torch.tensor([1.0, -1.0]))
    lr = torch.tensor(0.1)
    opt = optim.Adam([p], lr=lr, l1=0.0)
    ref = nn.Parameter(p.detach().clone())
    ropt = torch.optim.Adam([ref], lr=0.1)
    for value in (0.1, 0.05):
        lr.fill_(value)
        ropt.param_groups[0]["lr"] = value
        p.grad, ref.grad = torch.tensor([0.3, -0.2]), torch.tensor([0.3, -0.2])
        opt.step()
        ropt.step()
        torch.testing.assert_close(p.detach(), ref.detach())


def test_params_without_grads_and_added_groups():
    a, b, c = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    opt = optim.Adagrad([a, b], lr=0.1, l1=0.01)
    a.grad = torch.ones(3)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before)
    opt.add_param_group({"params": [c], "l1": 0.5})
    assert opt.param_groups[1]["l2"] == 0.0 and opt.param_groups[1]["preconditioned"] is False
    c.grad = torch.ones(2)
    opt.step()  # state for c is created as torch's Adagrad creates it
    assert float(opt.state[c]["step"]) == 1.0


def test_sparse_grads_take_torchs_step():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    ref = copy.deepcopy(emb)
    opt, ropt = optim.SGD(emb.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    idx = torch.tensor([1, 3, 3])
    for m, o in ((emb, opt), (ref, ropt)):
        m(idx).sum().backward()
        o.step()
    torch.testing.assert_close(emb.weight, ref.weight)
    # with l1, torch's step then pyreg.prox_
    opt2 = optim.SGD(emb.parameters(), lr=0.5, l1=0.2)
    opt2.zero_grad()
    emb(idx).sum().backward()
    w = emb.weight.detach().clone()
    opt2.step()
    expect = w - 0.5 * emb.weight.grad.to_dense()
    expect = torch.sign(expect) * (expect.abs() - 0.1).clamp_min(0)
    torch.testing.assert_close(emb.weight.detach(), expect)


def test_complex_params_take_torchs_step():
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    q = nn.Parameter(p.detach().clone())
    opt, ropt = optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for _ in range(3):
        p.grad = q.grad = torch.randn(4, dtype=torch.complex64)
        opt.step()
        ropt.step()
    torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match="complex"):  # every step would refuse it: refused when given
        optim.Adam([p], lr=0.1, l1=0.1)
    opt.param_groups[0]["l1"] = 0.1  # or set later: the step refuses it, changing nothing
    p.grad = torch.randn(4, dtype=torch.complex64)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_torch_step_under_grad_scale(monkeypatch):
    """Parameters that take torch's own step under GradScaler's scalars: their
    grads end unscaled (as the kernels leave theirs); if torch's step raises,
    the grads and the optimizer's attributes are as they were."""
    from pyreg.optim import fused
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    q = nn.Parameter(p.detach().clone())
    opt, ropt = optim.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    g0 = torch.randn(4, dtype=torch.complex64)
    p.grad, q.grad = g0 * 4, g0.clone()
    grad, before = p.grad, p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)

    def failing(base):
        def step(self):
            raise RuntimeError("torch's step failed")
        return step

    with monkeypatch.context() as m:
        m.setattr(fused, "raw_step", failing)
        with pytest.raises(RuntimeError, match="torch's step failed"):
            opt.step()
    assert p.grad is grad and torch.equal(grad, g0 * 4) and torch.equal(p.detach(), before)
    assert opt.grad_scale.item() == 4.0 and opt.found_inf.item() == 0.0
    opt.step()
    ropt.step()
    assert p.grad is grad
    torch.testing.assert_close(grad, g0)
    torch.testing.assert_close(p, q)
    del opt.grad_scale, opt.found_inf  # (as GradScaler does after its step: they were given back)
    p.grad = q.grad = g0.clone()
    opt.step()  # none given: none set
    ropt.step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    torch.testing.assert_close(p, q)


def test_grads_laid_out_unlike_their_params():
    """A grad with other strides than its param goes through the spec: the same result."""
    ps = model_params()
    want, _ = train(torch.optim.Adam, ps, 3, lr=0.1)
    params = [nn.Parameter(p.clone()) for p in ps]
    opt = optim.Adam(params, lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
            p.grad = grad.t().contiguous().t() if p.dim() == 2 else grad  # transposed layout
        opt.step()
    for a, b in zip(params, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_input_raises_and_changes_nothing(name):
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="l1"):
        CLASSES[name]([p], lr=0.1, l1=-1.0)
    with pytest.raises(TypeError, match="preconditioned"):
        CLASSES[name]([p], lr=0.1, preconditioned=1)
    with pytest.raises(ValueError, match="appears earlier in the optimizer"):
        CLASSES[name]([p, p], lr=0.1)
    opt = CLASSES[name]([p], lr=0.1, l1=0.1)
    p.grad = torch.ones(4)
    opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["l2"] = float("nan")
    with pytest.raises(ValueError, match="l2"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert str(opt.state_dict()["state"]) == str(before[1]["state"])
    with pytest.raises(ValueError, match="appears earlier in the optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))] * 2})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", list(CLASSES) + ["RMSprop"])
def test_differentiable_with_l1_is_rejected(name):
    """differentiable=True takes torch's own step, and pyreg's prox takes
    parameters outside autograd: l1/l2 with it is refused where the group is
    added (construction, add_param_group), and at the step where it is set
    after that, before anything changes."""
    cls = getattr(optim, name)
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="param_groups.0. sets l1/l2 with differentiable=True"):
        cls([p], lr=0.1, l1=0.1, differentiable=True)
    opt = cls([p], lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="param_groups.1. sets l1/l2 with differentiable=True"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "l2": 0.1})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["l1"] = 0.1
    p.grad = torch.ones(3)
    before = copy.deepcopy((p.detach(), opt.state_dict()["state"]))
    with pytest.raises(ValueError, match="differentiable"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and str(opt.state_dict()["state"]) == str(before[1])


# --------------------------------------------------------------------------
# Regularized's structured keys in the fused optimizers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("keys", ["group_l1", "max_norm", "ref"])
def test_structured_keys_equal_regularized(name, keys):
    """group_l1/group_dim, ref and max_norm/max_norm_dim in a fused optimizer's
    groups do what Regularized's proximal mode does with them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    pretrained = copy.deepcopy(model)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    overrides = {"group_l1": {"0": {"group_l1": 5.0, "group_dim": 1}}, "max_norm": {"0": {"max_norm": 0.5}},
                 "ref": None}[keys]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    outs = []
    for kind in ("regularized", "fused"):
        m = copy.deepcopy(model)
        groups = pyreg.param_groups(m, l1=1e-3, l2=1e-3, overrides=overrides,
                                    ref=pretrained if keys == "ref" else None)
        opt = (pyreg.Regularized(getattr(torch.optim, name)(groups, lr=0.05, **kw)) if kind == "regularized"
               else CLASSES[name](groups, lr=0.05, **kw))
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        outs.append([p.detach() for p in m.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a == 0, b == 0)
    if keys == "group_l1":
        assert int((outs[1][0] == 0).all(0).sum()) > 0  # whole input columns are zero
    if keys == "max_norm":
        assert float(outs[1][0].norm(dim=1).max()) <= 0.5 + 1e-6


def test_structured_keys_validated():
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\['group_dim'\]=5 is out of range"):
        optim.AdamW([{"params": [p], "group_l1": 0.1, "group_dim": 5}], lr=0.1)
    opt = optim.AdamW([{"params": [p], "group_l1": 0.1, "group_dim": 1}], lr=0.1)
    opt.param_groups[0]["group_dim"] = 5  # set after construction: checked at the step
    p.grad = torch.ones(4, 3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"\['group_dim'\]=5 is out of range"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state
    with pytest.raises(ValueError, match="preconditioned"):
        optim.AdamW([{"params": [p], "group_l1": 0.1}], lr=0.1, preconditioned=True)
    opt = optim.AdamW([{"params": [p], "group_l1": 0.1}], lr=0.1)
    opt.param_groups[0]["preconditioned"] = True
    with pytest.raises(ValueError, match="preconditioned"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_structured_keys_skip_with_grad_scaler():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = optim.Adam([{"params": [model.weight], "group_l1": 0.5, "max_norm": 0.1}, {"params": [model.bias]}],
                     lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(model(torch.randn(3, 6)).sum()).backward()
    model.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_compiled_training_step_matches_eager(name):
    """torch.compile of a whole training step: the fused step runs eagerly
    inside it (a graph break) and the result equals the eager loop's."""
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    m2 = copy.deepcopy(m1)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    o1 = CLASSES[name](pyreg.param_groups(m1, l1=1e-2), lr=1e-2)
    o2 = CLASSES[name](pyreg.param_groups(m2, l1=1e-2), lr=1e-2)

    def step(m, o):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    compiled = torch.compile(step)
    for _ in range(4):
        compiled(m1, o1)
        step(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a == 0, b == 0)


# --------------------------------------------------------------------------
# Found by the torch.optim protocol suite (test_torch_optim_suite.py)
# --------------------------------------------------------------------------
def test_sgd_groups_with_and_without_momentum_match_torch():
    """One group with momentum and one without (same device, dtype and flags)
    share no kernel call: the momentum buffers are taken for all of a call's
    parameters or for none. Values as torch's SGD."""
    torch.manual_seed(0)
    ws = [torch.randn(4, 3) for _ in range(3)]
    mine = [w.clone().requires_grad_() for w in ws]
    ref = [w.clone().requires_grad_() for w in ws]
    groups = lambda ps: [{"params": ps[:2], "momentum": 0.9}, {"params": ps[2:]}]  # noqa: E731
    a, b = optim.SGD(groups(mine), lr=0.1), torch.optim.SGD(groups(ref), lr=0.1)
    for _ in range(3):
        for ps, o in ((mine, a), (ref, b)):
            o.zero_grad()
            sum((p * p).sum() for p in ps).backward()
            o.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q)
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys() == {0, 1}


def test_sgd_without_momentum_keeps_no_state():
    """As torch's SGD: no momentum, no state entry (its state dict's "state" is empty)."""
    w = nn.Parameter(torch.randn(3))
    o = optim.SGD([w], lr=0.1)
    w.grad = torch.ones(3)
    o.step()
    assert len(o.state) == 0
    assert o.state_dict()["state"] == torch.optim.SGD([w], lr=0.1).state_dict()["state"] == {}


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_parameters_with_the_negative_bit_step_as_their_values(name):
    """A parameter (and a grad) that is a view with torch's negative bit holds
    the negated values in memory: the fused step gives what it gives on the
    same values in ordinary tensors (torch's own fused AdamW refuses them)."""
    g = torch.Generator().manual_seed(4)
    x, gr = torch.randn(6, generator=g), torch.randn(6, generator=g)
    neg = torch.nn.Parameter(torch._neg_view(x.neg().clone()))
    ref = torch.nn.Parameter(x.clone())
    assert neg.is_neg() and torch.equal(neg, ref)
    cls = getattr(pyreg.optim, name)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    a = cls([{"params": [neg], "l1": 0.05}], lr=0.1, **kw)
    b = cls([{"params": [ref], "l1": 0.05}], lr=0.1, **kw)
    for step in range(3):
        neg.grad = torch._neg_view(gr.neg().clone()) if step == 1 else gr.clone()
        ref.grad = gr.clone()
        a.step()
        b.step()
        # (the spec steps a list with such a tensor: equal to rounding, not bit for bit)
        torch.testing.assert_close(neg.detach(), ref.detach(), rtol=1e-6, atol=1e-7, msg=str(step))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_a_zerotensor_grad_steps_as_zeros(name):
    """A grad that is a ZeroTensor (torch's zeros without memory, as autograd
    may hand over) steps as a grad of zeros, as torch's optimizers take it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, generator=g)
    a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    cls = getattr(pyreg.optim, name)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    oa = cls([{"params": [a], "l1": 0.05, "l2": 0.01}], lr=0.1, **kw)
    ob = cls([{"params": [b], "l1": 0.05, "l2": 0.01}], lr=0.1, **kw)
    for step in range(3):
        gr = torch.randn(2, 3, generator=g)
        a.grad = torch._efficientzerotensor(2, 3) if step == 1 else gr.clone()
        b.grad = torch.zeros(2, 3) if step == 1 else gr.clone()
        oa.step()
        ob.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=str(step))


@pytest.mark.parametrize("key", [{"target_sparsity": 0.5}, {"group_strength": 0.5}, {"max_norm": 1.0},
                                 {"l1_strength": 0.5}])
def test_a_key_the_kernels_apply_with_a_sparse_grad_names_both(key):
    """A group key applied with the fused step's own kernels, and a param in
    the group that only torch's step takes (a sparse grad): the error names
    the key the group sets and the param; nothing changes."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = optim.Adagrad([dict({"params": [emb.weight]}, **key)], lr=0.5)
    emb(torch.tensor([1, 3])).sum().backward()
    w = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"sets '{next(iter(key))}'.*\['params'\]\[0\] needs torch's own step"):
        opt.step()
    assert torch.equal(emb.weight, w)


@pytest.mark.parametrize("name", list(CLASSES) + ["RMSprop"])
@pytest.mark.parametrize("l1", [0.0, 1e-3])
def test_a_step_marks_what_it_writes_for_autograd(name, l1):
    """The step writes the params in place, as torch's optimizers do, and
    marks them so: a graph that saved a param before the step refuses its
    backward after it (it computed the new weights' gradient, silently)."""
    cls = getattr(optim, name)
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = cls([w], lr=0.5, l1=l1)
    loss = (w ** 3).sum()  # saves w
    w.grad = torch.ones(3)
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, w)
