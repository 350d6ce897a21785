"""``Regularized``: L1 / L2 / elastic-net regularization around any torch optimizer.

    opt = pyreg.Regularized(torch.optim.AdamW(pyreg.param_groups(model, l1=1e-5)),
                            mode="proximal")

The wrapper is a real :class:`torch.optim.Optimizer` that *shares* the inner
optimizer's ``param_groups`` and ``state`` (it holds no copy), so LR schedulers,
``zero_grad``, ``add_param_group``, step hooks, closures, ``GradScaler`` and
state dicts work on it as on the inner optimizer.

Coefficients live in the param groups (keys ``"l1"`` and ``"l2"``; the
wrapper's arguments are the defaults) and may be changed at any time, e.g.
``opt.param_groups[0]["l1"] = 1e-4``; the change takes effect on the next step.

Each step calls one fused op (``pyreg.add_penalty_grad_`` or ``pyreg.prox_``)
per (device, dtype) bucket of regularized parameters, with one coefficient
per tensor (per-layer alpha). The buckets and their coefficient tensors are
cached and rebuilt only when the groups change (group count, parameters,
their device/dtype, or coefficient values). A step does no host sync.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import ops
from ._common import SUPPORTED_DTYPES, to_device
from ._validate import check_grads_apart, first_overlap, nonneg_real, one_value_tensor, tensor_list

__all__ = ["Regularized", "param_groups", "default_exclude", "ParamStats", "Sparsity"]

MODES = ("proximal", "gradient")
_COEF_KEYS = ("l1", "l2")


def _group_coef(value: Any, where: str) -> float:
    """A group's l1/l2 as a float: a number, or a one-element real tensor (as
    torch.optim allows for lr). Tensors let a compiled step see a changed value
    without recompiling (change them in place, e.g. ``group["l1"].fill_(v)``);
    keep them on the CPU: reading a device tensor's value syncs the host."""
    if isinstance(value, Tensor):
        value = float(one_value_tensor(value, where))
    return nonneg_real(value, where)


# --------------------------------------------------------------------------
# Results of stats() and sparsity()
# --------------------------------------------------------------------------
class ParamStats(NamedTuple):
    """Per-parameter statistics, in the optimizer's parameter order.

    ``names[i]`` names entry ``i`` of the 1-D tensors ``l1`` (sum|w|), ``l2``
    (sqrt(sum w^2)), ``linf`` (max|w|), ``nnz`` (count of w != 0) and ``numel``.
    """

    names: List[str]
    l1: Tensor
    l2: Tensor
    linf: Tensor
    nnz: Tensor
    numel: Tensor

    def as_dict(self) -> Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """name -> (l1, l2, linf, nnz) as 0-dim tensors (views; no host sync)."""
        return {n: (self.l1[i], self.l2[i], self.linf[i], self.nnz[i]) for i, n in enumerate(self.names)}


class Sparsity(NamedTuple):
    """Fraction of exact zeros: ``overall`` (0-dim, over all elements) and
    ``per_param`` (1-D, one entry per ``names``; 0 for empty tensors)."""

    overall: Tensor
    per_param: Tensor
    names: List[str]

    def as_dict(self) -> Dict[str, Tensor]:
        return {n: self.per_param[i] for i, n in enumerate(self.names)}


# --------------------------------------------------------------------------
# The cached plan: buckets of parameters with per-tensor coefficients
# --------------------------------------------------------------------------
class _Bucket:
    """Parameters of one (device, dtype) and their per-tensor coefficients."""

    def __init__(self, params: List[Tensor], groups: List[int], l1: List[float], l2: List[float]):
        self.params, self.groups = params, groups
        self.l1_list, self.l2_list = l1, l2
        dev = self.device = params[0].device
        self.l1 = to_device(l1, torch.float64, dev)
        self.l2 = to_device(l2, torch.float64, dev)
        self.group_index = to_device(groups, torch.int64, dev)  # selects each tensor's group lr
        self._subsets: Dict[Tuple[bool, ...], Tuple[List[int], Tensor]] = {}

    def set_coefs(self, l1: List[float], l2: List[float]) -> None:
        """New coefficient values, written into the same tensors: a compiled step
        (or a CUDA graph) reads them as inputs, so a change recompiles nothing."""
        for new, old, t in ((l1, self.l1_list, self.l1), (l2, self.l2_list, self.l2)):
            if new != old:
                t.copy_(to_device(new, torch.float64, t.device))
        self.l1_list, self.l2_list = l1, l2

    def active(self) -> Tuple[List[Tensor], Tensor, Tensor, Tensor]:
        """(params, their group indices as a device tensor, l1, l2), restricted to
        params with a grad."""
        mask = tuple(p.grad is not None for p in self.params)
        if all(mask):
            return self.params, self.group_index, self.l1, self.l2
        sub = self._subsets.get(mask)
        if sub is None:
            idx = [i for i, m in enumerate(mask) if m]
            # One transfer per new mask, then cached; the values are gathered
            # from l1/l2 at each use, so in-place coefficient updates apply.
            sub = (idx, to_device(idx, torch.int64, self.l1.device))
            if len(self._subsets) >= 8:
                self._subsets.clear()
            self._subsets[mask] = sub
        idx, sel = sub
        return ([self.params[i] for i in idx], self.group_index.index_select(0, sel),
                self.l1.index_select(0, sel), self.l2.index_select(0, sel))


class _Plan:
    """What a step needs, derived from the param groups and cached on them."""

    def __init__(self, groups: List[Dict[str, Any]], coefs: List[Tuple[float, float]]):
        seen = set()
        reg: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list, list, list]] = OrderedDict()
        every: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list]] = OrderedDict()
        reg_names: Dict[int, str] = {}
        self.names: List[str] = []
        position = 0
        for gi, (group, (l1, l2)) in enumerate(zip(groups, coefs)):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                name = names[j] if names is not None and j < len(names) else f"param_groups.{gi}.{j}"
                if id(p) in seen:
                    raise ValueError(f"param_groups[{gi}] holds a parameter ({name!r}) that appears "
                                     "earlier in the optimizer; each parameter must appear once")
                seen.add(id(p))
                self.names.append(name)
                key = (p.device, p.dtype)
                e = every.setdefault(key, ([], []))
                e[0].append(p)
                e[1].append(position)
                position += 1
                if l1 == 0.0 and l2 == 0.0:
                    continue  # nothing to do for this tensor: leave it out of the ops
                if p.dtype not in SUPPORTED_DTYPES or p.layout != torch.strided:
                    raise TypeError(f"param_groups[{gi}] parameter {name!r} is {p.dtype} "
                                    f"({p.layout}); pyreg regularizes dense float32, float64, "
                                    "float16 and bfloat16 tensors")
                if p.is_meta:
                    raise ValueError(f"param_groups[{gi}] parameter {name!r} is a meta tensor: "
                                     "it has no data to regularize")
                b = reg.setdefault(key, ([], [], [], []))
                b[0].append(p), b[1].append(gi), b[2].append(l1), b[3].append(l2)
                reg_names[id(p)] = name
        # prox_ writes the params after the inner step: reject shared memory now,
        # before any step, rather than half-way through one.
        reg_params = [p for b in reg.values() for p in b[0]]
        bad = None if torch.compiler.is_compiling() else first_overlap(reg_params)
        if bad is not None:
            na, nb = (reg_names[id(reg_params[i])] for i in bad)
            raise ValueError(f"parameter {na!r} overlaps itself in memory (an expanded view?)"
                             if bad[0] == bad[1] else
                             f"parameters {na!r} and {nb!r} share memory; "
                             "pyreg updates each regularized parameter in place, so they must be distinct")
        self.buckets = [_Bucket(*b) for b in reg.values()]
        self.devices = list(dict.fromkeys(b.device for b in self.buckets))
        self.coefs = coefs
        self._lr_cache: Dict[torch.device, Tuple[tuple, Tensor]] = {}
        # For stats(): every parameter (regularized or not), bucketed, plus the
        # permutation back to optimizer order.
        self.stat_buckets = [ps for ps, _ in every.values()]
        order = [i for _, pos in every.values() for i in pos]
        self.first_device = next(iter(every))[0] if every else torch.device("cpu")
        inverse = [0] * len(order)
        for k, i in enumerate(order):
            inverse[i] = k
        self.inverse = to_device(inverse, torch.int64, self.first_device)
        numels = [p.numel() for ps in self.stat_buckets for p in ps]
        self.numel = to_device(numels, torch.int64, self.first_device)[self.inverse]

    def group_lrs(self, lrs: list, device: torch.device) -> Tensor:
        """The groups' current lrs as one float64 tensor on ``device`` (an entry
        per group). Numbers: one small copy when they change, else the cached
        tensor. Tensor lrs are read where they live (moved without a host sync)."""
        if any(isinstance(v, Tensor) for v in lrs):
            return torch.stack([to_device(v if isinstance(v, Tensor) else [v], torch.float64, device).reshape(())
                                for v in lrs])
        key = tuple(lrs)
        hit = self._lr_cache.get(device)
        if hit is None or hit[0] != key:
            hit = self._lr_cache[device] = (key, to_device(list(key), torch.float64, device))
        return hit[1]

    def set_coefs(self, coefs: List[Tuple[float, float]]) -> None:
        """New coefficient values with the same zero pattern (so the same buckets)."""
        for b in self.buckets:
            b.set_coefs([coefs[g][0] for g in b.groups], [coefs[g][1] for g in b.groups])
        self.coefs = coefs


# --------------------------------------------------------------------------
# The optimizer wrapper
# --------------------------------------------------------------------------
class Regularized(Optimizer):
    """Add L1 / L2 / elastic-net regularization to any ``torch.optim`` optimizer.

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`).
        l1, l2: default coefficients for groups without an ``"l1"`` / ``"l2"``
            key (they are written into the groups). The penalty is
            ``R(w) = l1 * sum|w| + l2 * sum w^2`` (no 1/2; ``l2 = wd / 2`` is
            torch's ``weight_decay=wd``).
        mode: ``"proximal"`` (default): after the inner step,
            ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` with each
            group's current ``lr`` (exact zeros for L1; the L2 part is decoupled
            weight decay). ``"gradient"``: before the inner step,
            ``g += l1 * sign(w) + 2 * l2 * w`` (the penalty in the loss, as Keras).

    Parameters whose ``grad`` is None are not touched in either mode, nor are
    groups with ``l1 == l2 == 0``.

    Observability (no host sync): :attr:`penalty`, :meth:`stats`, :meth:`sparsity`.

    ``GradScaler``: ``scaler.step(opt)`` unscales the grads and calls
    ``opt.step()`` only when they are finite, so a skipped step regularizes
    nothing (the wrapper never claims ``_step_supports_amp_scaling``).

    State dicts are the inner optimizer's (whose groups hold ``l1``/``l2``)
    plus a ``"pyreg"`` entry with the defaults and mode; they contain only
    tensors, numbers, strings and lists, so ``torch.load(weights_only=True)``
    reads them.
    """

    # GradScaler must unscale and skip for us: see the class docstring.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: Optimizer, l1: float = 0.0, l2: float = 0.0, mode: str = "proximal"):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Regularized wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # Not Optimizer.__init__: it would copy the groups. Set up what the base
        # class's machinery (step hooks, zero_grad profiling) needs instead.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.optimizer = optimizer
        self.mode = mode
        self.l1 = nonneg_real(l1, "l1")
        self.l2 = nonneg_real(l2, "l2")
        self._signature: Optional[tuple] = None
        self._plan_cache: Optional[_Plan] = None
        self._out: Dict[str, Any] = {"last": [], "penalty": None}  # backs _last and _penalty
        self._plan()  # validates everything before the groups are touched
        self._fill_defaults()

    # What the last step left for ``penalty``: (params, l1, l2) per bucket and the
    # penalty value. Kept in a dict: torch.compile (2.13) keeps item stores made
    # in a compiled step but drops attribute stores on an optimizer made before
    # a graph break (the inner step is one).
    _last = property(lambda self: self._out["last"], lambda self, v: self._out.__setitem__("last", v))
    _penalty = property(lambda self: self._out["penalty"],
                        lambda self, v: self._out.__setitem__("penalty", v))

    # -- sharing the inner optimizer ---------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> Dict[str, Any]:
        skip = ("_plan_cache", "_signature", "_out")  # caches: rebuilt on use
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._out = {"last": [], "penalty": None}
        self._plan_cache, self._signature = None, None
        self._patch_step_function()

    def __repr__(self) -> str:
        return (f"Regularized(mode={self.mode!r}, l1={self.l1}, l2={self.l2},\n"
                f"  optimizer={self.optimizer!r})")

    def _fill_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("l1", self.l1)
            group.setdefault("l2", self.l2)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the inner optimizer; ``l1``/``l2`` default to the
        wrapper's. Invalid coefficients raise before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"param_groups[{len(self.param_groups)}]"
        for key in _COEF_KEYS:
            _group_coef(param_group.get(key, getattr(self, key)), f"{where}[{key!r}]")
        param_group = dict(param_group)
        param_group.setdefault("l1", self.l1)
        param_group.setdefault("l2", self.l2)
        self.optimizer.add_param_group(param_group)
        self._signature = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state dicts ----------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's state dict (groups include ``l1``/``l2``) plus
        ``"pyreg": {"l1", "l2", "mode"}``. The wrapper's state-dict hooks run."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())
        sd["pyreg"] = {"l1": self.l1, "l2": self.l2, "mode": self.mode}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner
        optimizer: then the wrapper's defaults and mode are kept)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        sd = dict(state_dict)
        extra = sd.pop("pyreg", None) or {}
        mode = extra.get("mode", self.mode)
        if mode not in MODES:
            raise ValueError(f"state dict has unknown mode {mode!r}")
        l1 = nonneg_real(extra.get("l1", self.l1), "state_dict['pyreg']['l1']")
        l2 = nonneg_real(extra.get("l2", self.l2), "state_dict['pyreg']['l2']")
        for gi, group in enumerate(sd.get("param_groups", [])):
            for key, default in (("l1", l1), ("l2", l2)):
                _group_coef(group.get(key, default), f"state_dict param_groups[{gi}][{key!r}]")
        self.optimizer.load_state_dict(sd)
        self.mode, self.l1, self.l2 = mode, l1, l2
        self._fill_defaults()
        self._signature = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- the cached plan --------------------------------------------------------
    def _coefs(self) -> List[Tuple[float, float]]:
        """Validated (l1, l2) of every group."""
        out = []
        for gi, group in enumerate(self.param_groups):
            out.append(tuple(_group_coef(group.get(key, getattr(self, key)), f"param_groups[{gi}][{key!r}]")
                             for key in _COEF_KEYS))
        return out

    def _plan(self) -> _Plan:
        """The cached plan, rebuilt when the groups changed (cheap check)."""
        groups = self.param_groups
        coefs = self._coefs()
        # Coefficient values are not part of the signature, only which groups
        # are regularized at all: new values are written into the plan's
        # coefficient tensors in place (no recompilation under torch.compile).
        sig = (tuple(c1 == 0.0 and c2 == 0.0 for c1, c2 in coefs),
               tuple(tuple((id(p), p.dtype, p.device) for p in g["params"]) for g in groups))
        if self._plan_cache is None or sig != self._signature:
            self._plan_cache = _Plan(groups, coefs)
            self._signature = sig
        elif coefs != self._plan_cache.coefs:
            self._plan_cache.set_coefs(coefs)
        return self._plan_cache

    def _lrs(self) -> list:
        """Per-bucket lr coefficients (the groups' current lr), validated."""
        lrs = []
        for gi, group in enumerate(self.param_groups):
            lr = group.get("lr")
            if lr is None:
                raise ValueError(f"param_groups[{gi}] has no 'lr': mode 'proximal' needs one "
                                 "(use mode='gradient' for optimizers without a learning rate)")
            lrs.append(one_value_tensor(lr, f"param_groups[{gi}]['lr']") if isinstance(lr, Tensor)
                       else nonneg_real(lr, f"param_groups[{gi}]['lr']"))
        return lrs

    # -- the step ---------------------------------------------------------------
    def _add_penalty_grads(self, plan: _Plan) -> None:
        work = [(params, [p.grad for p in params], l1, l2)
                for params, _, l1, l2 in (b.active() for b in plan.buckets) if params]
        self._penalty = add_penalty_grads(work)

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of the inner optimizer with regularization (see the class
        docstring). A closure is passed through; in gradient mode the penalty
        gradient is added after each closure evaluation. Returns the inner
        step's return value (the closure's loss, without the penalty).

        The step gathers, per (device, dtype) bucket, the parameters with a
        grad and their per-tensor coefficients and lrs; the functional core
        (:func:`add_penalty_grads`, :func:`prox_buckets`) does the rest."""
        if self.mode not in MODES:  # set after construction
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # Validation happens here, before anything changes. Under torch.compile
        # it runs outside the graph, so the coefficients (Python floats in the
        # groups) are not baked into it: changing them recompiles nothing.
        plan = _plan_outside_graph(self) if torch.compiler.is_compiling() else self._plan()
        self._last, self._penalty = [], None
        if self.mode == "gradient":
            if closure is None:
                self._add_penalty_grads(plan)
                return self.optimizer.step()

            def closure_with_penalty():
                loss = closure()
                self._add_penalty_grads(plan)
                return loss

            return self.optimizer.step(closure_with_penalty)

        # The lrs on each device before the inner step: a bad lr (or one that
        # cannot be copied during graph capture) raises before anything changed.
        lrs = self._lrs()
        group_lrs = {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        work = []  # a fresh list, assigned once: torch.compile guards no list length
        for bucket in plan.buckets:
            params, groups, l1, l2 = bucket.active()
            if params:
                work.append((params, l1, l2, group_lrs[bucket.device].index_select(0, groups)))
        prox_buckets(work)
        self._last = [(params, l1, l2) for params, l1, l2, _ in work]
        return loss

    # -- observability ------------------------------------------------------------
    @property
    def penalty(self) -> Tensor:
        """0-dim tensor: the penalty ``sum l1*|w| + l2*w^2`` of the last step.

        Gradient mode: the value ``add_penalty_grad_`` returned, i.e. of the
        weights *before* the inner step (the penalty in that step's loss).
        Proximal mode: of the regularized weights *after* the step, computed
        with ``pyreg.penalty`` lazily on first access after the step (so steps
        never pay for it). 0 before the first step. Never syncs the host.
        """
        if self._penalty is None:
            total = None
            for params, l1, l2 in self._last:
                value = ops.penalty([p.detach() for p in params], l1, l2)
                total = value if total is None else _sum(total, value)
            self._penalty = total if total is not None else torch.zeros(())
        return self._penalty

    def stats(self) -> ParamStats:
        """Per-parameter :class:`ParamStats` of every parameter of the optimizer
        (regularized or not), named from the groups' ``param_names`` (else
        ``"param_groups.<group>.<index>"``). One ``weight_stats`` call per
        (device, dtype) bucket; no host sync."""
        plan = self._plan()
        parts = [ops.weight_stats(ps) for ps in plan.stat_buckets]
        if not parts:
            e = torch.zeros(0)
            return ParamStats([], e, e.clone(), e.clone(), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64))
        dev = plan.first_device
        rd = torch.float64 if any(s.l1.dtype == torch.float64 for s in parts) else torch.float32

        def cat(field, dtype):
            return torch.cat([getattr(s, field).to(device=dev, dtype=dtype) for s in parts])[plan.inverse]

        return ParamStats(list(plan.names), cat("l1", rd), cat("l2", rd), cat("linf", rd),
                          cat("nnz", torch.int64), plan.numel)

    def sparsity(self) -> Sparsity:
        """Fraction of exact zeros over all parameters of the optimizer
        (``overall``) and per parameter; tensors, no host sync."""
        s = self.stats()
        numel = s.numel.to(torch.float64)
        zeros = numel - s.nnz.to(torch.float64)
        per = (zeros / numel.clamp_min(1)).to(torch.float32)
        overall = (zeros.sum() / numel.sum().clamp_min(1)).to(torch.float32)
        return Sparsity(overall, per, s.names)


# --------------------------------------------------------------------------
# The functional core: what a step does to the gathered buckets
# --------------------------------------------------------------------------
def prox_buckets(buckets: Sequence[Tuple[List[Tensor], Tensor, Tensor, Tensor]]) -> None:
    """The proximal step of each bucket ``(params, l1, l2, lr)`` (per-tensor
    float64 tensors on the params' device), in place."""
    for params, l1, l2, lr in buckets:
        ops.prox_(params, l1, l2, lr)


def add_penalty_grads(buckets: Sequence[Tuple[List[Tensor], List[Tensor], Tensor, Tensor]]) -> Tensor:
    """``g += l1 * sign(w) + 2 * l2 * w`` for each bucket ``(params, grads, l1,
    l2)``; returns the total penalty of the params (0-dim). With several
    buckets, every bucket's grads are checked before the first one is written,
    so a bad grad changes nothing."""
    if len(buckets) > 1 and not torch.compiler.is_compiling():
        for params, grads, _, _ in buckets:
            check_grads_apart(params, tensor_list(grads, "grads"))
    total = None
    for params, grads, l1, l2 in buckets:
        value = ops.add_penalty_grad_(params, grads, l1, l2)
        total = value if total is None else _sum(total, value)
    return total if total is not None else torch.zeros(())


@torch.compiler.disable
def _plan_outside_graph(opt: "Regularized") -> _Plan:
    return opt._plan()


def _sum(a: Tensor, b: Tensor) -> Tensor:
    """a + b for 0-dim results of different buckets (dtype and device of the widest / first)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt) + b.to(device=a.device, dtype=dt)


# --------------------------------------------------------------------------
# Building param groups from a model
# --------------------------------------------------------------------------
_NORM_TYPES: Tuple[type, ...] = tuple(
    t for t in (getattr(nn.modules.batchnorm, "_NormBase", None), nn.LayerNorm, nn.GroupNorm,
                getattr(nn, "RMSNorm", None), nn.LocalResponseNorm)
    if t is not None)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def default_exclude(name: str, param: Tensor, module: nn.Module) -> bool:
    """The default rule of :func:`param_groups`: True (not regularized) for

    * biases (the attribute name is ``bias`` or ends with ``_bias``),
    * every parameter of a normalization layer (BatchNorm*, InstanceNorm*,
      SyncBatchNorm, LayerNorm, GroupNorm, RMSNorm, or any module whose class
      name contains ``"Norm"``, e.g. third-party ``LlamaRMSNorm``),
    * every parameter of an embedding (``nn.Embedding``, ``nn.EmbeddingBag``),
    * any other parameter with at most one dimension (scales, gains, biases of
      custom modules).
    """
    leaf = name.rsplit(".", 1)[-1]
    return (leaf == "bias" or leaf.endswith("_bias")
            or isinstance(module, _NORM_TYPES + _EMBEDDING_TYPES)
            or "Norm" in type(module).__name__
            or param.dim() <= 1)


def _matches(pattern: str, name: str, module_name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or (bool(module_name) and fnmatch.fnmatchcase(module_name, pattern))


def param_groups(model: nn.Module, l1: float = 0.0, l2: float = 0.0,
                 exclude: Union[None, Callable[[str, Tensor, nn.Module], bool], Sequence[str]] = None,
                 overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Param groups for ``model`` with per-group ``l1``/``l2`` and parameter names.

    Every trainable parameter (``requires_grad``; frozen ones are skipped)
    appears once, in ``model.named_modules()`` order (a shared/tied parameter
    belongs to the first module that holds it). Parameters are regularized
    with ``l1``/``l2`` unless excluded, which puts them into a group with
    ``l1 = l2 = 0``:

    * ``exclude=None``: :func:`default_exclude` (biases, normalization layers,
      embeddings and all parameters with ``ndim <= 1``);
    * ``exclude=callable(name, param, module) -> bool``: your rule instead;
    * ``exclude=["*.bias", "encoder.*", ...]``: fnmatch patterns instead,
      matched against the parameter's qualified name or its module's name;
      ``exclude=[]`` excludes nothing.

    ``overrides={pattern: {"l1": ..., "l2": ..., "lr": ...}}`` sets options
    for the parameters whose qualified name or module name matches the
    pattern (fnmatch-style, e.g. ``"encoder.layers.*"``, ``"fc"``); they are
    applied in order (later patterns win) on top of the base options, so an
    explicit ``l1``/``l2`` override applies even to an excluded parameter.
    Any other key (``lr``, ``weight_decay``, ...) is passed to the optimizer.
    A pattern that matches no parameter is an error (a likely typo).

    Parameters with equal options share a group. Each group is
    ``{"params": [...], "param_names": [...], "l1": ..., "l2": ..., **options}``
    (``param_names`` is torch.optim's own key for names, kept in state dicts).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    base = {"l1": nonneg_real(l1, "l1"), "l2": nonneg_real(l2, "l2")}
    if exclude is None:
        rule = default_exclude
    elif callable(exclude):
        rule = exclude
    elif isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError("exclude must be None, a callable(name, param, module) or a list of name patterns")
    else:
        patterns = list(exclude)
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"exclude patterns must be strings, got {type(p).__name__}")
        rule = None
    overrides = dict(overrides or {})
    for pattern, opts in overrides.items():
        if not isinstance(pattern, str) or not isinstance(opts, dict):
            raise TypeError("overrides must map name patterns (str) to dicts of group options")
        if "params" in opts or "param_names" in opts:
            raise ValueError(f"overrides[{pattern!r}] may not set 'params' or 'param_names'")
        for key in _COEF_KEYS:
            if key in opts:
                nonneg_real(opts[key], f"overrides[{pattern!r}][{key!r}]")
    used = set()

    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            if rule is not None:
                excluded = bool(rule(name, param, module))
            else:
                excluded = any(_matches(p, name, module_name) for p in patterns)
            opts = {"l1": 0.0, "l2": 0.0} if excluded else dict(base)
            for pattern, extra in overrides.items():
                if _matches(pattern, name, module_name):
                    opts.update(extra)
                    used.add(pattern)
            for group in groups:
                if group["_opts"] == opts:
                    break
            else:
                group = {"_opts": opts, "params": [], "param_names": []}
                groups.append(group)
            group["params"].append(param)
            group["param_names"].append(name)
    unused = [p for p in overrides if p not in used]
    if unused:
        raise ValueError(f"overrides pattern(s) {unused} match no trainable parameter of the model")
    out = []
    for group in groups:
        opts = group.pop("_opts")
        out.append({"params": group["params"], "param_names": group["param_names"], **opts})
    return out
