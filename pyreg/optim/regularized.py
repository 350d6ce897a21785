"""``Regularized``: L1 / L2 / elastic-net regularization around any torch optimizer.

    opt = pyreg.Regularized(torch.optim.AdamW(pyreg.param_groups(model, l1=0.3)),
                            mode="proximal")

The wrapper is a real :class:`torch.optim.Optimizer` that *shares* the inner
optimizer's ``param_groups`` and ``state`` (it holds no copy), so LR schedulers,
``zero_grad``, ``add_param_group``, step hooks, closures, ``GradScaler`` and
state dicts work on it as on the inner optimizer.

Coefficients live in the param groups (keys.py lists them and the forms they
take; the wrapper's arguments are the defaults for ``l1``/``l2``) and may be
changed at any time, e.g. ``opt.param_groups[0]["l1"] = 1e-4``; the change is
checked and takes effect at the next step. The engine (engine.py) reads,
checks and plans them, as for the fused optimizers; each step then calls one
fused op per bucket (apply.py). A step does no host sync.
"""
from __future__ import annotations

import numbers
from operator import is_
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._common import outside_graph
from .._validate import nonneg_real
from ._torch_compat import init_without_groups, step_with_own_hooks
from . import apply
from .apply import (STRENGTH_KINDS, STRENGTH_STEP, add_penalty_grads, constraints, misfit_state, penalized,
                    pop_own_state, prox_buckets, put_own_state, record_strength_step, refresh_strength, step_quantiles,
                    store_strength, strength_due, strength_l1, strength_pushes)
from .engine import Engine, Observable, keep_own_keys, param_list, plan_outside_graph, warn_near_misses
from .keys import hyper_keys_of, read_group
from ..backends import _marshal as m
from .plan import Bucket, Plan, Work

__all__ = ["Regularized"]

_is_compiling = torch.compiler.is_compiling
_get_num_threads = torch.get_num_threads
_increment_version = torch.autograd.graph.increment_version


def _version_bump() -> Callable[[List[Tensor]], None]:
    """What bumps the autograd version of a list of tensors in one call:
    torch's own C function where it takes a list, else the public one."""
    raw = getattr(torch._C, "_increment_version", None)
    try:
        raw([])
    except Exception:  # noqa: BLE001  an older signature: one tensor at a time
        return _increment_version
    return raw


_bump = _version_bump()

#: What :meth:`Regularized._fast_step` answers when the step must take the full path.
_FULL_PATH = object()

MODES = ("proximal", "gradient")


def _check_mode(mode: str, plan: Plan) -> None:
    """The keys that only the proximal mode applies (at construction, and at
    each step: the mode and the groups may change)."""
    if mode != "proximal" and any(b.kind in ("target", "strength", "gstrength") for b in plan.buckets):
        raise ValueError("target_sparsity, l1_strength and group_strength set the coefficients of the "
                         "proximal step, which gives exact zeros: use mode='proximal'")


class Regularized(Observable, Optimizer):
    """Add L1 / L2 / elastic-net regularization to any ``torch.optim`` optimizer.

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`).
        l1: default L1 coefficient for groups without an ``"l1"`` key (it is
            written into the groups). The penalty is
            ``R(w) = l1 * sum|w| + l2 * sum w^2`` (no 1/2; ``l2 = wd / 2`` is
            torch's ``weight_decay=wd``).
        l2: default L2 coefficient for groups without an ``"l2"`` key.
        mode: ``"proximal"`` (default): after the inner step,
            ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` with each
            group's current ``lr`` (exact zeros for L1; the L2 part is decoupled
            weight decay). ``"gradient"``: before the inner step,
            ``g += l1 * sign(w) + 2 * l2 * w`` (the penalty in the loss, as Keras).

    Structured regularizers, per param group (set them with
    :func:`param_groups`' ``overrides`` and ``ref``, or in the groups):

    * ``"group_l1"`` (default 0) and ``"group_dim"`` (default 1): group lasso,
      ``group_l1 * sum_g ||w_g||_2`` over the slices of each weight along
      ``group_dim`` (1: an ``nn.Linear``'s input columns; 0: its output rows).
      Proximal mode applies the exact prox of ``l1``, ``group_l1`` and ``l2``
      together (``pyreg.group_prox_``): whole groups become exactly zero.
    * ``"ref"`` (default None): one reference tensor (or None) per parameter;
      ``l1``/``l2`` then regularize ``w - ref`` (L1-SP / L2-SP, for
      fine-tuning). Not combined with ``group_l1``.
    * ``"max_norm"`` (default None) and ``"max_norm_dim"`` (default 0): after
      the step, each slice along ``max_norm_dim`` is scaled onto the ball of
      radius ``max_norm`` (``pyreg.max_norm_``), in either mode.
    * ``"target_sparsity"`` (default None): each step's ``l1`` is, per
      tensor, the one that zeroes that fraction of it
      (:func:`pyreg.optim.apply.target_prox`; proximal mode).
    * ``"l1_strength"`` (default None, a fraction in [0, 1]) and
      ``"l1_refresh"`` (default 10): every ``l1_refresh`` steps each tensor's
      ``l1`` becomes that quantile of the magnitudes of the inner
      optimizer's step divided by lr (its push;
      :func:`pyreg.optim.apply.refresh_strength`; 0 until the first
      refresh; proximal mode).
    * ``"l2_bound"``, ``"l2_warmup"``, ``"l2_mu"``: a bound on each tensor's
      squared norm, kept by a Lagrange multiplier after the step
      (Constrained Parameter Regularization,
      :func:`pyreg.optim.apply.l2_bound_buckets`), in either mode.

    Parameters whose ``grad`` is None are not touched in either mode, nor are
    groups without any regularizer.

    Observability (no host sync): :attr:`penalty`, :meth:`stats`, :meth:`sparsity`.

    Wrap a torch optimizer: pyreg's fused optimizers (``pyreg.optim.SGD``,
    ``Adam``, ``AdamW``, ``Adagrad``, ``RMSprop``) apply the same keys in their
    own step, and wrapping one raises ``TypeError`` (it would regularize twice).

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
    _engine: Engine

    def __init__(self, optimizer: Optimizer, l1: float = 0.0, l2: float = 0.0, mode: str = "proximal"):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Regularized wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if getattr(optimizer, "_pyreg_fused", False):
            raise TypeError(
                f"Regularized wraps a torch optimizer; {type(optimizer).__module__}.{type(optimizer).__name__} "
                "already applies pyreg's regularization (l1, l2, group_l1, ref, max_norm) in its own step, "
                "so wrapping it would regularize twice. Use it on its own (it has penalty, stats() and "
                "sparsity() too), or wrap the torch optimizer it extends, e.g. "
                "pyreg.Regularized(torch.optim.AdamW(...))")
        if isinstance(optimizer, Regularized):
            raise TypeError("Regularized wraps a torch optimizer, not another Regularized: the inner one already "
                            "applies its groups' l1, l2 and other keys, so wrapping it would regularize twice. "
                            "Set the coefficients on the one you have (its param_groups, or add_param_group)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # Not Optimizer.__init__: it would copy the groups.
        init_without_groups(self)
        self.optimizer = optimizer
        self.mode = mode
        self.l1 = nonneg_real(l1, "l1")
        self.l2 = nonneg_real(l2, "l2")
        self._engine = Engine({"l1": self.l1, "l2": self.l2}, hyper_keys_of(type(optimizer)), metric=False)
        self._out: Dict[str, Any] = {"last": [], "penalty": None}  # backs _last and _penalty
        self._fast: Optional[tuple] = None  # see fast_prox
        self._fast_plan: Optional[Plan] = None
        self._counter: Optional[tuple] = None  # the strengths' counter of steps (_new_counter), with its key
        _check_mode(mode, self._plan())  # validates everything before the groups are touched
        for gi, g in enumerate(self.param_groups):
            warn_near_misses(g, optimizer.defaults, f"param_groups[{gi}]")
        self._engine.check_hypers(self.param_groups)
        if mode == "proximal":
            self._engine.lrs(self.param_groups)
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
        # Not the caches, nor (as torch's optimizers) the hooks and a step wrapped on the instance by an
        # LR scheduler (which holds the original optimizer: a copy would step it).
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)  # (torch's: empty hooks, the step patched)
        self._out = {"last": [], "penalty": None}
        self._fast, self._fast_plan, self._counter = None, None, None

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
        param_group = dict(param_group)
        if "params" in param_group:
            param_group["params"] = param_list(param_group["params"])
        param_group.setdefault("l1", self.l1)  # (checked with the group: the attributes may have been set since)
        param_group.setdefault("l2", self.l2)
        trial = self._engine.check_added(param_group, self.optimizer.defaults, len(self.param_groups),
                                         self.param_groups)
        if trial is not None:
            _check_mode(self.mode, trial)
        self.optimizer.add_param_group(param_group)
        self._engine.reset()
        self._fast = None

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
        optimizer: then the wrapper's defaults and mode are kept, and each group
        keeps the pyreg keys it holds now). Checked as a step checks it (the
        mode against the keys, torch's hyperparameters, the parameters against
        the keys), pyreg's own state entries included: a bad one raises and the
        optimizer keeps what it had."""
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
        defaults = {"l1": l1, "l2": l2}
        for gi, group in enumerate(sd.get("param_groups", [])):
            n = len(group.get("params", ()))
            read_group(dict(group, params=[None] * n), defaults, f"state_dict param_groups[{gi}]")
        sd, bounds = pop_own_state(sd)
        before = [dict(g) for g in self.param_groups]
        inner = self.optimizer
        old = (inner.state, inner.param_groups, self.mode, self.l1, self.l2, self._engine)
        try:  # (torch's load makes new groups and state: the old ones stand until all is checked)
            try:  # (it can raise after it set them: an SGD state dict into Adam)
                inner.load_state_dict(sd)
            except KeyError as e:
                raise misfit_state(type(inner).__name__, e) from e
            keep_own_keys(before, self.param_groups, sd.get("param_groups", []))
            put_own_state(self.state, self.param_groups, sd.get("param_groups", []), bounds)
            self.mode, self.l1, self.l2 = mode, l1, l2
            self._engine = Engine(defaults, self._engine.hyper_keys, metric=False)
            self._fast, self._fast_plan = None, None
            self._fill_defaults()
            _check_mode(self.mode, self._engine.prepare(self.param_groups).plan)  # (what a step checks)
        except BaseException:
            inner.state, inner.param_groups, self.mode, self.l1, self.l2, self._engine = old
            self._engine.reset()
            self._fast, self._fast_plan = None, None
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- the engine ----------------------------------------------------------------
    def _plan(self) -> Plan:
        """The engine's plan of the groups (checked again where one changed)."""
        return self._engine.plan(self.param_groups)

    # -- the step ---------------------------------------------------------------
    def _inner_step(self, closure: Optional[Callable[[], Any]]):
        """The inner optimizer's step, with its own step hooks but not the global
        ones: those run once, around this wrapper's step, as for any optimizer.
        A scheduler made on the inner optimizer wrapped its ``step`` to record
        the call (its first step warns otherwise): the call is recorded."""
        out = step_with_own_hooks(self.optimizer, closure)
        if hasattr(vars(self.optimizer).get("step"), "_wrapped_by_lr_sched"):
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return out

    def _add_penalty_grads(self, work: List[Work], undo: bool = False) -> None:
        """Gradient mode: the penalty's gradient into the grads. A group with
        torch's ``maximize`` ascends its grads: their penalty gradient is
        subtracted (added to the negated grads, which are negated back: exact),
        so that the penalty still pulls toward zero, as the prox does. With
        ``undo``, the other way round: the gradient added is taken back out
        (where the inner step raised; to rounding)."""
        pen = penalized(work)
        groups = self.param_groups
        up = [g for g in groups if bool(g.get("maximize")) != undo]  # (truthy, as torch reads it)
        if up:
            ids = {id(p) for w in pen for p in w.params}
            up = [p.grad for g in up for p in g["params"] if id(p) in ids and p.grad is not None]
        for g in up:
            g.neg_()
        try:
            try:
                value = add_penalty_grads(pen)
            except TypeError:  # (checked before anything is written: name a sparse grad)
                _check_dense_grads(pen, groups)
                raise
            if not undo:
                self._penalty = value
        finally:
            for g in up:
                g.neg_()

    def _step_with_penalty_grads(self, plan: Plan, work: List[Work], closure: Optional[Callable[[], Any]]) -> Any:
        """Gradient mode's inner step, with the penalty gradient in the grads
        (``work``: the buckets with a grad; with a closure, filled at each
        evaluation, after which the gradient is added). Where the step raises,
        the gradient added is taken back out of the grads before the error goes
        on. Returns the inner step's loss; with a closure, the first loss the
        user's closure returned (without the penalty)."""
        added: List[List[Work]] = []
        first: list = []
        try:
            if closure is None:
                self._add_penalty_grads(work)
                added.append(work)
                return self._inner_step(None)
            loss = self._inner_step(self._closure_with_penalty(plan, work, closure, added, first))
            return first[0] if first else loss
        except BaseException:
            if added:
                self._add_penalty_grads(added[-1], undo=True)
            raise

    def _closure_with_penalty(self, plan: Plan, work: List[Work], closure: Callable[[], Any], added: list,
                              first: list) -> Callable[[], Any]:
        """The closure the inner optimizer calls in gradient mode: the user's
        (its loss kept in ``first`` the first time), then the penalty's
        gradient into the grads it made (noted in ``added``); it returns the
        loss plus the penalty, the objective whose gradient the grads now hold
        (an optimizer with a line search, such as LBFGS, compares those
        values; where a group maximizes, the loss alone)."""
        maximize = any(bool(g.get("maximize")) for g in self.param_groups)

        def closure_with_penalty():
            added.clear()
            loss = closure()
            if not first:
                first.append(loss)
            work[:] = [w for w in map(Bucket.active, plan.buckets) if w is not None]
            self._add_penalty_grads(work)
            added.append(list(work))
            pen = self._penalty
            if maximize or pen is None:
                return loss
            if isinstance(loss, Tensor):
                return loss + pen.to(device=loss.device, dtype=loss.dtype)
            if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
                return loss + float(pen)
            return loss

        return closure_with_penalty

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of the inner optimizer with regularization (see the class
        docstring). A closure is passed through; in gradient mode the penalty
        gradient is added after each closure evaluation. Returns the inner
        step's return value (the closure's loss, without the penalty).

        The step gathers, per bucket (device, dtype and kind of
        regularization), the parameters with a grad and their per-tensor
        coefficients and lrs; the functional core (:func:`add_penalty_grads`,
        :func:`prox_buckets`, :func:`max_norm_buckets`) does the rest."""
        if self.mode not in MODES:  # set after construction
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # Validation happens here, before anything changes. Under torch.compile
        # it runs outside the graph, so the coefficients (Python floats in the
        # groups) are not baked into it: changing them recompiles nothing.
        fast = self._fast
        if fast is not None and closure is None and self.mode == "proximal" and not _is_compiling():
            # Nothing changed since a step that made every check (an lr may be a new float):
            # the inner step, then the element prox straight into the CPU kernels.
            status = None
            if fast[5]:  # torch's wrapped inner step: all of it in one call (l1_strength's counts included)
                status, loss = fast[0].step()
                if status == 1:
                    return loss
                if status == 2:  # the inner step (counted) replaced a tensor's memory: no refresh was due
                    return self._prox_in_full(None, loss)
            # (None: another inner step; 3: the inner optimizer's own step hooks; 4: an l1_strength refresh
            # due; 0, nothing done: something changed, the full path below checks it)
            if status != 0:  # the step from here, its bookkeeping and refreshes in Python
                taken = self._strength_taken(fast) if fast[3] else None  # (l1_strength: this step counted)
                if taken is not _FULL_PATH:
                    if fast[0].same(self.optimizer.param_groups) and apply.direct_backend() is not None:
                        return self._fast_step(fast, taken)
                    if taken:
                        _put_back(taken[0])
        self._fast = None
        groups = self.param_groups
        proximal = self.mode == "proximal"
        if torch.compiler.is_compiling():
            plan, lrs = plan_outside_graph(self._engine, groups), None
            if proximal:
                lrs = self._engine.lrs(groups)
        else:
            plan, lrs, _ = self._engine.prepare(groups, lrs=proximal)
        _check_mode(self.mode, plan)
        self._last, self._penalty = [], None
        if self.mode == "gradient":
            work = [] if closure is not None else [w for w in map(Bucket.active, plan.buckets) if w is not None]
            loss = self._step_with_penalty_grads(plan, work, closure)
            constraints(work, self.state, self.param_groups)
            return loss

        # The lrs on each device before the inner step: a bad lr (or one that
        # cannot be copied during graph capture) raises before anything changed.
        group_lrs = {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}
        # l1_strength: the params whose l1 this step refreshes, as they were
        # before the inner step (their push is the step it makes).
        strength = [b for b in plan.buckets if b.kind in STRENGTH_KINDS]
        # (what reads and writes the host counts is never traced by torch.compile: traced, it would be guarded
        # on counts that change at every step, and recompiled at every step; after a graph break torch.compile
        # traces each function called, even where is_compiling() is False at the call)
        taken: List[tuple] = []  # (counts, before), once the grads of this step exist
        inner = closure
        # the strengths' steps counted in C (pyreg._C.StrengthCounts) where no refresh is due and nothing
        # changed since the counter was made (else in Python); taken back if the inner step raises
        counted = _count_in_c(self._counter, plan, strength, self.state) if strength and closure is None else None
        if strength and closure is None:
            if counted is None:
                taken.append(_strength_before_eager(strength, self.state))
        elif strength:  # a closure makes the grads inside the inner step: the params with one count, after its
            # first call (before any update: an optimizer evaluates its closure first)
            def inner():
                loss = closure()
                if not taken:
                    taken.append(_strength_before_eager(strength, self.state))
                return loss
        try:
            loss = self._inner_step(inner)
        except BaseException:
            _put_back(taken[0][0] if taken else [])
            if counted is not None:
                _uncount(counted, self.state)
            raise
        before = taken[0][1] if taken else None
        work = (_prox_after_step_eager if strength else Regularized._prox_after_step)(
            self, plan, lrs, group_lrs, before, None if counted is None else counted[3])
        if taken and closure is None:  # (counted in Python: a counter for the next steps, where none serves)
            self._counter = _new_counter_eager(self._counter, plan, strength, self.state)
        if closure is None and not torch.compiler.is_compiling():
            self._fast = fast_prox(groups, plan, work, self._engine, self._fast_plan, self.state,
                                   self.optimizer, self._out)
            self._fast_plan = plan
        return loss

    def _strength_taken(self, fast: tuple):
        """A fast step's l1_strength bookkeeping before its inner step, as the
        full path's (:func:`_strength_before`): (the counts before this step,
        a copy of each param whose l1 this step refreshes); _FULL_PATH
        (nothing counted) where a bucket's l1 vector is no longer the
        state's (a state loaded into the inner optimizer)."""
        state = self.state
        if not all(strength_l1(w, state) is vec for w, vec in fast[3]):
            return _FULL_PATH
        return _strength_before([w.bucket for w, _ in fast[3]], state)

    def _fast_step(self, fast: tuple, taken: Optional[tuple]):
        """The step on the fast path (see :func:`fast_prox`), the inner
        step run here (in Python, its own hooks included), with ``taken``
        (:meth:`_strength_taken`) where the plan has l1_strength buckets."""
        guard, params, pen, strength, plan, _ = fast
        before = counts = None
        if strength:  # l1_strength: as the full path, with its prox in the CPU kernels
            counts, before = taken
        try:
            loss = step_with_own_hooks(self.optimizer, None)
        except BaseException:
            if before is not None:
                _put_back(counts)
            raise
        # the quantiles of the steps of the tensors due (before the prox), or their steps into new tensors:
        # `before` stays as it was for the full path below
        pushes = [(w, step_quantiles(w, before)) for w, _ in strength] if before else ()
        pushes = [(w, q if q is not None else strength_pushes(
            w, lambda p: torch.sub(before[id(p)], p.detach()) if id(p) in before else None)) for w, q in pushes]
        if not guard.prox(_get_num_threads()):  # the inner step replaced a tensor's memory
            return self._prox_in_full(before, loss)
        _bump(params)
        if before is not None:
            record_strength_step([w.bucket for w, _ in strength], self.state)
            if pushes:
                lrs = [g["lr"] for g in self.param_groups]  # (floats: the guard checked them)
                group_lrs = {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}
                for (w, due), (_, vec) in zip(pushes, strength):
                    lr = plan.work_lr(w, lrs, group_lrs)
                    if isinstance(due, tuple):  # (selected: the quantiles, into l1 units)
                        store_strength(w, due[0], due[1], self.state, lr=lr, vec=vec)
                    else:
                        refresh_strength(w, due, self.state, lr=lr, vec=vec)
        out = self._out
        out["last"], out["penalty"] = pen, None
        return loss

    def _prox_in_full(self, before: Optional[Dict[int, Tensor]], loss: Any) -> Any:
        """After a fast step's inner step that replaced a tensor's memory: the
        rest of the step on the full path (``before`` as for
        :meth:`_prox_after_step`). Returns ``loss``."""
        self._fast = None
        plan, lrs, _ = self._engine.prepare(self.param_groups)
        self._prox_after_step(plan, lrs, {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}, before)
        return loss

    def _prox_after_step(self, plan: Plan, lrs: list, group_lrs: Dict[torch.device, Tensor],
                         before: Optional[Dict[int, Tensor]], vecs: Optional[Dict[int, Tensor]] = None
                         ) -> List[Work]:
        """The proximal step's part after the inner step: the prox of each
        bucket, the l1_strength refreshes (``before``: the params they refresh,
        as they were before the inner step), the constraints. Returns the
        buckets restricted to the params with a grad. ``vecs``: the strength
        buckets' coefficient vectors by bucket id, where the step's counter
        found the state holding them (see :func:`_count_in_c`)."""
        if before is not None:
            record_strength_step(plan.buckets, self.state)
        work = [w for w in map(Bucket.active, plan.buckets) if w is not None]
        pen = penalized(work)
        lr_of = [(w, plan.work_lr(w, lrs, group_lrs)) for w in pen]
        # the quantiles of the steps of the tensors due (before the prox), or their steps
        steps = [(w, lr, step_quantiles(w, before)) for w, lr in lr_of if w.kind in STRENGTH_KINDS and before]
        steps = [(w, lr, q if q is not None else strength_pushes(
            w, lambda p: before[id(p)].sub_(p.detach()) if id(p) in before else None)) for w, lr, q in steps]
        prox_buckets(lr_of, self.state, vecs)
        for w, lr, due in steps:
            if isinstance(due, tuple):  # (selected: the quantiles, into l1 units)
                store_strength(w, due[0], due[1], self.state, lr=lr)
            else:
                refresh_strength(w, due, self.state, lr=lr)
        constraints(work, self.state, self.param_groups)
        self._last = pen
        return work


#: What a copy or pickle of Regularized leaves out (see its __getstate__).
_NOT_COPIED = frozenset(("_out", "_fast", "_fast_plan", "_counter", "step", "_optimizer_step_pre_hooks",
                         "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                         "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks"))


def _check_dense_grads(work: List[Work], groups: List[Dict[str, Any]]) -> None:
    """Gradient mode adds the penalty's gradient to each regularized grad in
    place: a sparse one (an embedding's, which the ops refuse before
    anything is added) is named."""
    for w in work:
        for p in w.params:
            g = p.grad
            if g is not None and g.layout is not torch.strided:
                gi, j = next((gi, j) for gi, grp in enumerate(groups) for j, q in enumerate(grp["params"]) if q is p)
                raise TypeError(f"param_groups[{gi}]['params'][{j}] has a {g.layout} grad: mode='gradient' adds "
                                "the penalty's gradient to dense grads only; use mode='proximal' (torch's step, "
                                "then the prox), which takes it")


def _strength_before(buckets: List[Bucket], state) -> Tuple[list, Optional[Dict[int, Tensor]]]:
    """The l1_strength buckets' counts before the step (:func:`_counts`) and
    a copy of each param whose l1 this step refreshes, as it is before the
    inner step (its push is the step it makes); None without such buckets."""
    counts = _counts(buckets)
    return counts, ({id(p): p.detach().clone() for b, _ in counts for p in strength_due(b, state)}
                    if counts else None)


_strength_before_eager = outside_graph(_strength_before)


def _counts_key(plan: Plan, strength: List[Bucket]) -> tuple:
    """What a counter of the strength buckets' steps was made for (see
    :func:`_count_in_c`): the plan, the params with a grad, each bucket's
    ``l1_refresh`` values (the same list while they are the same)."""
    return (plan, [p.grad is not None for b in strength for p in b.params], [b.values["l1_refresh"] for b in strength])


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and all(map(is_, a[2], b[2]))


@outside_graph
def _count_in_c(kept: Optional[tuple], plan: Plan, strength: List[Bucket], state) -> Optional[tuple]:
    """Counts this step of the strength buckets' params in the state with
    ``kept``'s counter (``(key, pyreg._C.StrengthCounts, its params, the
    buckets' coefficient vectors by bucket id)``, see :func:`_new_counter`)
    where it serves: made for this plan, the same params with a grad and the
    same refresh periods (:func:`_counts_key`), the state as it saw it, and
    no refresh due at this step. Returns ``kept`` then, else None (nothing
    counted: the step counts in Python)."""
    if kept is None or torch.compiler.is_compiling() or not _same_key(kept[0], _counts_key(plan, strength)):
        return None
    return kept if kept[1].step(state) == 0 else None


def _uncount(kept: tuple, state) -> None:
    """Takes back the count :func:`_count_in_c` made for a step whose inner
    step raised (a step that failed is not counted)."""
    for p in kept[2]:
        state[p][STRENGTH_STEP] -= 1


def _new_counter(kept: Optional[tuple], plan: Plan, strength: List[Bucket], state) -> Optional[tuple]:
    """After a step that counted in Python: ``kept`` where it still serves,
    else a new counter of the strength buckets' params with a grad
    (:func:`apply.strength_counter`), with its key; None where none can be
    made (without the compiled module, or a param without its state)."""
    key = _counts_key(plan, strength)
    if kept is not None and _same_key(kept[0], key) and kept[1].due(state) >= 0:  # (-1: a state it did not see)
        return kept
    works = [w for w in map(Bucket.active, strength) if w is not None]
    vecs = {id(w.bucket): strength_l1(w, state) for w in works}  # (first: the state's entries then are theirs)
    counter = apply.strength_counter(works, state) if works else None
    return None if counter is None else (key, counter, [p for w in works for p in w.params], vecs)


_new_counter_eager = outside_graph(_new_counter)


def _counts(buckets: List[Bucket]) -> List[Tuple[Bucket, Optional[List[int]]]]:
    """The "strength" buckets' step counts as they are before a step
    (:func:`strength_due` counts the step before the inner step runs)."""
    return [(b, b.steps_taken) for b in buckets]


def _put_back(counts: List[Tuple[Bucket, Optional[List[int]]]]) -> None:
    """Puts back the counts of :func:`_counts` after an inner step that
    raised: a step that failed is not counted."""
    for b, c in counts:
        b.steps_taken = c


def fast_prox(groups: List[Dict[str, Any]], plan: Plan, work: List[Work], engine: Engine,
              last_plan: Optional[Plan], state: Dict[Any, Dict[str, Any]], inner: Optimizer,
              out: Dict[str, Any]) -> Optional[tuple]:
    """After a proximal step that made every check: ``(pyreg._C.FastProx,
    the regularized params, the step's buckets for ``penalty``, the
    l1_strength buckets with their l1 vectors, the plan, whether
    ``FastProx.step`` makes the whole step: the inner optimizer's step is
    torch's wrapped one; with l1_strength, it counts the steps too, in the
    state, and leaves a step with a refresh due to Python)`` when the
    next steps can take the fast path, else None. The fast path is for the
    common case: every regularized parameter in an element-wise L1/L2 or
    ``l1_strength`` bucket that the CPU kernels take directly (plain, dense,
    disjoint CPU tensors, each with a grad), every group's lr a float, no
    group setting that can change in place (a tensor, a list), and the same
    plan as the step before (groups that change at every step, other than
    their lr, gain nothing from it). ``FastProx.same`` then checks at each
    step, at C speed, that the groups are still exactly so; when it finds
    any other change, the step takes the full path, which checks (and
    raises on) it. An l1_strength bucket's prox reads its l1 from the
    vector in the optimizer's state, which its refreshes update in place
    (and the step checks that the state still holds it)."""
    from .._lib import _C  # noqa: PLC0415

    if (plan is not last_plan or _C is None or not hasattr(_C, "FastProx") or apply.direct_backend() is None
            or not plan.buckets or len(work) != len(plan.buckets)):
        return None
    seen = engine.seen_groups()
    if seen is None or len(seen) != len(groups) or any(s.mutable for s in seen):
        return None
    if type(groups) is not list or any(type(g) is not dict or type(g.get("lr")) is not float
                                       or type(g.get("params")) is not list for g in groups):
        return None
    buckets, strength = [], []
    for w in work:
        d = (w.bucket.direct() if w.kind in ("elem", "strength") and w.params is w.bucket.params
             else None)
        if d is None:
            return None
        if w.kind == "strength":
            vec = strength_l1(w, state)
            strength.append((w, vec))
            coefs = [vec, w.coef("l2", True)]
        else:
            coefs = [w.coef(k, True) for k in ("l1", "l2")]
        n = len(w.params)
        args = [m.coef(c, w.bucket.device, n) for c in coefs]
        buckets.append((list(w.params), list(w.bucket.groups), list(d[2]), args[0], args[1], tuple(coefs)))
    try:
        guard = _C.FastProx(groups, buckets)
    except ValueError:  # something it does not take: the full path
        return None
    params, pen = [p for w in work for p in w.params], list(penalized(work))
    step = type(inner).step
    whole = getattr(step, "hooked", False)
    if whole and strength:  # l1_strength's counts, kept by the one call too
        counter = apply.strength_counter([w for w, _ in strength], state)
        if counter is None:
            whole = False
        else:
            guard.bind_counts(counter)
    if whole:  # torch's wrapped step: the whole step in one call
        guard.bind_step(inner, step, apply.direct_backend, _get_num_threads, _bump, params, out, pen)
    return guard, params, pen, strength, plan, whole


#: Regularized._prox_after_step outside any compiled graph (l1_strength's refreshes under torch.compile).
_prox_after_step_eager = outside_graph(Regularized._prox_after_step)
