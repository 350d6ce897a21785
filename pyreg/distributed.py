"""pyreg's ops on DTensors (``torch.distributed.tensor``), e.g. the parameters
of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The public ops (``pyreg.weight_stats``, ``penalty``, ``add_penalty_grad_``,
``prox_``) send a list that holds DTensors here. Each op runs once on the
local shards (``DTensor.to_local()``) and, where it returns a reduction, the
per-tensor partial results of all ranks are combined with ONE collective per
call (an all-gather of a small packed float64 buffer, reduced locally: sums
for l1, sum of squares, nnz and the penalty; max for linf):

* ``weight_stats`` -> the global per-tensor values (as of the full tensors);
* ``penalty`` -> the global penalty (the same 0-dim value on every rank),
  differentiable: the gradient with respect to each DTensor is a DTensor with
  the same mesh and placements, built from the local gradient;
* ``add_penalty_grad_`` -> updates the local grad shards in place and
  returns the global penalty;
* ``prox_`` -> updates the local shards in place and returns the global
  count of nonzeros per tensor.

Because these return global values they are collectives: every rank of the
mesh must call them, with the same list structure (as for any DTensor op).

Placements: ``Shard`` (including FSDP2's uneven shards and empty shards) and
``Replicate``; a replicated tensor is counted once (its stats are its local
stats), not once per replica. ``Partial`` tensors are rejected. A plain
tensor in a list with DTensors is treated as replicated on the mesh.
All DTensors of one call must live on one device mesh.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from ._common import WeightStats, result_dtype, to_device
from ._ops import add_penalty_grad_op, penalty_op, prox_op, weight_stats_op
from ._validate import check_grads_apart, check_no_overlap

__all__ = ["weight_stats", "penalty", "add_penalty_grad_", "prox_"]


# --------------------------------------------------------------------------
# Local shards, the mesh, and which tensors this rank counts
# --------------------------------------------------------------------------
def _mesh_of(ts: Sequence[Tensor]):
    mesh = None
    for i, t in enumerate(ts):
        if isinstance(t, DTensor):
            if mesh is None:
                mesh = t.device_mesh
            elif t.device_mesh != mesh:
                raise ValueError(f"tensors[{i}] is on device mesh {t.device_mesh} but an earlier "
                                 f"DTensor is on {mesh}; one pyreg call takes DTensors of one mesh")
    return mesh


def _group(mesh):
    """A process group over every rank of the mesh."""
    if mesh.ndim == 1:
        return mesh.get_group()
    return mesh._flatten().get_group()


def _counted(t: Tensor, mesh, group) -> bool:
    """Whether this rank's local part of t enters the global sums: a shard
    does; of a replicated tensor only the copy at coordinate 0 of each
    replicated mesh dim does."""
    if not isinstance(t, DTensor):
        return dist.get_rank(group) == 0  # a plain tensor: replicated on the mesh
    for d, p in enumerate(t.placements):
        if p.is_partial():
            raise ValueError("pyreg cannot regularize a DTensor with a Partial placement; "
                             "redistribute it to Shard or Replicate first")
        if p.is_replicate() and mesh.get_local_rank(d) != 0:
            return False
    return True


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _setup(ts: Sequence[Tensor]):
    mesh = _mesh_of(ts)
    group = _group(mesh)
    counted = [_counted(t, mesh, group) for t in ts]
    return mesh, group, counted


def _gather(buf: Tensor, group) -> Tensor:
    """All ranks' ``buf`` stacked along a new dim 0: the one collective per call."""
    flat = buf.contiguous().reshape(-1)
    ranks = dist.get_world_size(group)
    out = flat.new_empty(ranks * flat.numel())  # flat: gloo wants matching ranks
    _all_gather()(out, flat, group=group)
    return out.view((ranks,) + tuple(buf.shape))


def _all_gather():
    """torch's gather of equal-size tensors into one: ``all_gather_single``
    where torch has it (it deprecates the older name), else
    ``all_gather_into_tensor``."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _sum_over_ranks(value: Tensor, group) -> Tensor:
    return _gather(value.to(torch.float64).reshape(-1), group).sum(0)


def _as_dtensor_grad(g: Tensor, like: Tensor) -> Tensor:
    if not isinstance(like, DTensor):
        return g
    return DTensor.from_local(g, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


# --------------------------------------------------------------------------
# The ops (arguments already validated by pyreg's public functions;
# coefficients are 1-D float64 tensors with one entry per tensor)
# --------------------------------------------------------------------------
def weight_stats(ts: Sequence[Tensor]) -> WeightStats:
    """Global per-tensor (sum|w|, sqrt(sum w^2), max|w|, nnz) of DTensors."""
    _, group, counted = _setup(ts)
    with torch.no_grad():
        locs = [_local(t).detach() for t in ts]
        st = WeightStats(*weight_stats_op(locs))
        mask = to_device(counted, torch.float64, st.l1.device)
        l1, l2, linf = (x.to(torch.float64) for x in st[:3])
        packed = torch.stack([l1 * mask, l2 * l2 * mask, st.nnz.to(torch.float64) * mask, linf])
        every = _gather(packed, group)          # (ranks, 4, n)
        sums = every[:, :3].sum(0)
        linf = every[:, 3].amax(0)             # NaN propagates, as in the local op
        rd = result_dtype(locs)
        return WeightStats(sums[0].to(rd), sums[1].sqrt().to(rd), linf.to(rd),
                           sums[2].round().to(torch.int64))


class _Penalty(torch.autograd.Function):
    """The global penalty; backward gives each DTensor its local gradient
    l1*sign(w) + 2*l2*w as a DTensor of the same placements (no communication)."""

    @staticmethod
    def forward(ctx, l1: Tensor, l2: Tensor, *ts: Tensor) -> Tensor:
        _, group, counted = _setup(ts)
        locs = [_local(t).detach() for t in ts]
        idx = [i for i, c in enumerate(counted) if c]
        dev = locs[0].device
        rd = result_dtype(locs)
        if idx:
            sel = to_device(idx, torch.int64, l1.device)
            local = penalty_op([locs[i] for i in idx], l1[sel], l2[sel], []).to(torch.float64)
        else:
            local = torch.zeros((), dtype=torch.float64, device=dev)
        value = _sum_over_ranks(local, group).reshape(()).to(rd)
        ctx.save_for_backward(l1, l2, *locs)
        ctx.likes = [(t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None
                     for t in ts]
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        l1, l2, *locs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        grads: List = [None] * len(locs)
        idx = [i for i, n in enumerate(needs) if n]
        if idx:
            go = grad_out.to(torch.float64)
            sel = to_device(idx, torch.int64, l1.device)
            part = [locs[i] for i in idx]
            gs = [torch.zeros_like(t) for t in part]
            add_penalty_grad_op(part, gs, l1[sel] * go, l2[sel] * go, [])
            for i, g in zip(idx, gs):
                like = ctx.likes[i]
                grads[i] = g if like is None else DTensor.from_local(
                    g, like[0], like[1], run_check=False, shape=like[2], stride=like[3])
        return (None, None, *grads)


def penalty(ts: Sequence[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    """Global sum_i l1_i*||w_i||_1 + l2_i*||w_i||_2^2 over DTensors (0-dim, the
    same on every rank); differentiable with respect to the DTensors."""
    return _Penalty.apply(l1, l2, *ts)


def _split_calls(counted: List[bool]) -> List[Tuple[bool, List[int]]]:
    """Index lists of the counted and the not-counted tensors (non-empty ones)."""
    yes = [i for i, c in enumerate(counted) if c]
    no = [i for i, c in enumerate(counted) if not c]
    return [(c, ix) for c, ix in ((True, yes), (False, no)) if ix]


def add_penalty_grad_(ts: Sequence[Tensor], gs: Sequence[Tensor], l1: Tensor, l2: Tensor) -> Tensor:
    """g_i += l1_i*sign(w_i) + 2*l2_i*w_i on the local shards; returns the
    global penalty (one collective)."""
    _, group, counted = _setup(ts)
    for i, (t, g) in enumerate(zip(ts, gs)):
        if isinstance(t, DTensor) != isinstance(g, DTensor) or (
                isinstance(t, DTensor) and tuple(t.placements) != tuple(g.placements)):
            raise ValueError(f"grads[{i}] must be a DTensor with the placements of tensors[{i}]")
    with torch.no_grad():
        locs = [_local(t).detach() for t in ts]
        lgs = [_local(g) for g in gs]
        check_grads_apart(locs, lgs)
        dev = locs[0].device
        local = torch.zeros((), dtype=torch.float64, device=dev)
        for is_counted, ix in _split_calls(counted):
            sel = to_device(ix, torch.int64, l1.device)
            v = add_penalty_grad_op([locs[i] for i in ix], [lgs[i] for i in ix], l1[sel], l2[sel], [])
            if is_counted:
                local = local + v.to(torch.float64)
        return _sum_over_ranks(local, group).reshape(()).to(result_dtype(locs))


def prox_(ts: Sequence[Tensor], l1: Tensor, l2: Tensor, lr: Tensor) -> Tensor:
    """The proximal step on the local shards; returns the global count of
    nonzeros per tensor (1-D int64, one collective)."""
    _, group, counted = _setup(ts)
    with torch.no_grad():
        locs = [_local(t).detach() for t in ts]
        check_no_overlap(locs, "tensors")
        nnz = prox_op(locs, l1, l2, lr, [])
        mask = to_device(counted, torch.int64, nnz.device)
        return _sum_over_ranks(nnz * mask, group).round().to(torch.int64)
