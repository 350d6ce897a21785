"""The validation matrix: every public entry point rejects bad input with a
TypeError / ValueError whose message names the problem and the argument or
tensor index, and a failed call modifies nothing (tensors, grads, params,
optimizer state, param groups).

The basics are in test_ops.py / test_optim.py; this file is the full matrix.
"""
from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import pyreg
from pyreg.cli import main as cli_main

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------
# Helpers: snapshots and "nothing changed"
# --------------------------------------------------------------------------
def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return copy.deepcopy(x)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.layout == b.layout):
            return False
        a, b = a.detach(), b.detach()
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


def _inputs():
    """Fresh weights and grads: two dense float32 tensors each (plus one to spare)."""
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(10, generator=g), torch.randn(4, 5, generator=g)]
    gr = [torch.randn(10, generator=g), torch.randn(4, 5, generator=g)]
    return w, gr


# --------------------------------------------------------------------------
# The ops: (id, call(w, g), exception, message part)
# --------------------------------------------------------------------------
def _strided_overlap():
    return torch.zeros(20).as_strided((2, 3), (4, 2))  # elements 4 and 4 coincide


OP_CASES = [
    # coefficients: negative, NaN, infinite; as numbers, sequences and tensors
    ("penalty-l1-nan", lambda w, g: pyreg.penalty(w, l1=NAN), ValueError, "l1 must be finite and >= 0, got nan"),
    ("penalty-l2-neg", lambda w, g: pyreg.penalty(w, l2=-1e-3), ValueError, "l2 must be finite and >= 0, got -0.001"),
    ("prox-l2-inf", lambda w, g: pyreg.prox_(w, l2=INF), ValueError, "l2 must be finite and >= 0, got inf"),
    ("prox-lr-neg", lambda w, g: pyreg.prox_(w, l1=0.1, lr=-1), ValueError, "lr must be finite and >= 0, got -1.0"),
    ("prox-lr-list-inf", lambda w, g: pyreg.prox_(w, l1=0.1, lr=[0.1, INF]), ValueError, "lr[1] must be finite and >= 0, got inf"),
    ("apg-l1-tensor-nan", lambda w, g: pyreg.add_penalty_grad_(w, g, l1=torch.tensor([0.1, NAN])),
     ValueError, "l1[1] must be finite and >= 0, got nan"),
    ("prox-l1-tensor-neg", lambda w, g: pyreg.prox_(w, l1=torch.tensor([-0.5, 0.1])), ValueError,
     "l1[0] must be finite and >= 0, got -0.5"),
    # coefficients: wrong length / shape / type
    ("prox-l1-list-len", lambda w, g: pyreg.prox_(w, l1=[0.1, 0.2, 0.3]), ValueError, "l1 has 3 values but there are 2 tensors"),
    ("apg-l2-tensor-len", lambda w, g: pyreg.add_penalty_grad_(w, g, l2=torch.ones(3)), ValueError,
     "l2 has shape (3,); expected a number or one value per tensor (2)"),
    ("penalty-l1-2d", lambda w, g: pyreg.penalty(w, l1=torch.ones(2, 1)), ValueError, "l1 has shape (2, 1)"),
    ("penalty-l1-str", lambda w, g: pyreg.penalty(w, l1="0.1"), TypeError,
     "l1 must be a number, a sequence of numbers or a tensor, got str"),
    ("prox-l1-bool", lambda w, g: pyreg.prox_(w, l1=True), TypeError, "got bool"),
    ("prox-l1-list-none", lambda w, g: pyreg.prox_(w, l1=[0.1, None]), TypeError, "l1[1] must be a real number, got NoneType"),
    ("prox-lr-complex-tensor", lambda w, g: pyreg.prox_(w, lr=torch.tensor([1j, 1j])), TypeError,
     "lr has dtype torch.complex64; expected a real dtype"),
    # tensor and grad lists
    ("apg-len-mismatch", lambda w, g: pyreg.add_penalty_grad_(w, g + [torch.zeros(1)], l1=0.1), ValueError,
     "got 2 tensors but 3 grads"),
    ("apg-grad-shape", lambda w, g: pyreg.add_penalty_grad_(w, [g[0], g[1].reshape(5, 4)], l1=0.1), ValueError,
     "grads[1] is (5, 4) torch.float32 on cpu but tensors[1] is (4, 5) torch.float32 on cpu"),
    ("apg-grad-dtype", lambda w, g: pyreg.add_penalty_grad_(w, [g[0].double(), g[1]], l1=0.1), ValueError,
     "grads[0] is (10,) torch.float64 on cpu but tensors[0] is (10,) torch.float32 on cpu"),
    ("apg-grads-not-iterable", lambda w, g: pyreg.add_penalty_grad_(w, 0.5, l1=0.1), TypeError,
     "grads must be a tensor or an iterable of tensors, got float"),
    # devices, dtypes, layouts
    ("prox-two-devices", lambda w, g: pyreg.prox_([w[0], torch.zeros(3, device="meta")], l1=0.1), ValueError,
     "tensors[1] is on meta but tensors[0] is on cpu; one call takes tensors on one device"),
    ("apg-grads-two-devices", lambda w, g: pyreg.add_penalty_grad_(w, [g[0], g[1].to("meta")], l1=0.1), ValueError,
     "grads[1] is on meta but grads[0] is on cpu"),
    ("stats-meta", lambda w, g: pyreg.weight_stats([torch.zeros(3, device="meta")]), ValueError,
     "tensors[0] is a meta tensor: it has no data to regularize"),
    ("prox-int", lambda w, g: pyreg.prox_([w[0], torch.arange(3, dtype=torch.int32)], l1=0.1), TypeError,
     "tensors[1] has dtype torch.int32; pyreg supports float32, float64, float16 and bfloat16"),
    ("penalty-bool", lambda w, g: pyreg.penalty([torch.ones(3, dtype=torch.bool)], l1=0.1), TypeError,
     "tensors[0] has dtype torch.bool"),
    ("stats-complex", lambda w, g: pyreg.weight_stats(w + [torch.ones(3, dtype=torch.complex64)]), TypeError,
     "tensors[2] has dtype torch.complex64"),
    ("prox-sparse", lambda w, g: pyreg.prox_([w[0], w[1].to_sparse()], l1=0.1), TypeError,
     "tensors[1] has layout torch.sparse_coo; pyreg needs dense (strided) tensors"),
    ("apg-sparse-grad", lambda w, g: pyreg.add_penalty_grad_(w, [g[0].to_sparse(), g[1]], l1=0.1), TypeError,
     "grads[0] has layout torch.sparse_coo"),
    ("penalty-csr", lambda w, g: pyreg.penalty([w[1].to_sparse_csr()], l1=0.1), TypeError,
     "tensors[0] has layout torch.sparse_csr"),
    # overlapping / aliased tensors in an in-place call
    ("prox-aliased", lambda w, g: pyreg.prox_([w[0], w[1], w[0]], l1=0.1), ValueError,
     "tensors[0] and tensors[2] share memory; an in-place op needs distinct tensors"),
    ("prox-overlapping-views", lambda w, g: pyreg.prox_([w[0][:6], w[0][4:]], l1=0.1), ValueError,
     "tensors[0] and tensors[1] share memory"),
    ("prox-internal-overlap", lambda w, g: pyreg.prox_([w[0], _strided_overlap()], l1=0.1), ValueError,
     "tensors[1] has overlapping memory"),
    ("apg-grad-is-weight", lambda w, g: pyreg.add_penalty_grad_(w, [g[0], w[1]], l1=0.1), ValueError,
     "grads[1] shares memory with tensors[1]; add_penalty_grad_ writes the grads while it reads the tensors"),
    ("apg-grad-views-other-weight", lambda w, g: pyreg.add_penalty_grad_(w, [w[1].reshape(-1)[5:15], g[1]], l1=0.1),
     ValueError, "grads[0] shares memory with tensors[1]"),
    ("apg-grads-aliased", lambda w, g: pyreg.add_penalty_grad_([w[0], w[0].clone()], [g[0], g[0]], l1=0.1),
     ValueError, "grads[0] and grads[1] share memory"),
    ("apg-grad-expanded", lambda w, g: pyreg.add_penalty_grad_(w[:1], [torch.zeros(1).expand(10)], l1=0.1),
     ValueError, "grads[0] has overlapping memory"),
    ("prox-meta-l1", lambda w, g: pyreg.prox_(w, l1=torch.empty(2, device="meta")), ValueError,
     "l1 is a meta tensor: it has no values"),
    ("apg-ref-is-grad", lambda w, g: pyreg.add_penalty_grad_(w, g, l1=0.1, ref=[g[0], w[1] + 1]), ValueError,
     "grads[0] shares memory with ref[0]; the op writes the grads while it reads the refs"),
    ("agpg-grad-is-weight", lambda w, g: pyreg.add_group_penalty_grad_(w[1:], [w[1]], 0.1), ValueError,
     "grads[0] shares memory with tensors[0]; add_group_penalty_grad_ writes the grads"),
    # inference tensors written outside inference mode (torch refuses to write them)
    ("prox-inference", lambda w, g: pyreg.prox_([w[0], _inference(3)], l1=0.1), ValueError,
     "tensors[1] is an inference tensor (made under torch.inference_mode()), which cannot be written in place"),
    ("group-prox-inference", lambda w, g: pyreg.group_prox_([w[1], _inference(2, 3)], 0.1), ValueError,
     "tensors[1] is an inference tensor"),
    ("max-norm-inference", lambda w, g: pyreg.max_norm_([w[1], _inference(2, 3)], 0.1), ValueError,
     "tensors[1] is an inference tensor"),
    ("apg-inference-grad", lambda w, g: pyreg.add_penalty_grad_(w, [g[0], _inference(4, 5)], l1=0.1), ValueError,
     "grads[1] is an inference tensor"),
    ("agpg-inference-grad", lambda w, g: pyreg.add_group_penalty_grad_(w[1:], [_inference(4, 5)], 0.1), ValueError,
     "grads[0] is an inference tensor"),
    # ZeroTensors (torch's zeros without memory: nothing to read in place, immutable)
    ("apg-zerotensor-grad", lambda w, g: pyreg.add_penalty_grad_(w, [g[0], torch._efficientzerotensor(4, 5)], l1=0.1),
     TypeError, "grads[1] is a ZeroTensor"),
    ("prox-zerotensor", lambda w, g: pyreg.prox_(w + [torch._efficientzerotensor(3)], l1=0.1), TypeError,
     "tensors[2] is a ZeroTensor"),
    ("stats-zerotensor", lambda w, g: pyreg.weight_stats([torch._efficientzerotensor(3)]), TypeError,
     "tensors[0] is a ZeroTensor"),
    ("prox-zerotensor-ref", lambda w, g: pyreg.prox_(w, l1=0.1, ref=[w[0] + 1, torch._efficientzerotensor(4, 5)]),
     TypeError, "ref[1] is a ZeroTensor"),
    ("group-prox-zerotensor", lambda w, g: pyreg.group_prox_([w[1], torch._efficientzerotensor(2, 3)], 0.1),
     TypeError, "tensors[1] is a ZeroTensor"),
    ("prox-huge-int-l1", lambda w, g: pyreg.prox_(w, l1=10 ** 400), ValueError,
     "l1 must be finite and >= 0, got 10000000000000000000... (beyond a float's range)"),
    # nested tensors (a torch.Tensor whose components differ in shape)
    ("prox-nested", lambda w, g: pyreg.prox_(w + [_nested()], l1=0.1), TypeError,
     "tensors[2] is a nested tensor; pyreg takes its components as separate tensors"),
    ("stats-nested", lambda w, g: pyreg.weight_stats([_nested(), w[0]]), TypeError, "tensors[0] is a nested tensor"),
    ("penalty-nested", lambda w, g: pyreg.penalty([w[0], _nested()], l1=0.1), TypeError, "tensors[1] is a nested"),
    ("kth-abs-nested", lambda w, g: pyreg.kth_abs([_nested()], 1), TypeError, "tensors[0] is a nested"),
    ("apg-nested-grad", lambda w, g: pyreg.add_penalty_grad_(w[:1], [_nested(2, 5)], l1=0.1), TypeError,
     "grads[0] is a nested tensor"),
    ("prox-nested-ref", lambda w, g: pyreg.prox_(w[:1], l1=0.1, ref=[_nested(2, 5)]), TypeError,
     "ref[0] is a nested tensor"),
    ("group-prox-nested", lambda w, g: pyreg.group_prox_([w[1], _nested()], 0.1), TypeError,
     "tensors[1] is a nested tensor"),
    ("max-norm-nested", lambda w, g: pyreg.max_norm_([_nested(), w[1]], 1.0), TypeError,
     "tensors[0] is a nested tensor"),
    # not tensors at all
    ("stats-int", lambda w, g: pyreg.weight_stats(3), TypeError, "tensors must be a tensor or an iterable of tensors, got int"),
    ("penalty-str", lambda w, g: pyreg.penalty("weights"), TypeError, "got str"),
    ("prox-list-of-floats", lambda w, g: pyreg.prox_([w[0], 1.0], l1=0.1), TypeError, "tensors[1] is a float, not a torch.Tensor"),
    ("use-backend-unknown", lambda w, g: pyreg.use_backend("gpu").__enter__(), ValueError,
     "unknown backend 'gpu'; expected one of ['cpu', 'cuda', 'cuda-emu', 'torch']"),
]


def _inference(*shape):
    with torch.inference_mode():
        return torch.randn(*shape)


@pytest.mark.parametrize("op", ["prox_", "add_penalty_grad_"])
def test_inference_tensor_written_outside_inference_mode_changes_nothing(B, op):
    """On every backend (torch's refused the inference tensor after writing the tensors before it)."""
    w = [torch.randn(5, device=B.dev), torch.randn(3, device=B.dev)]
    with torch.inference_mode():
        inf = torch.randn(4, device=B.dev)
    written = [w[0].clone(), inf] if op == "prox_" else [torch.randn(5, device=B.dev), inf]
    before = [t.clone() for t in written]
    with pyreg.use_backend(B.name), pytest.raises(ValueError, match=r"\[1\] is an inference tensor"):
        if op == "prox_":
            pyreg.prox_(written, l1=0.1)
        else:
            pyreg.add_penalty_grad_([w[0], torch.randn(4, device=B.dev)], written, l1=0.1)
    assert all(torch.equal(a, b) for a, b in zip(written, before))
    with torch.inference_mode(), pyreg.use_backend(B.name):  # inside inference mode: written
        pyreg.prox_([inf], l1=10.0)
    assert bool((inf == 0).all())


def _nested(rows: int = 3, cols: int = 4):
    """A contiguous nested tensor of two components, (rows, cols) and (rows + 2, cols)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype warning
        return torch.nested.nested_tensor([torch.randn(rows, cols), torch.randn(rows + 2, cols)])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("call, exc, message", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_rejects_and_changes_nothing(call, exc, message):
    w, g = _inputs()
    before = _clone((w, g))
    with _raises(exc, message):
        call(w, g)
    assert _same((w, g), before)


def test_a_null_pointer_paired_with_a_tensor_is_refused_by_the_kernels_entry():
    """What reaches pyreg._C directly is checked there too: a grad, ref or
    state pointer of 0 for a tensor with elements raises (a ZeroTensor has
    no memory), never a write to address 0."""
    from pyreg._lib import _C

    w = torch.randn(3)
    out = torch.zeros((), dtype=torch.float32)
    with pytest.raises(ValueError, match="null grads pointer"):
        _C.cpu_add_penalty_grad([w.data_ptr()], [3], [0], [], [0], (0, 0.1), (0, 0.0), out.data_ptr(), 0,
                                0, -1, 0, 1)
    with pytest.raises(ValueError, match="null refs pointer"):
        _C.cpu_penalty([w.data_ptr()], [3], [0], [0], (0, 0.1), (0, 0.0), out.data_ptr(), 0, 0, -1, 0, 1)
    assert out.item() == 0.0


def test_a_zerotensor_coefficient_is_read_as_zeros():
    w, _ = _inputs()
    a, b = [t.clone() for t in w], [t.clone() for t in w]
    pyreg.prox_(a, l1=torch._efficientzerotensor(2, dtype=torch.float64), l2=0.1)
    pyreg.prox_(b, l1=torch.zeros(2, dtype=torch.float64), l2=0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_grads_may_share_storage_apart_and_weights_may_alias():
    # Not errors: grads that are disjoint views of one flat buffer (DDP's
    # gradient_as_bucket_view), and a weight passed twice (it is only read).
    w = torch.randn(6)
    flat = torch.zeros(12)
    v = pyreg.add_penalty_grad_([w, w], [flat[:6], flat[6:]], l1=0.5)
    assert torch.equal(flat[:6], flat[6:]) and torch.equal(flat[:6], 0.5 * w.sign())
    torch.testing.assert_close(v, 2 * 0.5 * w.abs().sum())
    # and prox_ on disjoint views of one storage
    base = torch.full((10,), 2.0)
    pyreg.prox_([base[:5], base[5:]], l1=1.0)
    assert torch.equal(base, torch.ones(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_tensors_in_one_call():  # pragma: no cover - CPU CI
    w = [torch.randn(3), torch.randn(3, device="cuda")]
    before = _clone(w)
    with _raises(ValueError, "tensors[1] is on cuda:0 but tensors[0] is on cpu"):
        pyreg.prox_(w, l1=0.1)
    assert _same(w, [b for b in before])


# --------------------------------------------------------------------------
# Convention helpers
# --------------------------------------------------------------------------
CONVENTION_CASES = [
    ("sklearn-ratio-neg", lambda: pyreg.from_sklearn(1.0, -0.1), ValueError, "l1_ratio must be in [0, 1], got -0.1"),
    ("sklearn-ratio-nan", lambda: pyreg.from_sklearn(1.0, NAN), ValueError, "l1_ratio must be finite, got nan"),
    ("sklearn-ratio-none", lambda: pyreg.from_sklearn(1.0, None), TypeError, "l1_ratio must be a real number, got NoneType"),
    ("sklearn-alpha-inf", lambda: pyreg.from_sklearn(INF), ValueError, "alpha must be finite and >= 0, got inf"),
    ("sklearn-alpha-neg", lambda: pyreg.from_sklearn(-0.5, 0.5), ValueError, "alpha must be finite and >= 0, got -0.5"),
    ("wd-nan", lambda: pyreg.from_weight_decay(NAN), ValueError, "weight_decay must be finite and >= 0, got nan"),
    ("wd-str", lambda: pyreg.from_weight_decay("1e-4"), TypeError, "weight_decay must be a real number, got str"),
    ("wd-bool", lambda: pyreg.from_weight_decay(True), TypeError, "weight_decay must be a real number, got bool"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in CONVENTION_CASES], ids=[c[0] for c in CONVENTION_CASES])
def test_convention_helpers_reject(call, exc, message):
    with _raises(exc, message):
        call()


# --------------------------------------------------------------------------
# param_groups
# --------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


PARAM_GROUPS_CASES = [
    ("not-a-module", lambda m: pyreg.param_groups(list(m.parameters())), TypeError, "param_groups needs an nn.Module, got list"),
    ("l2-inf", lambda m: pyreg.param_groups(m, l2=INF), ValueError, "l2 must be finite and >= 0, got inf"),
    ("l1-str", lambda m: pyreg.param_groups(m, l1="1e-3"), TypeError, "l1 must be a real number, got str"),
    ("exclude-int", lambda m: pyreg.param_groups(m, exclude=3), TypeError, "exclude must be None, a callable"),
    ("exclude-non-str", lambda m: pyreg.param_groups(m, exclude=["*.bias", 0]), TypeError,
     "exclude patterns must be strings, got int"),
    ("override-params", lambda m: pyreg.param_groups(m, overrides={"0": {"params": []}}), ValueError,
     "overrides['0'] may not set 'params' or 'param_names'"),
    ("override-l1-nan", lambda m: pyreg.param_groups(m, overrides={"2": {"l1": NAN}}), ValueError,
     "overrides['2']['l1'] must be finite and >= 0, got nan"),
    ("override-not-dict", lambda m: pyreg.param_groups(m, overrides={"2": 0.1}), TypeError,
     "overrides must map name patterns (str) to dicts of group options"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in PARAM_GROUPS_CASES], ids=[c[0] for c in PARAM_GROUPS_CASES])
def test_param_groups_rejects_and_changes_nothing(call, exc, message):
    m = _model()
    before = _clone(m.state_dict())
    with _raises(exc, message):
        call(m)
    assert _same(m.state_dict(), before)


# --------------------------------------------------------------------------
# Regularized: at construction
# --------------------------------------------------------------------------
def test_construction_errors_leave_inner_optimizer_unchanged():
    m = _model()
    inner = torch.optim.SGD([{"params": [m[0].weight]}, {"params": [m[2].weight], "l1": 0.5}], lr=0.1)
    groups_before = _clone(inner.param_groups)
    params_before = _clone(list(m.parameters()))
    cases = [
        (lambda: pyreg.Regularized(m), TypeError, "Regularized wraps a torch.optim.Optimizer, got Sequential"),
        (lambda: pyreg.Regularized(inner.param_groups), TypeError, "got list"),
        (lambda: pyreg.Regularized(inner, mode="decoupled"), ValueError,
         "mode must be one of ('proximal', 'gradient'), got 'decoupled'"),
        (lambda: pyreg.Regularized(inner, l2=-1e-4), ValueError, "l2 must be finite and >= 0, got -0.0001"),
        (lambda: pyreg.Regularized(inner, l1=INF), ValueError, "l1 must be finite and >= 0, got inf"),
    ]
    for call, exc, message in cases:
        with _raises(exc, message):
            call()
        # the defaults were not written into the groups, nothing else changed
        assert _same(inner.param_groups, groups_before)
        assert "l2" not in inner.param_groups[0]
        assert _same(list(m.parameters()), params_before)


def test_parameters_sharing_memory_are_rejected_at_construction():
    base = torch.zeros(10)
    a, b = nn.Parameter(base[:6]), nn.Parameter(base[4:])  # one storage, overlapping
    inner = torch.optim.SGD([{"params": [a], "param_names": ["a"]}, {"params": [b], "param_names": ["b"]}], lr=0.1)
    with _raises(ValueError, "parameters 'a' and 'b' share memory; pyreg updates each regularized parameter in place"):
        pyreg.Regularized(inner, l1=0.1)
    # not regularized (l1 = l2 = 0): not touched by pyreg, so allowed
    pyreg.Regularized(inner)


_SHARING = {
    "pyreg.optim.SGD": lambda ps: pyreg.optim.SGD(ps, lr=0.1, momentum=0.9, l1=0.01),
    "pyreg.optim.AdamW": lambda ps: pyreg.optim.AdamW(ps, lr=0.1, l1=0.01),
    "Regularized proximal": lambda ps: pyreg.Regularized(torch.optim.SGD(ps, lr=0.1, momentum=0.9), l1=0.01),
    "Regularized gradient": lambda ps: pyreg.Regularized(torch.optim.Adam(ps, lr=0.1), l1=0.01, mode="gradient"),
}


@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("make", list(_SHARING))
def test_parameters_that_come_to_share_memory_are_rejected_before_the_step(make, steps):
    """A weight given another's memory through .data after construction (after ``steps`` steps: the kept
    and fast paths): the step raises before anything changed, as at construction."""
    g = torch.Generator().manual_seed(5)
    a, b = nn.Parameter(torch.randn(64, generator=g)), nn.Parameter(torch.randn(64, generator=g))
    opt = _SHARING[make]([a, b])
    for _ in range(steps):
        a.grad, b.grad = torch.randn(64, generator=g), torch.randn(64, generator=g)
        opt.step()
    b.data = a.data
    a.grad, b.grad = torch.randn(64, generator=g), torch.randn(64, generator=g)
    before = a.detach().clone()
    state = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    with _raises(ValueError, "share memory; pyreg updates each regularized parameter in place"):
        opt.step()
    assert torch.equal(a.detach(), before)
    assert all(torch.equal(opt.state[a][k], v) for k, v in state.items())


def _overlapping_pair():
    base = torch.zeros(6)
    return [nn.Parameter(base[:4]), nn.Parameter(base[2:])]


_ADDED = {
    "a parameter twice": (lambda q: {"params": [q, q]}, ValueError, "appears earlier in the optimizer"),
    "complex": (lambda q: {"params": [nn.Parameter(torch.randn(3, dtype=torch.complex64))], "l1": 0.1},
                TypeError, "complex64"),
    "meta": (lambda q: {"params": [nn.Parameter(torch.zeros(3, device="meta"))], "l1": 0.1}, ValueError,
             "meta tensor"),
    "sharing memory": (lambda q: {"params": _overlapping_pair(), "l1": 0.1}, ValueError, "share memory"),
    "a set": (lambda q: {"params": {q}}, TypeError, "ordered collections"),
    "no params": (lambda q: {"lr": 0.1, "l1": 0.1}, ValueError, "has no 'params'"),
}


@pytest.mark.parametrize("case", list(_ADDED))
@pytest.mark.parametrize("family", ["Regularized", "pyreg.optim"])
def test_add_param_group_refuses_what_every_step_would(family, case):
    """A group that every step would refuse is refused by add_param_group, which adds nothing."""
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = (pyreg.Regularized(torch.optim.SGD([p], lr=0.1), l1=0.1) if family == "Regularized"
           else pyreg.optim.SGD([p], lr=0.1, l1=0.1))
    make, exc, message = _ADDED[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch warns of a duplicate before pyreg refuses it)
        with _raises(exc, message):
            opt.add_param_group(make(q))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("key,value", [("group_dim", True), ("group_dim", 1.0), ("group_dim", torch.tensor([1, 0])),
                                       ("max_norm_dim", 0.0)])
@pytest.mark.parametrize("family", ["Regularized", "pyreg.optim"])
def test_a_dim_set_after_construction_is_checked_as_at_construction(family, key, value):
    """A group dim of another type set after some steps (True and 1.0 equal the 1 the plan was made with)."""
    g = torch.Generator().manual_seed(9)
    w, v = nn.Parameter(torch.randn(3, 4, generator=g)), nn.Parameter(torch.randn(3, 4, generator=g))
    group = {"params": [w, v], "group_l1": 0.1, "group_dim": 1, "max_norm": 1.0, "max_norm_dim": 0}
    opt = (pyreg.Regularized(torch.optim.SGD([group], lr=0.1)) if family == "Regularized"
           else pyreg.optim.SGD([group], lr=0.1))
    for _ in range(2):
        w.grad, v.grad = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
        opt.step()
    before = [w.detach().clone(), v.detach().clone()]
    opt.param_groups[0][key] = value
    with _raises(TypeError, f"param_groups[0]['{key}'] must be an int or a sequence of ints"):
        opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])


@pytest.mark.parametrize("family", ["Regularized", "pyreg.optim", "add_param_group"])
def test_a_misspelt_key_warns_and_a_foreign_one_does_not(family):
    """torch keeps any key in a group: a misspelt pyreg key would do nothing, silently."""
    m = nn.Linear(4, 3)

    def make(extra):
        group = {"params": [m.weight], "group_l1": 0.1, **extra}
        if family == "Regularized":
            return pyreg.Regularized(torch.optim.SGD([group], lr=0.1))
        if family == "pyreg.optim":
            return pyreg.optim.SGD([group], lr=0.1)
        return pyreg.optim.SGD([m.bias], lr=0.1).add_param_group(group)

    with pytest.warns(UserWarning, match=r"has a key 'group_dims', which nothing reads; did you mean 'group_dim'\?"):
        make({"group_dims": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make({"name": "first layer"})  # a key of the user's own: no warning
        make({"max_momentum": 0.95, "base_momentum": 0.85})  # OneCycleLR's, which it reads: no warning


def test_meta_parameter_is_rejected_at_construction():
    p = nn.Parameter(torch.zeros(3, device="meta"))
    with _raises(ValueError, "param_groups[0] parameter 'param_groups.0.0' is a meta tensor"):
        pyreg.Regularized(torch.optim.SGD([p], lr=0.1), l1=0.1)


# --------------------------------------------------------------------------
# Regularized: groups changed after construction; the failed step changes nothing
# --------------------------------------------------------------------------
def _trained(mode, inner="adam", two_dtypes=False):
    """A Regularized optimizer with optimizer state (one step taken) and fresh grads."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    if two_dtypes:
        m[2].double()
    groups = pyreg.param_groups(m, l1=1e-2, l2=1e-3)
    if inner == "adam":
        base = torch.optim.Adam(groups, lr=torch.tensor(1e-2))
    else:
        base = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
    opt = pyreg.Regularized(base, mode=mode)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in m.parameters():  # fresh grads for the step that must fail
        p.grad = torch.randn_like(p)
    return m, opt


def _snapshot(m, opt):
    return {
        "params": _clone([p for p in m.parameters()]),
        "grads": _clone([p.grad for p in m.parameters()]),
        "state": _clone({i: opt.state[p] for i, p in enumerate(m.parameters()) if p in opt.state}),
        "groups": _clone([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        "inner": _clone(opt.optimizer.state_dict()),
    }


def _set(key, value, group=0):
    def change(m, opt):
        opt.param_groups[group][key] = value
    return change


def _append_dup(m, opt):
    opt.param_groups[1]["params"].append(opt.param_groups[0]["params"][0])
    opt.param_groups[1]["param_names"].append(opt.param_groups[0]["param_names"][0])


def _set_mode(m, opt):
    opt.mode = "decoupled"


def _grad_is_weight(m, opt):
    w = m[2].weight
    w.grad = w.detach()  # same memory as the weight


def _sparse_grad_in_last_bucket(m, opt):
    w = m[2].weight
    w.grad = torch.randn_like(w).to_sparse()


STEP_CASES = [
    ("l1-neg", "both", _set("l1", -1.0), ValueError, "param_groups[0]['l1'] must be finite and >= 0, got -1.0"),
    ("l1-str-nan", "both", _set("l1", "nan"), TypeError,
     "param_groups[0]['l1'] must be a number, a sequence with one number per parameter or a tensor, got str"),
    ("l2-nan", "both", _set("l2", NAN, group=1), ValueError, "param_groups[1]['l2'] must be finite and >= 0, got nan"),
    ("l2-inf", "both", _set("l2", INF), ValueError, "param_groups[0]['l2'] must be finite and >= 0, got inf"),
    ("l1-tensor-shape", "both", _set("l1", torch.full((2, 2), 0.1)), ValueError,
     "param_groups[0]['l1'] is a tensor of shape (2, 2); expected one value or one per parameter"),
    ("l2-tensor-neg", "both", _set("l2", torch.tensor(-2.0)), ValueError,
     "param_groups[0]['l2'] must be finite and >= 0, got -2.0"),
    ("lr-inf", "proximal", _set("lr", INF), ValueError, "param_groups[0]['lr'] must be finite and >= 0, got inf"),
    ("lr-tensor-neg", "proximal", _set("lr", torch.tensor(-0.5)), ValueError,
     "param_groups[0]['lr'] must be finite and >= 0, got -0.5"),
    ("lr-tensor-nan", "proximal", _set("lr", torch.tensor(NAN)), ValueError,
     "param_groups[0]['lr'] must be finite and >= 0, got nan"),
    ("lr-tensor-shape", "proximal", _set("lr", torch.tensor([1e-2, 1e-2])), ValueError,
     "param_groups[0]['lr'] is a tensor of shape (2,); expected one value"),
    ("lr-missing", "both", lambda m, opt: opt.param_groups[0].pop("lr"), ValueError,
     "param_groups[0] has no 'lr': the optimizer reads 'lr', "),
    ("duplicate-param", "both", _append_dup, ValueError, "that appears earlier in the optimizer; each parameter must appear once"),
    ("mode", "both", _set_mode, ValueError, "mode must be one of ('proximal', 'gradient'), got 'decoupled'"),
    ("grad-is-weight", "gradient", _grad_is_weight, ValueError, "grads[1] shares memory with tensors[1]"),
]


@pytest.mark.parametrize("inner", ["adam", "sgd"])
@pytest.mark.parametrize("mode", ["proximal", "gradient"])
@pytest.mark.parametrize("change, exc, message, modes",
                         [(c[2], c[3], c[4], c[1]) for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_invalid_groups_fail_the_next_step_before_anything_changes(change, exc, message, modes, mode, inner):
    if modes not in ("both", mode):
        pytest.skip(f"a {modes}-mode case")
    m, opt = _trained(mode, inner)
    change(m, opt)
    before = _snapshot(m, opt)
    with _raises(exc, message):
        opt.step()
    assert _same(_snapshot(m, opt), before)


@pytest.mark.parametrize("change, exc, message", [
    (_grad_is_weight, ValueError, "grads[0] shares memory with tensors[0]"),
    (_sparse_grad_in_last_bucket, TypeError, "param_groups[0]['params'][1] has a torch.sparse_coo grad: mode='gradient'"),
])
def test_gradient_mode_checks_every_bucket_before_the_first_writes(change, exc, message):
    # two buckets (float32 and float64): the bad grad is in the second; the
    # first bucket's grads must not have been written either.
    m, opt = _trained("gradient", "sgd", two_dtypes=True)
    assert len(opt._plan().buckets) == 2
    change(m, opt)
    before = _snapshot(m, opt)
    with _raises(exc, message):
        opt.step()
    assert _same(_snapshot(m, opt), before)


def test_load_state_dict_rejects_and_changes_nothing():
    m, opt = _trained("proximal", "adam")
    sd = opt.state_dict()
    before = _snapshot(m, opt)
    bad_mode = dict(sd, pyreg=dict(sd["pyreg"], mode="sparse"))
    with _raises(ValueError, "state dict has unknown mode 'sparse'"):
        opt.load_state_dict(bad_mode)
    bad_group = copy.deepcopy(sd)
    bad_group["param_groups"][1]["l2"] = -3.0
    with _raises(ValueError, "state_dict param_groups[1]['l2'] must be finite and >= 0, got -3.0"):
        opt.load_state_dict(bad_group)
    assert _same(_snapshot(m, opt), before) and opt.mode == "proximal"


def test_add_param_group_rejects_and_adds_nothing():
    m, opt = _trained("proximal", "sgd")
    before = _snapshot(m, opt)
    n = len(opt.param_groups)
    with _raises(ValueError, f"param_groups[{n}]['l1'] must be finite and >= 0, got nan"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "l1": NAN})
    with _raises(TypeError, "param_group must be a dict, got list"):
        opt.add_param_group([nn.Parameter(torch.ones(2))])
    assert len(opt.param_groups) == n and _same(_snapshot(m, opt), before)


def test_duplicate_params_across_groups_at_construction():
    w = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch.optim rejects duplicates across groups itself; duplicates inside
        # one group only warn there, and pyreg rejects them (see test_optim).
        with _raises(ValueError, "some parameters appear in more than one parameter group"):
            pyreg.Regularized(torch.optim.SGD([{"params": [w]}, {"params": [w]}], lr=0.1))
    assert torch.equal(w.detach(), torch.ones(3))


# --------------------------------------------------------------------------
# The CLI (info and routing; demo and bench test their own options)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "extra"], "unrecognized arguments: extra"),
    (["frob"], "invalid choice: 'frob'"),
    ([], "the following arguments are required: command"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_exit_status_in_a_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyreg", "info", "--threads", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --threads 0" in r.stderr


def test_cli_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    """``pyreg info | head -1``: the reader is gone before the output is
    written (here: closed at once, while the command still imports torch)."""
    p = subprocess.Popen([sys.executable, "-m", "pyreg", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


@pytest.mark.parametrize("family", ["fused", "regularized"])
@pytest.mark.parametrize("key, bad", [("lr", float("nan")), ("lr", 10 ** 400), ("eps", -1.0),
                                      ("betas", (0.9, float("nan"))), ("weight_decay", float("inf"))],
                         ids=["lr-nan", "lr-huge-int", "eps-negative", "beta2-nan", "weight-decay-inf"])
def test_a_groups_bad_hyperparameter_raises_when_the_group_is_given(family, key, bad):
    """torch's hyperparameters of a group are checked when the group is given
    (at construction, and by add_param_group, which then adds nothing), as
    each step checks them: torch's constructors check only their defaults."""
    m = nn.Linear(3, 2)

    def make(groups):
        if family == "fused":
            return pyreg.optim.AdamW(groups, lr=0.1)
        return pyreg.Regularized(torch.optim.AdamW(groups, lr=0.1))

    with _raises(ValueError, f"param_groups[0]['{key}']"):
        make([{"params": [m.weight], key: bad}])
    opt = make([{"params": [m.weight]}])
    with _raises(ValueError, f"param_groups[1]['{key}']"):
        opt.add_param_group({"params": [m.bias], key: bad})
    assert len(opt.param_groups) == 1 and all(len(g["params"]) == 1 for g in opt.param_groups)


# --------------------------------------------------------------------------
# A grad or optimizer state that no longer matches its parameter: the fused
# kernels pair elements by position and read each as the param's dtype
# --------------------------------------------------------------------------
FUSED = {
    "SGD": lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9),
    "Adam": lambda g: pyreg.optim.Adam(g, lr=0.01),
    "AdamW": lambda g: pyreg.optim.AdamW(g, lr=0.01, amsgrad=True),
    "Adagrad": lambda g: pyreg.optim.Adagrad(g, lr=0.05),
    "RMSprop": lambda g: pyreg.optim.RMSprop(g, lr=0.01, momentum=0.9, centered=True),
}


def _fused_trained(make, shapes=((6, 5), (3, 6))):
    """A fused optimizer over a small MLP (layer sizes from ``shapes``) after
    four steps, so that its next step takes the kept gather."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(shapes[0][1], shapes[0][0]), nn.ReLU(), nn.Linear(shapes[1][1], shapes[1][0]))
    opt = make(pyreg.param_groups(m, l1=1e-3))
    x = torch.randn(8, shapes[0][1])
    for _ in range(4):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    return m, opt


def _fused_snapshot(m, opt):
    return {"params": _clone(list(m.parameters())), "state": _clone({i: opt.state[p] for i, p in
                                                                     enumerate(m.parameters()) if p in opt.state})}


def _replace_larger_stale_grad(m, opt):
    m[0].weight.data = torch.randn(7, 5)  # its grad stays (6, 5)


def _replace_larger_new_grad(m, opt):
    m[0].weight.data = torch.randn(12, 5)
    m[0].weight.grad = torch.randn(12, 5)


def _replace_smaller_new_grad(m, opt):
    m[2].weight.data = torch.randn(3, 2)
    m[2].weight.grad = torch.randn(3, 2)


def _module_to_float64(m, opt):  # Module.to() replaces each param's memory through .data
    m.double()
    opt.zero_grad()
    m(torch.randn(8, 5, dtype=torch.float64)).square().mean().backward()


def _grad_memory_replaced(m, opt):
    m[0].weight.grad.data = torch.randn(3)


def _grad_of_another_dtype(m, opt):
    m[0].weight.grad.data = m[0].weight.grad.data.double()  # (torch's .grad setter refuses it; .data does not)


def _state_of_another_model(m, opt):
    # the same number of parameters, other shapes: layer 0 is (5, 6) there, layer 2 (3, 5)
    _, other = _fused_trained(lambda g: type(opt)(g, **{k: v for k, v in opt.defaults.items()
                                                       if k in ("lr", "momentum", "centered", "amsgrad")}),
                              shapes=((5, 5), (3, 5)))
    opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("change, message", [
    (_replace_larger_stale_grad, "parameter 0 ('0.weight') is (7, 5) torch.float32 on cpu but its grad is (6, 5)"),
    (_replace_larger_new_grad, "parameter 0 ('0.weight') is (12, 5) torch.float32 on cpu but its state "),
    (_replace_smaller_new_grad, "parameter 1 ('2.weight') is (3, 2) torch.float32 on cpu but its state "),
    (_module_to_float64, "is (6, 5) torch.float64 on cpu but its state "),
    (_grad_memory_replaced, "parameter 0 ('0.weight') is (6, 5) torch.float32 on cpu but its grad is (3,)"),
    (_state_of_another_model, "parameter 0 ('0.weight') is (6, 5) torch.float32 on cpu but its state "),
    (_grad_of_another_dtype, "parameter 0 ('0.weight') is (6, 5) torch.float32 on cpu but its grad is (6, 5) "
                             "torch.float64"),
], ids=["larger-stale-grad", "larger-new-grad", "smaller-new-grad", "module-to-float64", "grad-memory",
        "state-of-another-model", "grad-dtype"])
@pytest.mark.parametrize("name", list(FUSED))
def test_a_grad_or_state_unlike_its_param_raises_and_changes_nothing(name, change, message):
    m, opt = _fused_trained(FUSED[name])
    change(m, opt)
    before = _fused_snapshot(m, opt)
    with _raises(ValueError, message):
        opt.step()
    assert _same(_fused_snapshot(m, opt), before)
    with _raises(ValueError, message):  # and again: nothing was kept from the failed step
        opt.step()


def _first_step_that_raises(name, how, fail):
    """A model's dense weight and a sparse embedding under FUSED[name] (SGD
    with dampening, whose momentum buffer starts from the grad); ``fail``:
    the first step has the embedding's sparse grad, which ``how`` makes
    raise: "own check" (a max_norm group, which the fused kernels apply and
    sparse grads cannot take) or "torch's step" (torch's fused step, or its
    algorithm, refuses sparse grads). Returns the weight after a clean step
    (the embedding's grad dropped) and the optimizer's state dict after it;
    checks that the failed step left the state as it was."""
    torch.manual_seed(0)
    w, e = nn.Parameter(torch.randn(3, 4)), nn.Embedding(5, 4, sparse=True)
    group = {"params": [w, e.weight], "l1": 1e-3}
    if how == "own check":
        group["max_norm"] = 100.0
    kw = {"fused": True} if how == "torch's step" and name in ("SGD", "Adagrad") else {}
    if name == "SGD":
        opt = pyreg.optim.SGD([group], lr=0.05, momentum=0.9, dampening=0.5, **kw)
    else:
        opt = FUSED[name]([group])
        opt.param_groups[0].update(kw)
    def state():  # (torch's own step leaves an empty entry for a param it refuses, as without pyreg)
        return _clone({p: v for p, v in opt.state.items() if v})

    before = state()  # (Adagrad makes its sums at construction, as torch's)
    if fail:
        w.grad = torch.randn(3, 4)
        e(torch.tensor([0, 3])).sum().backward()
        with pytest.raises((ValueError, RuntimeError)):
            opt.step()
        assert _same(state(), before)
        e.weight.grad = None
    w.grad = torch.ones(3, 4)
    opt.step()
    return w.detach().clone(), opt.state_dict()


@pytest.mark.parametrize("how", ["own check", "torch's step"])
@pytest.mark.parametrize("name", list(FUSED))
def test_a_first_step_that_raises_leaves_no_state(name, how):
    """The state a step makes for a parameter's first step (SGD's momentum
    buffer, which the next step would take for one with history; Adam's
    moments and counter) is taken back when the step raises, whether
    pyreg's checks or torch's own step (for the parameters the kernels do
    not take) raise: the next step is a first step, as in a run without the
    failed one."""
    clean, clean_sd = _first_step_that_raises(name, how, fail=False)
    got, sd = _first_step_that_raises(name, how, fail=True)
    assert torch.equal(got, clean)
    assert _same(*({i: v for i, v in d["state"].items() if v} for d in (sd, clean_sd)))


FUNCTIONAL_CASES = [
    ("grad shape", lambda w, g, s, t: pyreg.optim.functional.adam(w, [g[0][:5]], s[0], s[1], [], t, lr=0.1),
     "grads[0] is (5,) torch.float32 on cpu but params[0] is (10,) torch.float32 on cpu"),
    ("state dtype", lambda w, g, s, t: pyreg.optim.functional.adam(w, g, s[0], [s[1][0].double()], [], t, lr=0.1),
     "exp_avg_sqs[0] is (10,) torch.float64 on cpu but params[0] is (10,) torch.float32 on cpu"),
    ("state device", lambda w, g, s, t: pyreg.optim.functional.adagrad(
        w, g, [torch.empty(10, device="meta")], t, lr=0.1), "state_sums[0] is a meta tensor"),
    ("a list short", lambda w, g, s, t: pyreg.optim.functional.adam(w, g, s[0], [], [], t, lr=0.1),
     "got 1 params but 0 exp_avg_sqs"),
    ("amsgrad without its list", lambda w, g, s, t: pyreg.optim.functional.adam(
        w, g, s[0], s[1], [], t, lr=0.1, amsgrad=True), "got 1 params but 0 max_exp_avg_sqs"),
    ("no step counters", lambda w, g, s, t: pyreg.optim.functional.rmsprop(w, g, s[0], [], [], [], lr=0.1),
     "got 1 params but 0 state_steps"),
    ("an empty step counter", lambda w, g, s, t: pyreg.optim.functional.adam(
        w, g, s[0], s[1], [], [torch.zeros(0)], lr=0.1), "state_steps[0] is (0,) torch.float32 on cpu"),
    ("an int step counter", lambda w, g, s, t: pyreg.optim.functional.adam(
        w, g, s[0], s[1], [], [torch.zeros((), dtype=torch.int64)], lr=0.1), "state_steps[0] is () torch.int64"),
    ("a momentum buffer's shape", lambda w, g, s, t: pyreg.optim.functional.sgd(
        w, g, [torch.zeros(4)], lr=0.1, momentum=0.9),
     "momentum_buffer_list[0] is (4,) torch.float32 on cpu but params[0] is (10,)"),
    ("momentum buffers short", lambda w, g, s, t: pyreg.optim.functional.sgd(w, g, [], lr=0.1, momentum=0.9),
     "got 1 params but 0 momentum_buffer_list entries"),
    ("a negative l1", lambda w, g, s, t: pyreg.optim.functional.sgd(w, g, [], lr=0.1, l1=-1.0),
     "l1 must be finite and >= 0, got -1.0"),
    ("a NaN l2", lambda w, g, s, t: pyreg.optim.functional.adam(w, g, s[0], s[1], [], t, lr=0.1, l2=float("nan")),
     "l2 must be finite and >= 0, got nan"),
    ("a negative lr", lambda w, g, s, t: pyreg.optim.functional.adagrad(w, g, s[0], t, lr=-0.1),
     "lr must be finite and >= 0, got -0.1"),
    ("a beta of 1.5", lambda w, g, s, t: pyreg.optim.functional.adam(w, g, s[0], s[1], [], t, lr=0.1, beta1=1.5),
     "beta1 must be in [0, 1), got 1.5"),
    ("a negative eps", lambda w, g, s, t: pyreg.optim.functional.rmsprop(w, g, s[0], [], [], t, lr=0.1, eps=-1.0),
     "eps must be finite and >= 0, got -1.0"),
    ("a new momentum buffer, then a bad lr", lambda w, g, s, t: pyreg.optim.functional.sgd(
        w, g, [None], lr=float("inf"), momentum=0.9), "lr must be finite and >= 0, got inf"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in FUNCTIONAL_CASES], ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_steps_check_their_lists_and_change_nothing(call, message):
    w, g = _inputs()
    w, g = w[:1], g[:1]
    s = ([torch.rand(10)], [torch.rand(10)])
    t = [torch.full((), 3.0)]
    before = _clone((w, g, s, t))
    with _raises(ValueError, message):
        call(w, g, s, t)
    assert _same((w, g, s, t), before)


STRUCTURED = {
    "ref": lambda m: pyreg.param_groups(m, l2=0.1, ref=copy.deepcopy(m)),
    "group": lambda m: pyreg.param_groups(m, overrides={"0.weight": {"group_l1": 0.1, "group_dim": 1}}),
    "max_norm": lambda m: pyreg.param_groups(m, overrides={"0.weight": {"max_norm": 0.5, "max_norm_dim": 1}}),
}


@pytest.mark.parametrize("kind, replacement, message", [
    ("ref", (7, 4), "param_groups[0]['ref'][0] is (5, 4) torch.float32 on cpu but its parameter is (7, 4)"),
    ("group", (9,), "param_groups[0]['group_dim']=1 is out of range for tensors[0] of shape (9,)"),
    ("max_norm", (9,), "param_groups[0]['max_norm_dim']=1 is out of range for tensors[0] of shape (9,)"),
])
@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_a_param_replaced_through_data_that_its_setting_no_longer_fits_raises_before_the_step(family, kind,
                                                                                             replacement, message):
    """SGD without momentum (no state to mismatch): the plan's group dimension or
    ref no longer fits the param, and the step raises before the update (it used
    to raise in the structured pass, after the update had changed the weights)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    groups = STRUCTURED[kind](m)
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1)) if family == "Regularized" else \
        pyreg.optim.SGD(groups, lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    m[0].weight.data = torch.randn(replacement)
    m[0].weight.grad = torch.randn(replacement)
    before = _fused_snapshot(m, opt)
    with _raises(ValueError, message):
        opt.step()
    assert _same(_fused_snapshot(m, opt), before)


@pytest.mark.parametrize("how", ["resize_", "set_", "data"])
@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_a_ref_resized_in_place_raises_before_the_step(family, how):
    """A ref tensor reshaped in place (no version bump, the same object), or
    given another dtype through ``.data``, is checked against its parameter
    again before anything changes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    ref = torch.zeros(3, 4)
    groups = [{"params": [m[0].weight], "l1": 0.1, "ref": [ref]}, {"params": [m[0].bias]}]
    opt = pyreg.Regularized(torch.optim.Adam(groups, lr=0.1)) if family == "Regularized" else \
        pyreg.optim.Adam(groups, lr=0.1)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    if how == "resize_":
        ref.resize_(2, 2)
    elif how == "set_":
        ref.set_(torch.zeros(6))
    else:
        ref.data = torch.zeros(3, 4, dtype=torch.float64)
    before = _fused_snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['ref'\]\[0\] is "
                                         r"\((2, 2|6,|3, 4)\) torch.float(32|64) on cpu but its parameter"):
        opt.step()
    assert _same(_fused_snapshot(m, opt), before)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("key, value, exc, message", [
    ("l1", lambda: torch.tensor([0.1, 0.2]).to_sparse(), TypeError,
     "param_groups[0]['l1'] is a tensor of layout torch.sparse_coo; a coefficient is a number"),
    ("l2", lambda: torch.tensor([[0.1, 0.2]]).to_sparse_csr(), TypeError,
     "param_groups[0]['l2'] is a tensor of layout torch.sparse_csr; a coefficient is a number"),
    ("l1", lambda: torch.tensor(0.1, device="meta"), ValueError,
     "param_groups[0]['l1'] is a meta tensor: it has no values"),
    ("l2", lambda: torch.empty(2, device="meta"), ValueError,
     "param_groups[0]['l2'] is a meta tensor: it has no values"),
    ("target_sparsity", lambda: torch.tensor([0.1, 0.2]).to_sparse(), TypeError,
     "param_groups[0]['target_sparsity'] is a tensor of layout torch.sparse_coo"),
    ("l2_mu", lambda: torch.tensor(0.1, device="meta"), ValueError,
     "param_groups[0]['l2_mu'] is a meta tensor: it has no values"),
    ("lr", lambda: torch.tensor(0.1).to_sparse(), TypeError,
     "param_groups[0]['lr'] is a tensor of layout torch.sparse_coo"),
    ("ref", lambda: [torch.zeros(3, 4).to_sparse(), None], TypeError,
     "param_groups[0]['ref'][0] is a tensor of layout torch.sparse_coo; a reference is a dense"),
], ids=["l1-sparse", "l2-csr", "l1-meta-0d", "l2-meta", "target-sparse", "l2_mu-meta", "lr-sparse", "ref-sparse"])
@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_a_tensor_setting_without_values_raises_a_clear_error_and_changes_nothing(family, key, value, exc,
                                                                                 message):
    """A sparse or meta tensor set as a coefficient (or an lr, or a ref)
    after construction: the next step names the key, before anything changes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    groups = pyreg.param_groups(m, l1=1e-2, l2=1e-3)
    opt = pyreg.Regularized(torch.optim.Adam(groups, lr=0.1)) if family == "Regularized" else \
        pyreg.optim.Adam(groups, lr=0.1)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.param_groups[0][key] = value()
    before = _fused_snapshot(m, opt)
    with _raises(exc, message):
        opt.step()
    assert _same(_fused_snapshot(m, opt), before)


@pytest.mark.parametrize("family", ["Regularized", "fused"])
def test_a_param_replaced_through_data_with_a_shape_its_setting_fits_steps_on_its_new_shape(family):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    groups = pyreg.param_groups(m, overrides={"0.weight": {"target_sparsity": 0.5}})
    opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1)) if family == "Regularized" else \
        pyreg.optim.SGD(groups, lr=0.1)
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    m[0].weight.data = torch.randn(9, 7)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert int((m[0].weight == 0).sum()) == math.ceil(0.5 * 63)


# --------------------------------------------------------------------------
# Values set after construction that only the step's own checks see
# --------------------------------------------------------------------------
def _both_families():
    def fused(groups):
        return pyreg.optim.AdamW(groups, lr=1e-2)

    def wrapped(groups):
        return pyreg.Regularized(torch.optim.AdamW(groups, lr=1e-2))

    def gradient(groups):
        return pyreg.Regularized(torch.optim.AdamW(groups, lr=1e-2), mode="gradient")
    return pytest.mark.parametrize("make", [fused, wrapped, gradient], ids=["fused", "regularized", "gradient"])


def _stepped(make, ref=None):
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    group = {"params": [w, v], "l1": 1e-3}
    if ref is not None:
        group["ref"] = ref
    opt = make([group])
    w.grad, v.grad = torch.randn(4, 3), torch.randn(5)
    opt.step()
    w.grad, v.grad = torch.randn(4, 3), torch.randn(5)
    return (w, v), opt


def _snap(ps, opt):
    return {"params": _clone(list(ps)), "grads": _clone([p.grad for p in ps]),
            "state": _clone({i: dict(opt.state[p]) for i, p in enumerate(ps) if p in opt.state})}


@_both_families()
@pytest.mark.parametrize("which", ["itself", "a view", "the other parameter"])
def test_a_ref_sharing_memory_with_a_parameter_is_refused_before_the_step(make, which):
    """A reference is read while the step writes every parameter: one that
    shares memory with a parameter (its own, a view of it, another) raises,
    naming both, before anything changes; at construction too."""
    (w, v), opt = _stepped(make)
    ref = {"itself": w, "a view": w.detach()[:], "the other parameter": v.detach()[:4].view(4, 1).expand(4, 3)}[which]
    opt.param_groups[0]["ref"] = [ref, None]
    before = _snap((w, v), opt)
    with _raises(ValueError, "param_groups[0]['ref'][0] shares memory with parameter"):
        opt.step()
    assert _same(_snap((w, v), opt), before)
    with _raises(ValueError, "param_groups[0]['ref'][0] shares memory with parameter"):
        make([{"params": [w, v], "l1": 1e-3, "ref": [ref, None]}])
    opt.param_groups[0]["ref"] = [w.detach().clone(), None]  # a copy is what a reference is
    opt.step()


@_both_families()
def test_a_non_tensor_ref_entry_names_its_key(make):
    (w, v), opt = _stepped(make)
    opt.param_groups[0]["ref"] = [0.0, None]
    before = _snap((w, v), opt)
    with _raises(TypeError, "param_groups[0]['ref'][0] is a float, not a tensor or None"):
        opt.step()
    assert _same(_snap((w, v), opt), before)


@_both_families()
@pytest.mark.parametrize("change, exc, message", [
    (lambda g: g.update(params=g["params"][0]), TypeError, "param_groups[0]['params'] must be a list of tensors, got Parameter"),
    (lambda g: g.update(params=[1.0, g["params"][1]]), TypeError,
     "param_groups[0]['params'] must be a list of tensors, got a list holding a float"),
    (lambda g: g.pop("betas"), ValueError, "param_groups[0] has no 'betas'"),
    (lambda g: g.pop("weight_decay"), ValueError, "param_groups[0] has no 'weight_decay'"),
    (lambda g: g.update(betas=None), ValueError, "param_groups[0]['betas'] must be a pair (beta1, beta2), got None"),
], ids=["a-bare-tensor", "a-float-among-them", "betas-deleted", "weight-decay-deleted", "betas-none"])
def test_a_broken_group_raises_naming_it_before_anything_changes(make, change, exc, message):
    """params replaced by a bare tensor (the step iterated its rows: nothing
    was updated, silently), a hyperparameter deleted or set to None (a bare
    KeyError or TypeError, and in gradient mode the grads were left changed
    to rounding): a clear error, and nothing changes."""
    (w, v), opt = _stepped(make)
    change(opt.param_groups[0])
    before = _snap((w, v), opt)
    with _raises(exc, message):
        opt.step()
    assert _same(_snap((w, v), opt), before)


@pytest.mark.parametrize("cls", [pyreg.optim.Adam, pyreg.optim.AdamW, pyreg.optim.Adagrad, pyreg.optim.RMSprop])
def test_preconditioned_changed_after_construction_takes_effect(cls):
    """preconditioned switched after construction (either way) applies from
    the next step, as if the optimizer had been made with it."""
    def run(first, then):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 8))
        opt = cls([{"params": [w], "l1": 0.5, "preconditioned": first}], lr=1e-2)
        opt.param_groups[0]["preconditioned"] = then
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            w.grad = torch.randn(8, 8, generator=gen)
            opt.step()
        return w.detach().clone()
    assert torch.equal(run(False, True), run(True, True))
    assert torch.equal(run(True, False), run(False, False))
    assert not torch.equal(run(False, True), run(False, False))


@pytest.mark.parametrize("maximize", [True, 1, "yes"])
def test_gradient_mode_reads_maximize_as_torch_does(maximize):
    """A truthy maximize (torch's step reads it so) makes the inner step
    ascend: the penalty gradient still pulls the weights toward zero."""
    w = nn.Parameter(torch.full((3,), 1.0))
    opt = pyreg.Regularized(torch.optim.SGD([{"params": [w], "l1": 1.0}], lr=0.1), mode="gradient")
    opt.param_groups[0]["maximize"] = maximize
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 0.9))


def _bad_load_cases():
    def set_(key, value):
        return lambda sd: sd["param_groups"][0].update({key: value})
    return [
        ("lr-nan", set_("lr", float("nan")), "param_groups[0]['lr'] must be finite and >= 0, got nan"),
        ("beta1-above-1", set_("betas", (1.5, 0.999)), "param_groups[0]['betas'][0] must be in [0, 1), got 1.5"),
        ("eps-negative", set_("eps", -1.0), "param_groups[0]['eps'] must be finite and >= 0, got -1.0"),
        ("group-dim-out-of-range", lambda sd: sd["param_groups"][0].update(group_l1=0.1, group_dim=7),
         "group_dim"),
        ("ref-of-another-shape", set_("ref", [torch.zeros(3), None]), "param_groups[0]['ref'][0] is (3,)"),
    ]


@pytest.mark.parametrize("family", ["fused", "regularized"])
@pytest.mark.parametrize("mutate, message", [c[1:] for c in _bad_load_cases()], ids=[c[0] for c in _bad_load_cases()])
def test_load_state_dict_checks_what_a_step_checks(family, mutate, message):
    """A state dict that every later step would refuse (torch's
    hyperparameters, the parameters against the keys) raises at the load,
    and the optimizer keeps what it had: its next step is the step it would
    have taken."""
    make = (lambda gs: pyreg.optim.AdamW(gs, lr=1e-2)) if family == "fused" else \
        (lambda gs: pyreg.Regularized(torch.optim.AdamW(gs, lr=1e-2)))
    (w, v), opt = _stepped(make)
    (w2, v2), twin = _stepped(make)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    before = _snap((w, v), opt)
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(sd)
    assert message in str(e.value)
    assert _same(_snap((w, v), opt), before)
    opt.step()
    twin.step()
    assert torch.equal(w, w2) and torch.equal(v, v2)


@pytest.mark.parametrize("family", ["fused", "regularized"])
def test_a_state_dict_that_torchs_own_load_refuses_changes_nothing(family):
    """A state dict of another torch optimizer (SGD with momentum, into
    Adam) makes torch's own load raise after it set the new groups and
    state: the optimizer keeps what it had, its groups included, and its
    next step is the step it would have taken."""
    make = (lambda gs: pyreg.optim.Adam(gs, lr=1e-2)) if family == "fused" else \
        (lambda gs: pyreg.Regularized(torch.optim.Adam(gs, lr=1e-2)))
    other = (lambda gs: pyreg.optim.SGD(gs, lr=1e-2, momentum=0.9)) if family == "fused" else \
        (lambda gs: pyreg.Regularized(torch.optim.SGD(gs, lr=1e-2, momentum=0.9)))
    (w, v), opt = _stepped(make)
    (w2, v2), twin = _stepped(make)
    sd = copy.deepcopy(_stepped(other)[1].state_dict())
    before = _snap((w, v), opt)
    groups = [{k: x for k, x in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match="does not fit Adam: its state has no entry 'step'"):
        opt.load_state_dict(sd)
    assert _same(_snap((w, v), opt), before)
    assert [{k: x for k, x in g.items() if k != "params"} for g in opt.param_groups] == groups
    opt.step()
    twin.step()
    assert torch.equal(w, w2) and torch.equal(v, v2)


def test_regularized_load_state_dict_checks_the_mode_and_the_metric():
    """Regularized: a loaded group that sets preconditioned (the wrapper has
    no metric), or target_sparsity with a loaded mode='gradient', raises at
    the load; the mode and groups stay."""
    (w, v), opt = _stepped(lambda gs: pyreg.Regularized(torch.optim.AdamW(gs, lr=1e-2)))
    good = opt.state_dict()
    sd = copy.deepcopy(good)
    sd["param_groups"][0]["preconditioned"] = True
    with _raises(ValueError, "param_groups[0] sets preconditioned"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(good)
    sd["pyreg"]["mode"] = "gradient"
    sd["param_groups"][0].update(target_sparsity=0.5, l1=0.0)
    with _raises(ValueError, "use mode='proximal'"):
        opt.load_state_dict(sd)
    assert opt.mode == "proximal" and "target_sparsity" not in opt.param_groups[0] or \
        opt.param_groups[0].get("target_sparsity") is None
    opt.step()


def test_regularized_add_param_group_checks_the_defaults_it_fills_in():
    """add_param_group fills a group's l1/l2 from the wrapper's attributes,
    which may have been set since construction: checked with the group."""
    (w, v), opt = _stepped(lambda gs: pyreg.Regularized(torch.optim.AdamW(gs, lr=1e-2)))
    opt.l1 = -1.0
    n = len(opt.param_groups)
    with _raises(ValueError, f"param_groups[{n}]['l1'] must be finite and >= 0, got -1.0"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    assert len(opt.param_groups) == n


def test_a_misspelt_key_warning_points_at_the_users_line():
    """The near-miss warning names the line that made the optimizer or added
    the group (not a line inside torch.optim or pyreg), for both families."""
    w = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = pyreg.optim.AdamW([{"params": [w], "l11": 0.1}], lr=1e-3)
        pyreg.Regularized(torch.optim.SGD([{"params": [nn.Parameter(torch.ones(2))], "l11": 0.1}], lr=0.1))
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "max_norms": 1.0})
    near = [r for r in rec if "which nothing reads" in str(r.message)]
    assert len(near) == 3 and {r.filename for r in near} == {__file__}


def test_the_ref_error_names_only_regularized_parameters():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as e:
        pyreg.param_groups(m, l2=0.1, ref={"foo.weight": torch.zeros(3)})
    assert "['0.weight', '2.weight']" in str(e.value) and "bias" not in str(e.value).split("ref's names")[0]


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu", "torch"])
def test_gradient_mode_checks_every_buckets_grad_pairing_before_writing(backend):
    """Gradient mode with two buckets (float32, float64): a grad of the wrong
    dtype in the second raises before the first bucket's grads are written
    (a retry added the penalty to them twice)."""
    if backend == "cuda-emu" and not pyreg.backends.cuda_emu.compiled():
        pytest.skip("no emulated CUDA build")
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = pyreg.Regularized(torch.optim.SGD([a, b], lr=0.1), mode="gradient", l1=0.1, l2=0.1)
    a.grad, b.grad = torch.ones(4, 3), torch.ones(5, 3, dtype=torch.float64)
    b.grad.data = torch.ones(5, 3)  # float32: the setter would refuse it
    before = _clone([a, b, a.grad, b.grad])
    with pyreg.use_backend(backend), _raises(ValueError, "has a grad of (5, 3) torch.float32 on cpu"):
        opt.step()
    assert _same(_clone([a, b, a.grad, b.grad]), before)


@pytest.mark.parametrize("cls", [pyreg.optim.SGD, pyreg.optim.Adam])
def test_a_grad_reshaped_in_place_is_refused_at_every_step(cls):
    """A grad of its parameter's size but another shape (set through .data):
    refused at the first step and at every later one (the kept gather
    compared sizes only and stepped it, pairing elements in flat order)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    opt = cls([p], lr=0.1, l1=0.01)
    for _ in range(3):
        p.grad = torch.randn(5, 3)
        opt.step()
    p.grad = torch.zeros(5, 3)
    p.grad.data = torch.arange(15.0).reshape(3, 5)
    before = _clone([p, opt.state[p]] if opt.state[p] else [p])
    with _raises(ValueError, "is (5, 3) torch.float32 on cpu but its grad is (3, 5)"):
        opt.step()
    assert _same(_clone([p, opt.state[p]] if opt.state[p] else [p]), before)


def test_gradient_mode_refuses_a_sparse_grad_by_name_and_changes_nothing():
    torch.manual_seed(0)
    lin, emb = nn.Linear(3, 3, bias=False), nn.Embedding(10, 3, sparse=True)
    opt = pyreg.Regularized(torch.optim.SGD([{"params": [lin.weight, emb.weight], "l1": 0.1}], lr=0.1),
                            mode="gradient")
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = _snap((lin.weight, emb.weight), opt)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] has a torch.sparse_coo grad: "
                                        r"mode='gradient' .* use mode='proximal'"):
        opt.step()
    assert _same(_snap((lin.weight, emb.weight), opt), before)


COEF_ALIAS = [
    ("prox_", lambda a, b: pyreg.prox_([a, b], l1=a), "l1 shares memory with tensors[0]"),
    ("prox_ lr", lambda a, b: pyreg.prox_([a, b], l1=0.1, lr=b), "lr shares memory with tensors[1]"),
    ("group_prox_", lambda a, b: pyreg.group_prox_([a, b], l1=a, dim=0), "l1 shares memory with tensors[0]"),
    ("max_norm_", lambda a, b: pyreg.max_norm_([a, b], b, dim=0), "max_value shares memory with tensors[1]"),
    ("add_penalty_grad_", lambda a, b: pyreg.add_penalty_grad_(
        [torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)], [a, b], l1=a),
     "l1 shares memory with grads[0]"),
    ("add_group_penalty_grad_", lambda a, b: pyreg.add_group_penalty_grad_(
        [torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)], [a, b], l1=b, dim=0),
     "l1 shares memory with grads[1]"),
]


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu", "torch"])
@pytest.mark.parametrize("name, call, message", COEF_ALIAS, ids=[c[0] for c in COEF_ALIAS])
def test_a_coefficient_tensor_sharing_memory_with_a_written_tensor_is_refused(backend, name, call, message):
    """An op reads a per-tensor coefficient tensor while it writes its
    tensors (or grads): one that is one of them would be read half written
    (the backends gave different results). Refused, nothing changed."""
    if backend == "cuda-emu" and not pyreg.backends.cuda_emu.compiled():
        pytest.skip("this build has no emulator")
    a = torch.tensor([0.5, 0.8], dtype=torch.float64)
    b = torch.tensor([0.3, 0.9], dtype=torch.float64)
    before = (a.clone(), b.clone())
    with pyreg.use_backend(backend), _raises(ValueError, message):
        call(a, b)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
