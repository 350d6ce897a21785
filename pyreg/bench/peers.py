"""The benchmarked ops, each implemented by every peer.

Peers compute the same thing as pyreg on the same tensor list:

* ``loop``: a Python loop of ordinary torch ops, one tensor at a time, written
  the way a careful user would (fused torch ops where torch has them, e.g.
  ``softshrink`` for the soft-threshold);
* ``foreach``: ``torch._foreach_*`` multi-tensor ops;
* ``compile``: ``torch.compile`` of the loop (one graph over the whole list);
* ``pyreg``: the op itself (per-tensor coefficients as a prebuilt 1-D tensor).

The group ops (``group_prox_``, ``max_norm_``) act on the tensors of two or
more dimensions only (see :data:`GROUP_DIM`): a group is a slice along the
group dimension, its norm taken over the other dimensions. Their ``foreach``
peer takes each tensor's group norms with one ``vector_norm`` call per tensor
(``torch._foreach_norm`` only gives whole-tensor norms), computes the factors
with ``torch._foreach_*`` ops on the list of norm tensors, and scales with one
``torch._foreach_mul_(ws, factors)`` (broadcast per tensor).

pyreg does strictly more work than the peers in four ops: ``add_penalty_grad_``
also returns the penalty value, ``prox_`` and ``group_prox_`` the nonzero
counts and ``max_norm_`` the count of clipped groups, from the same passes; the
peers compute only the update.

The reference ops (``roofline``, ``copy``) move the same bytes over one flat
buffer: see :data:`ROOFLINE`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import pyreg
from pyreg._tolerance import TOLERANCES, tolerance

INF = float("inf")

# ---------------------------------------------------------------------------
# Coefficients: distinct per tensor, small enough that repeated in-place calls
# keep the data realistic (see bench/README.md).
# ---------------------------------------------------------------------------
LR = 1e-3          # prox_ step size (a typical AdamW lr)
W_SCALE = 0.02     # weights ~ N(0, 0.02^2): GPT-2's init scale
G_SCALE = 1e-3     # grads ~ N(0, 1e-3^2)


# The optimizer step (op "step"): AdamW(lr=LR, weight_decay=STEP_WEIGHT_DECAY)
# with L1 STEP_L1 applied as a prox after the update: threshold lr*l1 = 1e-6.
# Adam's first step moves each weight by about lr, so after one step from
# N(0, 0.02^2) weights about 4e-5 of them land within the threshold and become
# exactly 0 (the check compares those zeros).
STEP_WEIGHT_DECAY = 0.01
STEP_L1 = 1e-3
# pyreg's fused AdamW; Regularized around torch's AdamW; torch's AdamW alone
# (weight decay, no L1); torch's AdamW then the Python-loop prox (prox_loop).
STEP_PEERS = ("pyreg", "regularized", "bare", "loop")
#: The step peers left out first where a GPU cannot hold them all side by side.
STEP_DROP_ORDER = ("loop", "regularized")


def coefficients(n: int) -> Tuple[List[float], List[float]]:
    l1 = [1e-3 * (1.0 + 0.37 * (i % 11)) for i in range(n)]
    l2 = [1e-4 * (1.0 + 0.53 * (i % 13)) for i in range(n)]
    return l1, l2


# The group dimension of the group ops, for every tensor of two or more
# dimensions (1-D tensors, biases and norm scales, are left out of these rows:
# a 1-D tensor's groups along dim 0 are single elements). group_prox_: dim 1,
# the input columns of an nn.Linear weight (input-feature / channel pruning);
# max_norm_: dim 0, each output neuron's incoming weights (Keras' MaxNorm).
GROUP_DIM = {"group_prox_": 1, "max_norm_": 0}


def group_size(shape: Sequence[int], dim: int) -> int:
    """Elements per group: the product of the other dimensions."""
    return math.prod(shape) // shape[dim] if shape[dim] else 0


def median_group_norm(shape: Sequence[int], dim: int, scale: float = W_SCALE) -> float:
    """The median L2 norm of a group of ``group_size`` N(0, scale^2) values
    (the chi distribution's median, Wilson-Hilferty): max_norm_'s max_value,
    so that about half of the fresh groups are clipped."""
    k = max(1, group_size(shape, dim))
    return scale * math.sqrt(k * (1.0 - 2.0 / (9.0 * k)) ** 3)


# ---------------------------------------------------------------------------
# Loops (also what torch.compile compiles)
# ---------------------------------------------------------------------------
def stats_loop(ws: List[Tensor]):
    l1, l2, linf, nnz = [], [], [], []
    for w in ws:
        l1.append(torch.linalg.vector_norm(w, 1))
        l2.append(torch.linalg.vector_norm(w, 2))
        linf.append(torch.linalg.vector_norm(w, INF))
        nnz.append(torch.count_nonzero(w))
    return torch.stack(l1), torch.stack(l2), torch.stack(linf), torch.stack(nnz)


def apg_loop(ws: List[Tensor], gs: List[Tensor], l1: List[float], l2: List[float]):
    for w, g, a, b in zip(ws, gs, l1, l2):
        g.add_(torch.sign(w), alpha=a).add_(w, alpha=2.0 * b)


def prox_loop(ws: List[Tensor], thresholds: List[float], scales: List[float]):
    for w, t, s in zip(ws, thresholds, scales):
        torch.mul(F.softshrink(w, t), s, out=w)


def _group_norm(w: Tensor, d: int) -> Tensor:
    """||w_g||_2 of every group along dim d, kept broadcastable against w;
    a zero norm is raised to the smallest normal number (t / n stays finite
    or +inf, never NaN)."""
    n = torch.linalg.vector_norm(w, 2, dim=[i for i in range(w.dim()) if i != d], keepdim=True)
    return n.clamp_min_(torch.finfo(n.dtype).tiny)


def group_prox_loop(ws: list[Tensor], dims: list[int], thresholds: list[float]):
    for w, d, t in zip(ws, dims, thresholds):
        w.mul_(torch.clamp(1.0 - t / _group_norm(w, d), min=0.0))


def max_norm_loop(ws: list[Tensor], dims: list[int], max_values: list[float]):
    for w, d, m in zip(ws, dims, max_values):
        w.mul_(torch.clamp(m / _group_norm(w, d), max=1.0))


# ---------------------------------------------------------------------------
# foreach
# ---------------------------------------------------------------------------
def stats_foreach(ws: List[Tensor]):
    out = [torch.stack(torch._foreach_norm(ws, o)) for o in (1, 2, INF, 0)]
    return out[0], out[1], out[2], out[3].to(torch.int64)


def apg_foreach(ws, gs, l1, two_l2):
    s = torch._foreach_sign(ws)
    torch._foreach_mul_(s, l1)
    torch._foreach_add_(gs, s)
    del s
    t = torch._foreach_mul(ws, two_l2)
    torch._foreach_add_(gs, t)


def prox_foreach(ws, thresholds, scales):
    s = torch._foreach_sign(ws)
    torch._foreach_mul_(s, scales)
    torch._foreach_abs_(ws)
    torch._foreach_sub_(ws, thresholds)
    torch._foreach_clamp_min_(ws, 0.0)
    torch._foreach_mul_(ws, s)


def group_prox_foreach(ws, dims, thresholds):
    f = torch._foreach_reciprocal([_group_norm(w, d) for w, d in zip(ws, dims)])
    torch._foreach_mul_(f, [-t for t in thresholds])  # -t / n
    torch._foreach_add_(f, 1.0)
    torch._foreach_clamp_min_(f, 0.0)
    torch._foreach_mul_(ws, f)


def max_norm_foreach(ws, dims, max_values):
    f = torch._foreach_reciprocal([_group_norm(w, d) for w, d in zip(ws, dims)])
    torch._foreach_mul_(f, max_values)  # m / n
    torch._foreach_clamp_max_(f, 1.0)
    torch._foreach_mul_(ws, f)


# ---------------------------------------------------------------------------
# Op descriptions
# ---------------------------------------------------------------------------
@dataclass
class OpSpec:
    name: str
    bytes_per_elem: int            # in units of the element size: 1 = read w
    roofline: str                  # the flat-buffer op with the same traffic
    description: str
    mutates: Tuple[str, ...] = ()  # which inputs are written ("ws", "gs")
    peers: Tuple[str, ...] = ("pyreg", "loop", "foreach", "compile")
    foreach_what: str = "torch._foreach_*"
    group_dim: int | None = None  # group ops: over the tensors of 2+ dims only

    @property
    def matrices_only(self) -> bool:
        return self.group_dim is not None


OPS: Dict[str, OpSpec] = {
    "weight_stats": OpSpec("weight_stats", 1, "sum",
                           "per tensor sum|w|, sqrt(sum w^2), max|w|, count w!=0"),
    "add_penalty_grad_": OpSpec("add_penalty_grad_", 3, "add_",
                                "g += l1*sign(w) + 2*l2*w, per-tensor l1, l2", mutates=("gs",)),
    "prox_": OpSpec("prox_", 2, "mul_",
                    "w <- sign(w)*max(|w|-lr*l1, 0)/(1+2*lr*l2), per-tensor l1, l2", mutates=("ws",)),
    "group_prox_": OpSpec("group_prox_", 3, "sum_mul_",
                          "w_g <- w_g*max(0, 1-lr*l1/||w_g||_2), groups along dim 1, per-tensor l1",
                          mutates=("ws",), foreach_what="vector_norm per tensor + torch._foreach_* factors "
                                                        "+ _foreach_mul_", group_dim=GROUP_DIM["group_prox_"]),
    "max_norm_": OpSpec("max_norm_", 3, "sum_mul_",
                        "w_g <- w_g*min(1, max_value/||w_g||_2), groups along dim 0, per-tensor max_value",
                        mutates=("ws",), foreach_what="vector_norm per tensor + torch._foreach_* factors "
                                                      "+ _foreach_mul_", group_dim=GROUP_DIM["max_norm_"]),
    "step": OpSpec("step", 7, "adamw_flat",
                   "optimizer.step(), grads set: pyreg.optim.AdamW(l1) vs Regularized(torch AdamW(fused)), "
                   "bare torch AdamW(fused), torch AdamW(fused) + Python-loop prox",
                   peers=STEP_PEERS),
}
OP_ORDER = list(OPS)

# Flat-buffer reference ops: (bytes per element in units of the element size, what).
ROOFLINE = {
    "sum": (1, "a.sum()"),
    "mul_": (2, "a.mul_(c)"),
    "add_": (3, "b.add_(a)"),
    "sum_mul_": (3, "a.sum(), then a.mul_(c)"),  # two passes, as the group ops make
    "copy": (2, "b.copy_(a)"),
    # the optimizer step's traffic: read p, g, m, v; write p, m, v
    "adamw_flat": (7, "torch AdamW(fused) step over one flat parameter (read p, g, m, v; write p, m, v)"),
}


class Coefs:
    """The coefficients of one shape set, in every form the peers take."""

    def __init__(self, n: int, device: torch.device, shapes: Sequence[Sequence[int]] = ()):
        self.l1, self.l2 = coefficients(n)
        self.two_l2 = [2.0 * b for b in self.l2]
        self.thresholds = [LR * a for a in self.l1]
        self.scales = [1.0 / (1.0 + 2.0 * LR * b) for b in self.l2]
        self.l1_t = torch.tensor(self.l1, dtype=torch.float64, device=device)
        self.l2_t = torch.tensor(self.l2, dtype=torch.float64, device=device)
        # group ops (given the shapes, all of 2+ dims): max_norm_'s radius per tensor
        self.max_values = [median_group_norm(s, GROUP_DIM["max_norm_"]) for s in shapes]
        self.max_values_t = torch.tensor(self.max_values, dtype=torch.float64, device=device)


def op_fn(op: str, peer: str, c: Coefs, compiled: Optional[Callable] = None) -> Callable[[dict], object]:
    """``fn(inputs)`` for op and peer; ``inputs`` has ``ws`` (and ``gs``).
    For ``compile``, ``compiled`` is the torch.compile'd loop."""
    if op == "weight_stats":
        if peer == "pyreg":
            return lambda d: tuple(pyreg.weight_stats(d["ws"]))
        if peer == "loop":
            return lambda d: stats_loop(d["ws"])
        if peer == "foreach":
            return lambda d: stats_foreach(d["ws"])
        if peer == "compile":
            return lambda d: compiled(d["ws"])
    if op == "add_penalty_grad_":
        if peer == "pyreg":
            return lambda d: pyreg.add_penalty_grad_(d["ws"], d["gs"], c.l1_t, c.l2_t)
        if peer == "loop":
            return lambda d: apg_loop(d["ws"], d["gs"], c.l1, c.l2)
        if peer == "foreach":
            return lambda d: apg_foreach(d["ws"], d["gs"], c.l1, c.two_l2)
        if peer == "compile":
            return lambda d: compiled(d["ws"], d["gs"], c.l1, c.l2)
    if op == "prox_":
        if peer == "pyreg":
            return lambda d: pyreg.prox_(d["ws"], c.l1_t, c.l2_t, LR)
        if peer == "loop":
            return lambda d: prox_loop(d["ws"], c.thresholds, c.scales)
        if peer == "foreach":
            return lambda d: prox_foreach(d["ws"], c.thresholds, c.scales)
        if peer == "compile":
            return lambda d: compiled(d["ws"], c.thresholds, c.scales)
    if op in GROUP_DIM:
        dim = GROUP_DIM[op]
        if peer == "pyreg":
            if op == "group_prox_":
                return lambda d: pyreg.group_prox_(d["ws"], l1=c.l1_t, lr=LR, dim=dim)
            return lambda d: pyreg.max_norm_(d["ws"], c.max_values_t, dim=dim)
        coef = c.thresholds if op == "group_prox_" else c.max_values
        fn = {"loop": loop_of(op), "foreach": group_prox_foreach if op == "group_prox_" else max_norm_foreach,
              "compile": compiled}.get(peer)
        if fn is not None:
            return lambda d: fn(d["ws"], [dim] * len(d["ws"]), coef)
    raise KeyError((op, peer))


def loop_of(op: str) -> Callable:
    return {"weight_stats": stats_loop, "add_penalty_grad_": apg_loop, "prox_": prox_loop,
            "group_prox_": group_prox_loop, "max_norm_": max_norm_loop}[op]


def roofline_fn(kind: str, a: Tensor, b: Tensor) -> Callable[[], object]:
    if kind == "sum":
        return lambda: a.sum()
    if kind == "mul_":
        return lambda: a.mul_(0.9999999)
    if kind == "add_":
        return lambda: b.add_(a)
    if kind == "sum_mul_":
        return lambda: (a.sum(), a.mul_(0.9999999))
    if kind == "copy":
        return lambda: b.copy_(a)
    raise KeyError(kind)


# ---------------------------------------------------------------------------
# Checks: every peer's output against pyreg's, on the same fresh inputs.
# ---------------------------------------------------------------------------
ELEMENTWISE_TOL = TOLERANCES["peer_elementwise"]
# Peers reduce in the input dtype with their own summation order (fp32 cascade
# sums), pyreg in its own order: both carry rounding error of ~1e-6 relative.
REDUCTION_TOL = TOLERANCES["peer_reduction"]
ZERO_PATTERN_OPS = ("prox_", "group_prox_")  # ops that set weights exactly to zero


def _max_rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


def compare(op: str, ref, got, dtype: torch.dtype) -> Tuple[bool, str]:
    """(passed, detail). ``ref`` and ``got`` are the op's outputs: the four
    stats for weight_stats, else the list of written tensors."""
    if op == "weight_stats":
        tol = REDUCTION_TOL[dtype]
        names = ("l1", "l2", "linf")
        worst, ok = 0.0, True
        for name, r, g in zip(names, ref[:3], got[:3]):
            g = g.to(device=r.device, dtype=torch.float64)
            r64 = r.to(torch.float64)
            ok &= bool(torch.allclose(g, r64, **tol))
            worst = max(worst, _max_rel(g, r64))
        nnz_ok = bool(torch.equal(ref[3].to(torch.int64).cpu(), got[3].to(torch.int64).cpu()))
        return ok and nnz_ok, (f"max rel err {worst:.1e} (rtol {tol['rtol']:.0e}), nonzero counts "
                               f"{'equal' if nnz_ok else 'DIFFER'}")
    tol = ELEMENTWISE_TOL[dtype]
    ok, worst, zero_diff, total = True, 0.0, 0, 0
    for r, g in zip(ref, got):
        if r.numel() == 0:
            continue
        r64, g64 = r.to(torch.float64), g.to(torch.float64)
        excess = (g64 - r64).abs_().sub_(r64.abs().mul_(tol["rtol"]))  # |g - r| - rtol*|r|
        m = float(excess.max())
        ok &= m <= tol["atol"]  # NaN fails
        worst = max(worst, m)
        del r64, g64, excess
        if op in ZERO_PATTERN_OPS:
            zero_diff += int(((r == 0) != (g == 0)).sum())
        total += r.numel()
    # worst: the largest |got - ref| - rtol*|ref|; within tolerance when <= atol
    tol_text = f"rtol {tol['rtol']:.1e}, atol {tol['atol']:.0e}"
    detail = (f"within {tol_text}" if ok else
              f"off by up to {worst:.1e} beyond rtol*|ref| ({tol_text})")
    if op in ZERO_PATTERN_OPS:
        detail += _zero_pattern(zero_diff, total)
    return ok, detail


def _zero_pattern(differ: int, total: int) -> str:
    if differ == 0:
        return f", same zero pattern ({total:,} elements)"
    return f", zero pattern differs at {differ:,} of {total:,} elements"


def compare_params(ref: Sequence[Tensor], got: Sequence[Tensor], dtype: torch.dtype,
                   zero_slack: float = 0.0) -> Tuple[bool, str]:
    """Parameters after one optimizer step: within the optimizer tolerance (the
    update divides by sqrt(v) + eps; fused and foreach kernels round it
    differently), and the same exact zeros: an element zero in one and not in
    the other fails unless the nonzero value is at most ``zero_slack`` (a
    weight within rounding of the prox threshold)."""
    tol = tolerance("optimizer_step", dtype)
    ok, worst, zeros, differ, beyond = True, 0.0, 0, 0, 0
    for r, g in zip(ref, got):
        r, g = r.detach(), g.detach()
        r64, g64 = r.to(torch.float64), g.to(torch.float64)
        ok &= bool(torch.allclose(g64, r64, **tol))
        if r.numel():
            worst = max(worst, float((g64 - r64).abs().max()))
        mismatch = (r == 0) != (g == 0)
        zeros += int((r == 0).sum())
        differ += int(mismatch.sum())
        beyond += int((mismatch & (torch.maximum(r64.abs(), g64.abs()) > zero_slack)).sum())
        del r64, g64, mismatch
    detail = f"max abs err {worst:.1e}; {zeros:,} exact zeros, " + (
        "same zero pattern" if differ == 0 else f"zero pattern differs at {differ:,}")
    if beyond:
        detail += f" ({beyond:,} beyond rounding of the threshold)"
    elif differ:
        detail += " (all within rounding of the threshold)"
    return ok and beyond == 0, detail
