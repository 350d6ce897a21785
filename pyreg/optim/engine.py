"""The regularization engine behind both optimizer families.

One :class:`Engine` per optimizer reads its param groups' keys (keys.py),
checks them and torch's hyperparameters, plans the buckets (plan.py) and
caches all of it until a group changes. :class:`pyreg.Regularized` and the
fused optimizers (fused.py) both step through it, so every key is accepted in
the same forms, rejected with the same errors, and applied by the same
functions (apply.py).

The cache has two signatures per step, both cheap (numbers by value, tensors
by identity and version, see :func:`keys.signature`):

* the regularization keys and the parameters: unchanged, the plan is used as
  it is; changed, every group is read and checked again (a bad value raises
  before anything is modified), and the plan rebuilt, or only its coefficient
  values rewritten where the buckets stay the same;
* every other key (lr, betas, eps, ...): changed, torch's hyperparameters are
  checked again (:func:`keys.check_hypers`).
"""
from __future__ import annotations

import difflib
import sys
import warnings
from itertools import repeat
from operator import attrgetter
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import required

from .._common import outside_graph
from .._validate import nonneg_real
from . import apply
from .keys import (KEYS, SIMPLE_TYPES, check_hypers, group_signature, hyper_signature, lr_value,
                   read_group, signature)
from .plan import Plan
from .results import ParamStats, Sparsity


class Engine:
    """The regularization of one optimizer's param groups.

    ``defaults``: the values of pyreg's keys for groups that lack them;
    ``hyper_keys``: torch's hyperparameters to check (as torch's constructor
    checks them; :func:`keys.hyper_keys_of`); ``metric``: whether
    ``preconditioned`` may be set (the optimizer knows its metric)."""

    def __init__(self, defaults: Dict[str, Any], hyper_keys: Sequence[str] = (), metric: bool = True):
        self.defaults = dict(defaults)
        self.hyper_keys = tuple(hyper_keys)
        self.metric = metric  # False: a torch optimizer steps (no metric prox; it reads a tensor weight_decay)
        self._added: Dict[int, tuple] = {}  # each group's own plan (see _existing_plans)
        self.reset()

    def reset(self) -> None:
        """Forget everything cached (after a state dict is loaded, say)."""
        self._plan: Optional[Plan] = None
        self._shape: Optional[tuple] = None
        self._quick: Optional[tuple] = None
        self._hypers: Optional[tuple] = None
        self._lrs: Optional[tuple] = None
        self._prepared: Optional[tuple] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"defaults": self.defaults, "hyper_keys": self.hyper_keys, "metric": self.metric}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._added = {}
        self.reset()

    # -- a step's checks ------------------------------------------------------------
    def prepare(self, groups: List[Dict[str, Any]], lrs: bool = True) -> Prepared:
        """What a step needs, checked: the plan and (``lrs``) the groups' lrs.
        One signature of every group (all its keys, its parameters) says
        whether anything changed since the last step; only then are the
        plan, torch's hyperparameters and the lrs checked again, each where
        its own part changed."""
        hit = self._prepared
        if hit is not None and len(hit[0]) == len(groups) and (hit[1].lrs is not None or not lrs):
            same = list(map(_unchanged, groups, hit[0]))
            out = hit[1] if all(same) else self._new_lrs_only(groups, same, hit)
            if out is not None:
                out.plan.check_memory()  # (a parameter's .data replaced: its memory may now be shared)
                return out
        self._prepared = None
        plan = self.plan(groups)
        plan.check_memory()
        token = self.check_hypers(groups)
        out = Prepared(plan, self.lrs(groups) if lrs else None, token)
        self._prepared = (list(map(_seen, groups)), out)
        return out

    def seen_groups(self) -> Optional[List["_GroupSeen"]]:
        """What the last :meth:`prepare` saw of each group (None before one)."""
        hit = self._prepared
        return None if hit is None else hit[0]

    def _new_lrs_only(self, groups: List[Dict[str, Any]], same: List[bool], hit: tuple) -> Optional[Prepared]:
        """:meth:`prepare` when the groups changed only in their ``lr`` (a
        scheduler's step) to another float: only the new lrs are checked.
        None otherwise."""
        seen_all, out = hit
        lrs = None if out.lrs is None else list(out.lrs)
        new_seen = list(seen_all)
        for gi, ok in enumerate(same):
            if ok:
                continue
            g, seen = groups[gi], seen_all[gi]
            at = seen.lr_at
            values = tuple(g.values())
            ids = tuple(map(id, values))
            lr = g.get("lr")
            if (at < 0 or type(lr) is not float or ids[:at] != seen.ids[:at] or ids[at + 1:] != seen.ids[at + 1:]
                    or tuple(g) != seen.keys or not _unchanged_but_lr(g, seen)):
                return None
            if lrs is not None or "lr" in self.hyper_keys:
                lr = nonneg_real(lr, f"param_groups[{gi}]['lr']")
            if lrs is not None:
                lrs[gi] = lr
            new_seen[gi] = seen._replace(ids=ids, values=values)
        out = Prepared(out.plan, lrs, object())  # new hyperparameters: a new token
        self._prepared = (new_seen, out)
        return out

    # -- checks ------------------------------------------------------------------
    def read(self, groups: Sequence[Dict[str, Any]], first: int = 0) -> list:
        """Every group's settings, checked (``first``: the index of groups[0])."""
        out = []
        for gi, g in enumerate(groups, first):
            st = read_group(g, self.defaults, f"param_groups[{gi}]")
            if st.preconditioned and not self.metric:
                raise ValueError(f"param_groups[{gi}] sets preconditioned: the prox in the optimizer's "
                                 "metric needs pyreg's fused optimizers (pyreg.optim.Adam, AdamW, "
                                 "Adagrad, RMSprop), which know that metric")
            out.append(st)
        return out

    def check_added(self, group: Dict[str, Any], torch_defaults: Dict[str, Any], index: int,
                    existing: Optional[List[Dict[str, Any]]] = None) -> Optional[Plan]:
        """A group about to be added (``add_param_group``, which torch's
        constructor calls for each group), checked as a step would check it,
        before anything is added: pyreg's keys, the params against them, and
        torch's hyperparameters as the group will hold them (the optimizer's
        ``torch_defaults`` filled in; a required one it lacks is left to torch,
        which names it). ``index``: the position it will have. The params are
        checked as a plan checks them (a trial plan of the group: refs, group
        dims, dtypes and layouts of the regularized ones, no parameter twice, no
        shared memory), so a group that every step would refuse is not added;
        with ``existing`` (the optimizer's groups, once it is made), also no
        memory shared with their regularized parameters. Returns that trial
        plan (None where the params were left to torch)."""
        where = f"param_groups[{index}]"
        if "params" not in group:
            raise ValueError(f"{where} has no 'params': a param group is a dict of its parameters, under "
                             "'params', and its settings; nothing was added")
        st = self.read([group], index)[0]
        ps = group.get("params")
        if ps and all(isinstance(q, tuple) and len(q) == 2 for q in ps):  # named: (name, param), as torch takes
            trial = dict(group, params=[q[1] for q in ps], param_names=[q[0] for q in ps])
        else:
            trial = group
        warn_near_misses(group, torch_defaults, where)
        plan = None
        if ps and all(isinstance(p, Tensor) for p in trial["params"]):  # (else torch names what is wrong)
            plan = Plan([trial], [st], index)
            if existing:
                Plan.check_apart_all(self._existing_plans(existing), plan)
        full = {k: v for k, v in {**torch_defaults, **group}.items() if v is not required}
        check_hypers(full, where, self.hyper_keys, not self.metric)
        return plan

    def _existing_plans(self, groups: List[Dict[str, Any]]) -> List[Plan]:
        """The plans of an optimizer's groups for :meth:`check_added`: the
        cached plan where it is current, else each group's own plan, kept per
        group while the group stays the same (groups added one by one: each
        add re-reads only the new ones, not all of them)."""
        quick = self._quick_of(groups)
        if self._plan is not None and self._quick == quick:
            return [self._plan]
        kept, out = self._added, []
        for gi, (g, key) in enumerate(zip(groups, quick)):
            hit = kept.get(id(g))
            if hit is None or hit[0] != key or hit[3] != gi:  # (hit[1] holds g: no other group takes its id)
                hit = kept[id(g)] = (key, g, Plan([g], self.read([g], gi), gi), gi)
            out.append(hit[2])
        if len(kept) > len(groups):  # (groups replaced: a loaded state dict)
            ids = set(map(id, groups))
            for gone in [k for k in kept if k not in ids]:
                del kept[gone]
        return out

    @staticmethod
    def _quick_of(groups: List[Dict[str, Any]]) -> tuple:
        """What :meth:`plan` compares of the groups to reuse its plan."""
        return tuple(group_signature(g, _PLAN_KEYS) + (tuple(map(id, g["params"])),
                                                     tuple(map(_kind_of, g["params"])),
                                                     tuple(g)) for g in groups)  # (a key set to None)

    def plan(self, groups: List[Dict[str, Any]]) -> Plan:
        """The cached plan of ``groups``; checks everything first where a
        group changed (see the module docstring)."""
        for gi, g in enumerate(groups):
            ps = g.get("params")
            if type(ps) not in (list, tuple) or not all(map(isinstance, ps, repeat(Tensor))):
                raise TypeError(f"param_groups[{gi}]['params'] must be a list of tensors, got "
                                + (type(ps).__name__ if type(ps) not in (list, tuple) else
                                   f"a {type(ps).__name__} holding a "
                                   f"{next(type(p).__name__ for p in ps if not isinstance(p, Tensor))}"))
        quick = self._quick_of(groups)
        if self._plan is not None and quick == self._quick:
            return self._plan
        self._quick = None
        self._prepared = None  # (it holds the plan with the values it had)
        specs = self.read(groups)
        shape = (tuple(st.shape() for st in specs), tuple(tuple(map(id, g["params"])) for g in groups),
                 tuple(tuple(map(_kind_of, g["params"])) for g in groups))
        if self._plan is None or shape != self._shape:
            self._plan = Plan(groups, specs)
            self._shape = shape
        elif [st.values() for st in specs] != [st.values() for st in self._plan.specs]:
            self._plan.set_values(specs)
        self._quick = quick
        return self._plan

    def current_plan(self, groups: List[Dict[str, Any]]) -> Plan:
        """A plan of ``groups`` as they are now, for a reading (``stats()``):
        the cached plan where it is theirs, else a new one, checked but not
        cached, so that the cached plan (whose coefficients the last step's
        buckets share, and which a step reuses while its groups hold the
        same values) stays the steps'."""
        if self._plan is not None and self._quick_of(groups) == self._quick:
            return self._plan
        return Plan(groups, self.read(groups))

    def check_hypers(self, groups: List[Dict[str, Any]]) -> Optional[tuple]:
        """torch's hyperparameters of every group, checked where one changed.
        Returns their signature: the same object while nothing changed."""
        if torch.compiler.is_compiling():
            for gi, g in enumerate(groups):
                check_hypers(g, f"param_groups[{gi}]", self.hyper_keys, not self.metric)
            return None
        sig = tuple(map(hyper_signature, groups))
        if sig == self._hypers:
            return self._hypers
        self._hypers = None
        for gi, g in enumerate(groups):
            missing = [k for k in self.hyper_keys if k not in g]
            if missing:
                raise ValueError(f"param_groups[{gi}] has no {missing[0]!r}: the optimizer reads "
                                 f"{', '.join(map(repr, self.hyper_keys))} from each group (set it back)")
            check_hypers(g, f"param_groups[{gi}]", self.hyper_keys, not self.metric)
        self._hypers = sig
        return sig

    def lrs(self, groups: List[Dict[str, Any]]) -> list:
        """Every group's lr, checked (again only when one changed). Under
        torch.compile they are checked without the signature: it reads a CPU
        tensor lr's value, which would become a guard (a recompilation at
        every change)."""
        if torch.compiler.is_compiling():
            return _check_lrs(groups)
        key = tuple(signature(g.get("lr")) for g in groups)
        hit = self._lrs
        if hit is not None and hit[0] == key:
            return hit[1]
        lrs = _check_lrs(groups)
        self._lrs = (key, lrs)
        return lrs


def _check_lrs(groups: List[Dict[str, Any]]) -> list:
    lrs = []
    for gi, group in enumerate(groups):
        lr = group.get("lr")
        if lr is None:
            raise ValueError(f"param_groups[{gi}] has no 'lr': the proximal step needs one "
                             "(use mode='gradient' for optimizers without a learning rate)")
        lrs.append(lr_value(lr, f"param_groups[{gi}]['lr']"))
    return lrs


_PLAN_KEYS = KEYS


class Prepared(NamedTuple):
    """What :meth:`Engine.prepare` returns: the plan, the groups' lrs (None
    where not asked for), and the signature of torch's hyperparameters (the
    same object while they stay the same)."""

    plan: Plan
    lrs: Optional[list]
    hypers: Optional[tuple]


#: What a step compares of each parameter: a param replaced through ``.data`` (as
#: ``Module.to()`` does) with another shape, dtype or device makes the plan again,
#: and checks it (a group dimension or ref that no longer fits raises before the step).
_kind_of = attrgetter("shape", "dtype", "device")
_NOT_SETTINGS = frozenset(("params", "param_names"))


class _GroupSeen(NamedTuple):
    """What a step saw of one group (see :meth:`Engine.prepare`)."""

    keys: tuple
    ids: tuple        # id of every value (the values are held in ``values``)
    values: tuple
    mutable: tuple    # keys whose values can change in place (tensors, lists, tuples holding them)
    state: tuple      # their signatures (keys.signature)
    params: tuple     # the parameters' ids
    kinds: tuple      # and their (shape, dtype, device)
    lr_at: int        # the position of "lr" among the keys (-1: none)


def _seen(group: Dict[str, Any]) -> _GroupSeen:
    values = tuple(group.values())
    mutable = tuple(k for k, v in group.items() if k not in _NOT_SETTINGS and not _immutable(v))
    ps = group["params"]
    keys = tuple(group)
    return _GroupSeen(keys, tuple(map(id, values)), values, mutable, tuple(signature(group[k]) for k in mutable),
                      tuple(map(id, ps)), tuple(map(_kind_of, ps)), keys.index("lr") if "lr" in group else -1)


def _unchanged_but_lr(group: Dict[str, Any], seen: _GroupSeen) -> bool:
    """:func:`_unchanged` but for the value of ``lr``."""
    ps = group["params"]
    return (tuple(map(id, ps)) == seen.params and tuple(map(_kind_of, ps)) == seen.kinds
            and (not seen.mutable or tuple(signature(group[k]) for k in seen.mutable) == seen.state))


def _immutable(v: Any) -> bool:
    tp = type(v)
    return tp in SIMPLE_TYPES or (tp is tuple and set(map(type, v)) <= SIMPLE_TYPES)


def _unchanged(group: Dict[str, Any], seen: _GroupSeen) -> bool:
    """Whether a group is as :func:`_seen` saw it: the same keys holding the
    same objects (compared by id at C speed; ``seen`` holds the objects, so
    no other object can take their ids), mutable ones in the same state, the
    same parameters with the same shape, dtype and device."""
    ps = group["params"]
    return (tuple(map(id, group.values())) == seen.ids and tuple(group) == seen.keys
            and tuple(map(id, ps)) == seen.params and tuple(map(_kind_of, ps)) == seen.kinds
            and (not seen.mutable or tuple(signature(group[k]) for k in seen.mutable) == seen.state))


#: The keys torch's LR schedulers and SWALR write into a group (OneCycleLR's
#: ``max_momentum``/``base_momentum`` nearly spell ``momentum``).
_SCHEDULER_KEYS = frozenset(("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"))


def warn_near_misses(group: Dict[str, Any], torch_defaults: Dict[str, Any], where: str) -> None:
    """A warning for a key that no one reads but that nearly spells one of
    pyreg's or the optimizer's (``group_dims``, ``max_norms``): torch keeps
    any extra key in a group, so a misspelt setting would do nothing, silently."""
    known = set(KEYS) | set(torch_defaults) | _SCHEDULER_KEYS | {"params", "param_names"}
    for key in group:
        if isinstance(key, str) and key not in known:
            close = difflib.get_close_matches(key, sorted(known - {"params", "param_names"}), n=1, cutoff=0.8)
            if close:
                warnings.warn(f"{where} has a key {key!r}, which nothing reads; did you mean {close[0]!r}?",
                              UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of a warning from the function that calls this one
    that points at the first frame outside pyreg and torch (the user's line,
    whether it made the optimizer or added a group)."""
    f, level = sys._getframe(1), 1
    while f is not None and f.f_globals.get("__name__", "").partition(".")[0] in ("pyreg", "torch"):
        f, level = f.f_back, level + 1
    return level


def keep_own_keys(before: List[Dict[str, Any]], groups: List[Dict[str, Any]], saved: List[Dict[str, Any]]) -> None:
    """After torch's ``load_state_dict`` (which replaces each group's dict by
    the saved one): a saved group without any of pyreg's keys (a checkpoint of
    torch's own optimizer) keeps the pyreg keys its group held ``before``,
    instead of losing them (a group's target_sparsity, group_l1, ref... would
    otherwise vanish, silently)."""
    for old, new, s in zip(before, groups, saved):
        if not any(k in s for k in KEYS):
            new.update({k: old[k] for k in KEYS if k in old})


def param_list(params: Any) -> List[Tensor]:
    """A group's ``params`` as a list (so that checking it consumes no
    iterator): a tensor becomes a list of one; a set is refused, as torch's
    ``add_param_group`` refuses it (its order changes between runs)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                        "of tensors in sets will change between runs. Please use a list instead.")
    return list(params)


@outside_graph
def plan_outside_graph(engine: Engine, groups: List[Dict[str, Any]]) -> Plan:
    """The plan and torch's hyperparameters, checked outside a compiled graph
    (the checks read Python numbers that must not become graph constants)."""
    engine.check_hypers(groups)
    return engine.plan(groups)


class Observable:
    """``penalty``, ``stats()`` and ``sparsity()`` of an optimizer stepping
    through an :class:`Engine` (``self._engine``); it keeps the last step's
    buckets in ``self._out["last"]``."""

    _out: Dict[str, Any]
    _engine: Engine

    @property
    def penalty(self) -> Tensor:
        """0-dim tensor: the penalty of the last step's regularized weights.

        :class:`Regularized` in gradient mode: the value ``add_penalty_grad_``
        returned, of the weights *before* the inner step (the penalty in that
        step's loss). Otherwise: of the weights *after* the step, computed
        lazily on first access after the step (so steps never pay for it).
        0 before the first step. Never syncs the host."""
        if self._out["penalty"] is None:
            self._out["penalty"] = apply.penalty_of(self._out["last"])
        return self._out["penalty"]

    def stats(self) -> ParamStats:
        """Per-parameter :class:`ParamStats` of every parameter of the optimizer
        (regularized or not), named from the groups' ``param_names`` (else
        ``"param_groups.<group>.<index>"``). One ``weight_stats`` call per
        (device, dtype) bucket; no host sync."""
        return apply.stats(self._engine.current_plan(self.param_groups))  # type: ignore[attr-defined]

    def sparsity(self) -> Sparsity:
        """Fraction of exact zeros over all parameters of the optimizer
        (``overall``) and per parameter; tensors, no host sync."""
        return apply.sparsity(self.stats())
