"""Numerics under hostile values: NaN and Inf propagate (never masked), a step
GradScaler skips regularizes nothing, large norms are exact, and sums of
squares beyond the float32 range are correct or loudly non-finite."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyreg
from pyreg.backends import torch_ref

from conftest import needs_emu

NAN, INF = float("nan"), float("inf")
BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]


def _poisoned(dtype):
    """[clean, NaN inside, +Inf inside, -Inf at the end]: 4100 elements each so
    the specials land in the vectorized body and in the tail."""
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(4100, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    ts[1][1234] = NAN
    ts[2][7] = INF
    ts[3][-1] = -INF
    return ts


_TOL = {torch.float64: 1e-12, torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _equal_nan(a, b):
    """Same NaN and +-Inf positions exactly; finite values equal up to one
    rounding of the dtype (integers exactly)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()])
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=_TOL[a.dtype], atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_stats_shows_nan_and_inf(backend, dtype):
    ts = _poisoned(dtype)
    with pyreg.use_backend(backend):
        st = pyreg.weight_stats(ts)
    assert torch.isfinite(st.l1[0]) and torch.isfinite(st.l2[0]) and torch.isfinite(st.linf[0])
    assert st.l1[1].isnan() and st.l2[1].isnan() and st.linf[1].isnan()
    for i in (2, 3):
        assert st.l1[i] == INF and st.l2[i] == INF and st.linf[i] == INF
    assert st.nnz.tolist() == [int(torch.count_nonzero(t)) for t in ts]  # NaN and Inf count as nonzero
    ref = torch_ref.weight_stats([t.double() for t in ts])
    torch.testing.assert_close(st.l1[0].double(), ref.l1[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_propagates(backend, dtype):
    ts = _poisoned(dtype)
    with pyreg.use_backend(backend):
        assert torch.isfinite(pyreg.penalty(ts[:1], 0.1, 0.1))
        assert pyreg.penalty(ts, 0.1, 0.1).isnan()          # any NaN weight: NaN
        assert pyreg.penalty(ts[2:], 0.1, 0.1) == INF        # Inf weights: +Inf
        # IEEE: a zero coefficient times an infinite sum is NaN, not 0
        assert pyreg.penalty(ts[2:3], 0.1, 0.0).isnan()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_penalty_grad_propagates(backend, dtype):
    ts = _poisoned(dtype)
    gs = [torch.zeros_like(t) for t in ts]
    gs[0][5], gs[0][4099] = NAN, -INF  # specials already in the grads stay
    with pyreg.use_backend(backend):
        value = pyreg.add_penalty_grad_(ts, gs, l1=0.1, l2=0.1)
    assert value.isnan()
    assert gs[0][5].isnan() and gs[0][4099] == -INF
    assert gs[1][1234].isnan()
    assert gs[2][7] == INF and gs[3][-1] == -INF
    # everything else is finite and as the float64 reference says
    ref = [torch.zeros_like(t, dtype=torch.float64) for t in ts]
    ref[0][5], ref[0][4099] = NAN, -INF
    torch_ref.add_penalty_grad_([t.double() for t in ts], ref, torch.full((4,), 0.1, dtype=torch.float64),
                                torch.full((4,), 0.1, dtype=torch.float64))
    for g, r in zip(gs, ref):
        _equal_nan(g, r.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_propagates(backend, dtype):
    ts = _poisoned(dtype)
    before = [t.clone() for t in ts]
    with pyreg.use_backend(backend):
        nnz = pyreg.prox_(ts, l1=0.5, l2=0.1, lr=0.5)
    assert ts[1][1234].isnan() and ts[2][7] == INF and ts[3][-1] == -INF
    assert nnz.tolist() == [int(torch.count_nonzero(t)) for t in ts]
    ref = [t.double() for t in before]
    c = lambda v: torch.full((4,), v, dtype=torch.float64)  # noqa: E731
    torch_ref.prox_(ref, c(0.5), c(0.1), c(0.5))
    for t, r in zip(ts, ref):
        _equal_nan(t, r.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("cuda-emu", marks=needs_emu)])
def test_an_l2_scale_below_the_dtypes_range_keeps_infinite_weights_infinite(backend, dtype):
    """prox_ with 1 / (1 + 2 lr l2) below the compute type's range (it
    rounds to 0 in float): an infinite weight stays infinite as in the
    float64 spec (inf * s), not NaN (inf * 0), also toward a reference; the
    finite ones are within 1e-30 of the spec's."""
    w = torch.tensor([INF, -INF, 1.0, -3.0, 0.0, 1e30], dtype=torch.float64).to(dtype)
    r = torch.tensor([0.0, 1.0, 0.0, 2.0, -1.0, 0.0], dtype=torch.float64).to(dtype)
    x, y = w.clone(), w.clone()
    with pyreg.use_backend(backend):
        nnz = pyreg.prox_([x], l1=0.1, l2=1e30, lr=1e30)
        pyreg.prox_([y], l1=0.1, l2=1e30, lr=1e30, ref=[r])
    ref_x, ref_y = w.clone(), w.clone()
    c = lambda v: torch.full((1,), v, dtype=torch.float64)  # noqa: E731
    torch_ref.prox_([ref_x], c(0.1), c(1e30), c(1e30))
    torch_ref.prox_([ref_y], c(0.1), c(1e30), c(1e30), ref=[r])
    _equal_nan(x, ref_x)
    _equal_nan(y, ref_y)
    assert x[0] == INF and x[1] == -INF and y[0] == INF and y[1] == -INF
    assert nnz.tolist() == [int(torch.count_nonzero(x))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_kernels_equal_reference_on_specials(dtype):
    """Element by element, the CPU kernels treat NaN, +-Inf, +-0 and the
    threshold exactly as the float64 specification does."""
    w = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 0.25, -0.25, 0.2500001, 1e30, -1e-30], dtype=dtype)
    for l1, l2 in [(0.5, 0.1), (0.0, 0.1), (0.5, 0.0), (0.0, 0.0)]:
        outs = {}
        for backend in BACKENDS:
            x, g = w.clone(), torch.tensor([1.0, NAN, INF, -INF, 0, 0, 0, 0, 0, 0], dtype=dtype)
            with pyreg.use_backend(backend):
                st = pyreg.weight_stats([w])
                p = pyreg.add_penalty_grad_([w], [g], l1, l2)
                nnz = pyreg.prox_([x], l1, l2, lr=0.5)
            outs[backend] = (st.linf, st.nnz, p.isnan(), g, x, nnz)
        for a, b in zip(outs["cpu"], outs["torch"]):
            _equal_nan(a, b)


# --------------------------------------------------------------------------
# GradScaler: a skipped step applies no regularization
# --------------------------------------------------------------------------
def _scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no CPU GradScaler: {e}")


_INNER = {
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "sgd-momentum": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9),
    # Fused optimizers take the scaler's grad_scale / found_inf themselves; the
    # wrapper must still let the scaler unscale and skip for it.
    "adam-fused": lambda g: torch.optim.Adam(g, lr=1e-2, fused=True),
    "adamw-fused": lambda g: torch.optim.AdamW(g, lr=1e-2, fused=True),
    "sgd-fused": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("inner", list(_INNER))
@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_grad_scaler_skipped_step_changes_nothing(mode, inner):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([1e-4, -1e-4, 0.0])  # prox would zero these
    groups = pyreg.param_groups(model, l1=1e-2, l2=1e-2)
    base = _INNER[inner](groups)
    if inner.endswith("fused"):
        assert base._step_supports_amp_scaling  # the case this covers
    opt = pyreg.Regularized(base, mode=mode)
    scaler = _scaler()
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def backward(poison):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if poison:
            model[2].weight.grad[0, 0] = INF  # an overflowed grad: the step is skipped

    # one good step so the inner optimizer has state
    backward(False)
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([1e-4, -1e-4, 0.0])
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters())}
    scale = scaler.get_scale()

    backward(True)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale  # it was skipped
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p.detach(), b)  # no inner step, no prox shrink
    assert model[0].weight[0, 0] == 1e-4 and model[0].weight[0, 1] == -1e-4
    for i, p in enumerate(model.parameters()):
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v

    backward(False)  # the next good step regularizes again
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model[0].weight.detach(), params[0])


_STRENGTH_KEYS = {
    "l1_strength": {"l1_strength": 0.5},
    "group_strength": {"overrides": {"0.weight": {"group_strength": 0.5, "group_dim": 1}}},
}


@pytest.mark.parametrize("keys", list(_STRENGTH_KEYS))
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_grad_scaler_skipped_step_leaves_the_strength_count(name, keys):
    """pyreg's fused optimizers under GradScaler with l1_strength/group_strength: a skipped step leaves the
    count of steps (which decides the refreshes) and the refreshed l1 as they were, as the weights."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    groups = pyreg.param_groups(model, **_STRENGTH_KEYS[keys])
    for g in groups:
        if g.get(keys):
            g["l1_refresh"] = 2
    opt = getattr(pyreg.optim, name)(groups, lr=1e-2)
    scaler = _scaler()
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def step(poison):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if poison:
            model[2].weight.grad[0, 0] = INF
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step(False)
    w = model[0].weight
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[w].items()}
    params = [p.detach().clone() for p in model.parameters()]
    step(True)  # step 4 of the count would be a refresh (l1_refresh 2)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params))
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v) if torch.is_tensor(v) else opt.state[w][k] == v, k


# --------------------------------------------------------------------------
# Large sums
# --------------------------------------------------------------------------
def test_norms_of_1e8_ones_all_ops():
    # test_ops checks weight_stats; here the penalty and prox_ over the same 1e8 ones.
    x = torch.ones(100_000_000)
    with pyreg.use_backend("cpu"):
        assert pyreg.penalty([x], l1=1.0, l2=1.0).item() == 2e8
        st = pyreg.weight_stats([x[: 50_000_000], x[50_000_000:]])
        assert st.l1.tolist() == [5e7, 5e7]
        assert abs(st.l2[0].item() - math.sqrt(5e7)) <= 1e-6 * math.sqrt(5e7)
        nnz = pyreg.prox_([x], l1=0.5, lr=1.0)
    assert nnz.item() == 100_000_000 and bool((x == 0.5).all())


def test_norm_of_1e8_ones_bfloat16():
    x = torch.ones(100_000_000, dtype=torch.bfloat16)
    with pyreg.use_backend("cpu"):
        st = pyreg.weight_stats([x])
    assert abs(st.l2.item() - 1e4) <= 1e-6 * 1e4 and st.l1.item() == 1e8


BIG = 1e20   # BIG**2 = 1e40 > float32 max (3.4e38); BIG itself is a float32
TINY = 1e-30  # TINY**2 = 1e-60 < float32's smallest subnormal (1.4e-45)


def test_sum_of_squares_beyond_float32_reference_backend():
    """The torch backend squares in float64: the l2 norm and the penalty of
    float32 weights of 1e20 (or 1e-30) are finite and correct."""
    n = 1000
    for v in (BIG, TINY):
        w = torch.full((n,), v, dtype=torch.float32)
        with pyreg.use_backend("torch"):
            st = pyreg.weight_stats([w])
        assert math.isclose(st.l2.item(), float(w[0]) * math.sqrt(n), rel_tol=1e-6)
    w = torch.full((n,), BIG, dtype=torch.float32)
    with pyreg.use_backend("torch"):
        pen = pyreg.penalty([w], l1=1e-30, l2=1e-30).item()
    assert math.isclose(pen, 1e-30 * n * (float(w[0]) ** 2 + float(w[0])), rel_tol=1e-6)


@pytest.mark.parametrize("value", [BIG, TINY], ids=["1e20", "1e-30"])
def test_sum_of_squares_beyond_float32_cpu_kernel(value):
    """The kernel sums float32 squares in float32 blocks, and sums a block again
    in float64 when its squares overflow or underflow float32's range."""
    w = torch.full((1000,), value, dtype=torch.float32)
    coef = 1e-30 if value == BIG else 1.0  # keeps the penalty inside float32's range
    with pyreg.use_backend("cpu"):
        st = pyreg.weight_stats([w])
        pen = pyreg.penalty([w], l1=coef, l2=0.0).item()
        pen2 = pyreg.penalty([w], l1=0.0, l2=coef).item()
    assert math.isclose(st.l2.item(), float(w[0]) * math.sqrt(1000), rel_tol=1e-6)
    assert math.isclose(pen, coef * 1000 * float(w[0]), rel_tol=1e-6)
    sq = coef * 1000 * float(w[0]) ** 2
    assert (pen2 == INF if sq > 3.4e38 else math.isclose(pen2, sq, rel_tol=1e-6, abs_tol=1e-45))
