"""The fused optimizer steps as functions, in torch.optim's functional style:
``sgd``, ``adam``, ``adagrad``, ``rmsprop`` take the tensor lists and named
hyperparameters, and run one fused pass (update, then the L1/L2 prox)
through :func:`fused_step`, which the optimizer classes also call, once per
bucket of parameters.

The hyperparameters reach the kernels as a float64 table, one row per set of
values, one column per name of :data:`HYPER`. Rows are built by name
(:func:`row`), so adding a hyperparameter means adding its name to
``HYPER`` and to the C++ list it is checked against at load
(``csrc/common/hyper.h``).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from .._common import to_device
from .._validate import first_unpaired, like_tensors, partner_list
from ..backends import torch_ref as spec
from ..backends._marshal import is_dense
from .keys import check_values

#: The table's columns (the spec's, checked against the compiled kernels').
HYPER = spec.HYPER
SGD, ADAM, ADAGRAD, RMSPROP = spec.SGD, spec.ADAM, spec.ADAGRAD, spec.RMSPROP
NO_PROX, PLAIN_PROX, METRIC_PROX = spec.NO_PROX, spec.PLAIN_PROX, spec.METRIC_PROX


def row(values: Mapping[str, Any]) -> tuple:
    """One row of the table from named values (numbers, or device tensors
    written in on the device); names not given are 0."""
    unknown = set(values) - set(HYPER)
    if unknown:
        raise KeyError(f"unknown hyperparameters {sorted(unknown)}; the table has {HYPER}")
    return tuple(values.get(name, 0.0) for name in HYPER)


def table(rows: Sequence[tuple], device: torch.device) -> Tensor:
    """The float64 table of ``rows`` on ``device`` (device-tensor entries are
    written in on the device: no host sync)."""
    numbers = [0.0 if isinstance(v, Tensor) else float(v) for r in rows for v in r]
    t = to_device(numbers, torch.float64, device).reshape(len(rows), len(HYPER))
    on_device = [(i, j, v) for i, r in enumerate(rows) for j, v in enumerate(r) if isinstance(v, Tensor)]
    for i, j, v in on_device:
        t[i, j] = v.reshape(())
    return t


def prox_kind(l1: float, l2: float, preconditioned: bool) -> int:
    return NO_PROX if l1 == 0.0 and l2 == 0.0 else METRIC_PROX if preconditioned else PLAIN_PROX


def fused_step(algo: int, params: List[Tensor], grads: List[Tensor], s1: List[Tensor], s2: List[Tensor],
               s3: List[Tensor], steps: List[Tensor], rows: List[int], fresh: List[int], hyper: Tensor, *,
               decoupled: bool = False, amsgrad: bool = False, maximize: bool = False, nesterov: bool = False,
               centered: bool = False, prox: int = NO_PROX, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, ticket: Optional[Tensor] = None, backend=None) -> None:
    """One fused pass of algorithm ``algo`` over the lists (see
    ``pyreg.backends.torch_ref.optim_step``, the float64 spec): the backend
    chosen for the params' device, or the spec where a grad or state buffer is
    laid out unlike its param (the kernels pair elements by position).
    The caller has checked that each grad and state buffer has its param's
    shape, dtype and device (``_validate.first_unpaired``). ``ticket``: see
    ``CompiledKernels.optim_step`` (an optimizer keeps one per device)."""
    be = backend if backend is not None else backends.for_tensors(params)
    lists = (params, grads, s1, s2, s3)
    if any(map(Tensor.is_neg, params)) or any(map(Tensor.is_neg, grads)):
        be = spec  # a view with torch's negative bit: its memory holds the negated values
    elif not all(all(map(Tensor.is_contiguous, ts)) for ts in lists):
        if not all(_same_layout(ts) for ts in zip(*[x for x in lists if x])):
            be = spec
    kw = dict(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, nesterov=nesterov, centered=centered,
              prox=prox, grad_scale=grad_scale, found_inf=found_inf)
    if be.optim_step(algo, params, grads, s1, s2, s3, steps, rows, fresh, hyper, ticket=ticket, **kw) is False:
        # a list the kernels cannot take (a grad without memory: a ZeroTensor): the spec steps it
        spec.optim_step(algo, params, grads, s1, s2, s3, steps, rows, fresh, hyper, **kw)
    # written in place, as torch's in-place ops mark what they write: a graph that saved them refuses its backward
    for ts in (params, s1, s2, s3):
        if ts:
            torch.autograd.graph.increment_version(ts)


def _check_lists(params: List[Tensor], lists: Sequence[Tuple[str, List[Tensor]]],
                 steps: Optional[List[Tensor]]) -> None:
    """The functional API's lists against ``params`` (``_validate.partner_list``),
    and its step counters (None: the algorithm has none): one per param,
    float32 or float64, one element, on the params' devices, of one dtype.
    Raises ``ValueError``."""
    like = like_tensors(params)
    for name, ts in lists:
        partner_list(ts, params, name, name, "params", like)
    if steps is None:
        return
    if len(steps) != len(params):
        raise ValueError(f"got {len(params)} params but {len(steps)} state_steps")
    for i, (s, d) in enumerate(zip(steps, like[2])):
        if (not isinstance(s, Tensor) or s.numel() != 1 or s.dtype not in (torch.float32, torch.float64)
                or s.dtype != steps[0].dtype or s.device != d):
            got = f"{tuple(s.shape)} {s.dtype} on {s.device}" if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"state_steps[{i}] is {got}: step counters are one-element float32 or float64 "
                             "tensors (all of one dtype) on their params' devices")


def _same_layout(ts) -> bool:
    """True if the tensors (a param, its grad and state) share strides and are dense."""
    first = ts[0]
    return is_dense(first) and all(t.stride() == first.stride() for t in ts[1:])


def _one(algo: int, params, grads, s1, s2, s3, steps, fresh, values: Mapping[str, Any], l1: float, l2: float,
         preconditioned: bool, names: Sequence[Optional[str]], **flags) -> None:
    """One call of :func:`fused_step` with one row of ``values``; ``names``:
    the names of grads, s1, s2, s3 as the caller's signature has them, None
    for a list the algorithm does not read (it must then be empty)."""
    check_values(dict(values, l1=l1, l2=l2))
    if not params:
        return
    _check_lists(params, [(k, v) for k, v in zip(names, (grads, s1, s2, s3)) if k is not None],
                 steps if algo != SGD else None)
    dev = params[0].device
    hyper = table([row(dict(values, l1=l1, l2=l2))], dev)
    with torch.no_grad():
        fused_step(algo, params, grads, s1, s2, s3, steps, [0] * len(params), fresh, hyper,
                   prox=prox_kind(l1, l2, preconditioned), **flags)


def sgd(params: List[Tensor], grads: List[Tensor], momentum_buffer_list: List[Optional[Tensor]], *,
        lr: float, weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
        nesterov: bool = False, maximize: bool = False, l1: float = 0.0, l2: float = 0.0,
        grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """torch's functional ``sgd`` with the L1/L2 prox, fused. A None momentum
    buffer starts at this step (``buf = grad``, as torch); the list gets it
    (unless ``found_inf`` says the step is skipped: read on the host where a
    buffer was made, the entry stays None)."""
    bufs: List[Tensor] = []
    fresh: List[int] = []
    if momentum != 0:
        if len(momentum_buffer_list) != len(params):
            raise ValueError(f"got {len(params)} params but {len(momentum_buffer_list)} momentum_buffer_list entries")
        for i, (p, b) in enumerate(zip(params, momentum_buffer_list)):  # (before any buffer is made)
            if b is not None and first_unpaired([p], [b]) is not None:
                raise ValueError(f"momentum_buffer_list[{i}] is {tuple(b.shape)} {b.dtype} on {b.device} but "
                                 f"params[{i}] is {tuple(p.shape)} {p.dtype} on {p.device}")
        for i, (p, b) in enumerate(zip(params, momentum_buffer_list)):
            if b is None:
                b = momentum_buffer_list[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh.append(1)
            else:
                fresh.append(0)
            bufs.append(b)
    else:
        fresh = [0] * len(params)
    try:
        _one(SGD, params, grads, bufs, [], [], [], fresh,
             {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "dampening": dampening}, l1, l2, False,
             ("grads", "momentum_buffer_list" if momentum != 0 else None), maximize=maximize,
             nesterov=nesterov and momentum != 0, grad_scale=grad_scale, found_inf=found_inf)
        skipped = any(fresh) and found_inf is not None and bool(found_inf.item())
    except BaseException:
        skipped = True  # (nothing was stepped: the buffers made stay unmade)
        raise
    finally:
        if skipped:
            for i, f in enumerate(fresh):
                if f:
                    momentum_buffer_list[i] = None


def adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
         max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr: float, beta1: float = 0.9,
         beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
         maximize: bool = False, decoupled: bool = False, l1: float = 0.0, l2: float = 0.0,
         preconditioned: bool = False, grad_scale: Optional[Tensor] = None,
         found_inf: Optional[Tensor] = None) -> None:
    """torch's functional ``adam`` (``decoupled=True``: AdamW) with the L1/L2
    prox (``preconditioned``: in Adam's metric), fused."""
    _one(ADAM, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
         [0] * len(params), {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay},
         l1, l2, preconditioned, ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs" if amsgrad else None),
         decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def adagrad(params: List[Tensor], grads: List[Tensor], state_sums: List[Tensor], state_steps: List[Tensor], *,
            lr: float, weight_decay: float = 0.0, lr_decay: float = 0.0, eps: float = 1e-10,
            maximize: bool = False, l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False,
            grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """torch's functional ``adagrad`` with the L1/L2 prox (``preconditioned``:
    in Adagrad's metric, proximal Adagrad), fused."""
    _one(ADAGRAD, params, grads, state_sums, [], [], state_steps, [0] * len(params),
         {"lr": lr, "weight_decay": weight_decay, "lr_decay": lr_decay, "eps": eps}, l1, l2, preconditioned,
         ("grads", "state_sums"), maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def rmsprop(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor], grad_avgs: List[Tensor],
            momentum_buffer_list: List[Tensor], state_steps: List[Tensor], *, lr: float, alpha: float = 0.99,
            eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
            maximize: bool = False, l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False,
            grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """torch's functional ``rmsprop`` with the L1/L2 prox (``preconditioned``:
    in RMSprop's metric, threshold lr*l1/(sqrt(v)+eps)), fused."""
    _one(RMSPROP, params, grads, square_avgs, momentum_buffer_list if momentum != 0 else [],
         grad_avgs if centered else [], state_steps, [0] * len(params),
         {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay, "momentum": momentum},
         l1, l2, preconditioned, ("grads", "square_avgs", "momentum_buffer_list" if momentum != 0 else None,
          "grad_avgs" if centered else None), centered=centered,
         maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
