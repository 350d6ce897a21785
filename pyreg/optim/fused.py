"""What pyreg's fused optimizers (sgd.py, adam.py, adagrad.py, rmsprop.py) share.

Each is a subclass of its torch.optim class (so constructor arguments, param
groups, state dicts, hooks, schedulers and GradScaler work as on torch's) whose
``step`` runs pyreg's fused kernel: per (device, dtype, flags) bucket, one call
that reads param, grad and state once, applies the update and then the
proximal step of the group's ``l1``/``l2``, and writes them once
(:func:`pyreg.optim.functional.fused_step`; the float64 spec is
``pyreg.backends.torch_ref.optim_step``).

The regularization keys go through the same engine as :class:`pyreg.Regularized`
(engine.py): the same accepted forms, the same checks, and the structured keys
(``group_l1``, ``ref``, ``max_norm``) applied by the same functions after the
fused pass. The step:

1. the engine checks what changed (pyreg's keys, torch's hyperparameters);
   a bad value raises ``ValueError`` before anything is modified;
2. per group, its hyperparameter rows by name (cached while they stay the same);
3. per parameter with a grad, its state (created as torch creates it) and its
   bucket; parameters the kernels do not take (sparse grads, complex
   parameters, ``differentiable=True``, tensor subclasses such as DTensor)
   go to torch's own step instead, followed by ``pyreg.prox_`` where their
   group sets l1/l2 (never for complex ones or ``differentiable=True``,
   which are refused with l1/l2);
4. one kernel call per bucket, then the structured passes.
"""
from __future__ import annotations

import copy
import functools
import inspect
from itertools import chain, compress, repeat
from operator import attrgetter, is_, not_
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._common import SUPPORTED_DTYPES, outside_graph, to_device
from .._validate import first_unpaired, flag, like_tensors, nonneg_real
from ..backends._marshal import plain_list, step_ticket
from ._torch_compat import raw_step
from .apply import (OWN_STATE, STRENGTH_KINDS, STRENGTH_STEP, check_countable, check_step_counts, constraints,
                    direct_backend, keep_finite, misfit_state, penalized, pop_own_state, prox_buckets, put_own_state,
                    refresh_strength, record_strength_step, store_strength, strength_counter, strength_due,
                    strength_ks, strength_l1, wide)
from .engine import Engine, Observable, keep_own_keys, param_list
from .functional import HYPER, NO_PROX, fused_step, prox_kind, row, table
from .keys import hyper_keys_of, read_group, signature
from .plan import Bucket, Plan, Work

#: The keys pyreg adds to torch's param groups (the others, group_l1, ref,
#: max_norm, are optional; see keys.py).
PYREG_KEYS = ("l1", "l2", "preconditioned")
_PLAIN_TYPES = (Tensor, nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN_TYPES)
#: State keys that pyreg keeps beside the algorithm's (a state holding only
#: these is new to the algorithm: its own state is created at the next step).
_PYREG_STATE_KEYS = frozenset(OWN_STATE) | {STRENGTH_STEP}
#: What the optimizers take as ``params``: tensors, param groups, or (name, tensor) pairs.
Params = Iterable[Any]


def hyper_number(value: Any) -> Any:
    """A hyperparameter as a float, or a device tensor left as it is (read on
    the device, no host sync)."""
    if isinstance(value, Tensor):
        return value if value.device.type != "cpu" else float(value)
    return float(value)


class Flags(NamedTuple):
    """What a kernel call's parameters share, besides their dtype and device."""

    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False
    nesterov: bool = False
    centered: bool = False
    prox: int = NO_PROX


class _GroupRun(NamedTuple):
    """A param group's step settings, derived from its checked values."""

    rows: List[tuple]     # the distinct hyperparameter rows of the group
    row_of: List[int]     # each parameter's row
    flags: List[Flags]    # each parameter's flags (its prox: none where a structured pass does it)
    structured: bool      # some parameter has group_l1, ref, l2_bound or max_norm
    extra: Dict[str, Any]  # what the algorithm's _buffers needs (SGD: momentum)
    dynamic: bool = False  # a row holds a device tensor (a tensor lr): the table is written at each step


class _Bucket:
    """The parameters of one kernel call, with their grads, state and rows."""

    def __init__(self, flags: Flags, step_dtype: Optional[torch.dtype]):
        self.flags, self.step_dtype = flags, step_dtype
        self.params: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.s1: List[Tensor] = []
        self.s2: List[Tensor] = []
        self.s3: List[Tensor] = []
        self.steps: List[Tensor] = []
        self.rows: List[int] = []
        self.fresh: List[int] = []
        self.table_rows: Dict[Tuple[int, int], int] = {}  # (group, group row) -> row of the bucket's table
        self.row_values: List[tuple] = []
        self.row_src: List[Tuple[int, int]] = []  # each row's (group, row of the group's run)
        self.dynamic = False  # some row holds a tensor lr (see _GroupRun.dynamic)
        # l1_strength: each param's own row, its l1 from one float64 vector of
        # the engine (apply.strength_l1; one per device and dtype, so one here)
        self.l1_vec: Optional[Tensor] = None
        self.l1_rows: List[int] = []  # the rows of the l1_strength params
        self.l1_index: List[int] = []  # and their l1's index in l1_vec


class _Gathered:
    """A step's buckets (:meth:`FusedOptimizer._gather`), kept for the next
    steps while everything they were made from is as it was: the same plan
    (so the same parameters, with the same shapes, dtypes and devices: the
    engine compares them at every step and makes a new plan where one
    changed, as a param replaced through ``.data`` may have), the same
    group runs (or runs that differ only in their lrs, a scheduler's step:
    the rows then follow) and l1_strength rows, the same state dict, each
    parameter's state holding the same keys and the same tensors (its
    buffers; a number, such as pyreg's count of l1_strength steps, may
    change), and the same parameters with a grad, each grad a plain dense
    tensor of its parameter's dtype, device and size. Then only the grads are new:
    read in one pass per attribute instead of the full gather's
    per-parameter work."""

    def __init__(self, plan: Plan, runs: List["_GroupRun"], l1_of: Dict[int, Tuple[Tensor, int]],
                 state: Dict[Any, Any], groups: List[Dict[str, Any]], buckets: List[_Bucket]):
        self.plan, self.runs, self.l1_of, self.state = plan, list(runs), l1_of, state
        self.settings = list(map(_but_lr, groups))
        self.hits = 0  # the steps it served
        self.counter: Optional[Any] = None  # l1_strength's counts of the steps it serves (apply.strength_counter)
        self.params = [p for g in groups for p in g["params"]]
        self.nones = [p.grad is None for p in self.params]
        pos = {id(p): i for i, p in enumerate(self.params)}
        self.buckets = []
        for b in buckets:
            c = copy.copy(b)
            c.fresh = [0] * len(b.params)  # any buffer this step made exists from now on
            c.grads = []  # (each step's own)
            self.buckets.append(c)
        self.index = [pos[id(p)] for b in buckets for p in b.params]
        ps = [p for b in buckets for p in b.params]
        self.with_grad = ps
        self.dtypes, self.devices = list(map(_dtype_of, ps)), list(map(_device_of, ps))
        self.shapes = list(map(_shape_of, ps))
        states = [state.get(p, _NO_STATE) for p in ps]
        self.keys = list(chain.from_iterable(states))
        # (pyreg's count of l1_strength steps, a number that changes at every step and that no kernel reads,
        # is left out of the comparison of the values)
        self.counted = [k != STRENGTH_STEP for k in self.keys] if STRENGTH_STEP in self.keys else None
        self.values = self._compared(chain.from_iterable(map(dict.values, states)))

    def _compared(self, values: Iterable[Any]) -> List[Any]:
        """The state values that :meth:`reuse` compares, in order (see ``counted``)."""
        return list(values if self.counted is None else compress(values, self.counted))

    def reuse(self, plan: Plan, runs: List["_GroupRun"], l1_of: Dict[int, Tuple[Tensor, int]],
              state: Dict[Any, Any], groups: List[Dict[str, Any]]) -> Optional[List[_Bucket]]:
        """The kept buckets with this step's grads, or None where anything
        differs (the full gather then decides)."""
        if plan is not self.plan or l1_of is not self.l1_of or state is not self.state or len(runs) != len(self.runs):
            return None
        new_lrs = not all(map(is_, runs, self.runs))  # (a run is made again when any setting changed)
        if new_lrs and (not all(map(_lr_only, runs, self.runs)) or list(map(_but_lr, groups)) != self.settings):
            return None
        grads = list(map(_grad_of, self.params))
        if list(map(is_, grads, repeat(None))) != self.nones:
            return None
        gs = list(map(grads.__getitem__, self.index))
        if (not set(map(type, gs)) <= _PLAIN_SET or not all(map(is_, map(_layout_of, gs), repeat(torch.strided)))
                or list(map(_dtype_of, gs)) != self.dtypes or list(map(_device_of, gs)) != self.devices
                or list(map(_shape_of, gs)) != self.shapes):
            return None
        states = list(map(state.get, self.with_grad, repeat(_NO_STATE)))
        if list(chain.from_iterable(states)) != self.keys:  # (a dict iterates its keys)
            return None
        values = self._compared(chain.from_iterable(map(dict.values, states)))
        if len(values) != len(self.values):
            return None
        same = list(map(is_, values, self.values))
        if not all(same):  # only numbers may differ (pyreg's step counts): no buffer
            other = list(map(not_, same))
            if any(map(isinstance, chain(compress(values, other), compress(self.values, other)), repeat(Tensor))):
                return None
        k = 0
        for b in self.buckets:
            n = len(b.params)
            b.grads = gs[k:k + n]
            k += n
            if new_lrs:
                b.row_values = [runs[gi].rows[r] for gi, r in b.row_src]
        if new_lrs:
            self.runs = list(runs)
        return self.buckets


def _lr_only(new: "_GroupRun", old: "_GroupRun") -> bool:
    """Whether a group's run differs from the one before at most in its rows'
    lrs (a scheduler's step): every parameter has the same row and flags, the
    rows hold numbers, and each row's other values are the same."""
    if new is old:
        return True
    if (new.dynamic or old.dynamic or new.structured != old.structured or new.row_of != old.row_of
            or new.flags != old.flags or new.extra != old.extra or len(new.rows) != len(old.rows)):
        return False
    return all(a[:_LR] == b[:_LR] and a[_LR + 1:] == b[_LR + 1:] for a, b in zip(new.rows, old.rows))


_LR = HYPER.index("lr")


def _but_lr(group: Dict[str, Any]) -> tuple:
    """The signature of every setting of a group but its params and lr."""
    return tuple((k, signature(v)) for k, v in group.items() if k != "params" and k != "lr")


_NO_STATE: Dict[str, Any] = {}  # (never written: a parameter without state, as _Gathered reads it)
_grad_of, _dtype_of, _device_of, _layout_of, _shape_of = (attrgetter("grad"), attrgetter("dtype"),
                                                           attrgetter("device"), attrgetter("layout"),
                                                           attrgetter("shape"))


class FusedOptimizer(Observable):
    """Mixin that turns a torch.optim class into pyreg's fused version. A
    subclass sets ``_algo`` (functional.SGD, ADAM, ADAGRAD, RMSPROP), writes
    ``_hyper`` (its hyperparameters by name), ``_flags``, ``_new_state`` and
    ``_buffers``, and lists the torch class after this one in its bases."""

    _algo: int = -1
    _pyreg_fused = True  # Regularized refuses to wrap it (it would regularize twice)
    #: The state buffers a step makes that the kernels start from the grad ("fresh"; see
    #: :meth:`_forget_fresh_if_skipped`).
    _fresh_keys: Tuple[str, ...] = ()
    # GradScaler hands grad_scale / found_inf to step() (see _amp_scalars).
    _step_supports_amp_scaling = True

    def __init__(self, params, *args, l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False,
                 **kwargs):
        defaults = {"l1": nonneg_real(l1, "l1"), "l2": nonneg_real(l2, "l2"),
                    "preconditioned": flag(preconditioned, "preconditioned")}
        self._setup(defaults)
        super().__init__(params, *args, **kwargs)
        self.defaults.update(defaults)  # type: ignore[attr-defined]
        # The groups given, each checked as it was added, checked together (memory shared across
        # groups) in one plan, which the first step then uses; later groups against the others.
        self._engine.plan(self.param_groups).check_memory()  # type: ignore[attr-defined]
        self._made = True

    @classmethod
    def _torch_args(cls, given: Dict[str, Any]) -> Dict[str, Any]:
        """The arguments for the torch class's constructor, from the subclass's
        own ``__init__`` (which lists torch's arguments, so that signatures,
        ``help()`` and IDEs show them): an argument that the installed torch
        does not take is left out while it has its default value (torch then
        raises for any other value)."""
        accepted = _accepted_args(cls._torch_base())
        own = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in given.items()
                if k in own and k not in _OWN_ARGS and (k in accepted or v is not own[k].default)}

    @classmethod
    def _torch_base(cls) -> type:
        return next(c for c in cls.__mro__[1:]
                    if issubclass(c, torch.optim.Optimizer) and not issubclass(c, FusedOptimizer))

    def _setup(self, defaults: Dict[str, Any]) -> None:
        self._engine = Engine(defaults, hyper_keys_of(type(self)))
        self._out: Dict[str, Any] = {"last": [], "penalty": None}
        self._runs: Dict[int, Tuple[tuple, Any, _GroupRun]] = {}
        self._tables: Dict[tuple, Tensor] = {}
        # l1_strength: its l1 vectors (apply.strength_l1), and where each param's l1 is in them (_apply)
        self._l1_of: Tuple[List[Tensor], Dict[int, Tuple[Tensor, int]]] = ([], {})
        self._tickets: Dict[torch.device, Tensor] = {}  # the CUDA kernel's, one per device
        self._gathered: Optional[_Gathered] = None  # the last step's buckets (see _Gathered)
        self._gather_backoff = self._gather_wait = 0  # steps to gather in full before keeping them again

    # -- what each optimizer supplies ------------------------------------------------
    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The group's hyperparameters by name (functional.HYPER), l1/l2 aside."""
        raise NotImplementedError

    def _push(self, p: Tensor, s: Dict[str, Any], group: Dict[str, Any], metric: bool,
              before: Optional[Tensor]) -> Tensor:
        """The step this optimizer just gave ``p``, in the units of its prox's
        l1: the step divided by the prox's step size of each element (lr in
        the plain metric; ``metric``: the optimizer's own). Read from the
        state the kernel left and the grad (for ``l1_strength``); ``before``:
        p before the step where its group has a weight decay, else None."""
        raise NotImplementedError

    def _pushes(self, items: List[Tuple[Tensor, Dict[str, Any], Dict[str, Any], bool, Optional[Tensor]]]) -> List[Tensor]:
        """:meth:`_push` of each item, (p, state, group, metric, before), all of
        one group's metric; an optimizer may compute them together."""
        return [self._push(*it) for it in items]

    def _metric_terms(self, items: List[Tuple[Tensor, Dict[str, Any], Dict[str, Any]]]) -> Optional[tuple]:
        """``target_sparsity`` in the optimizer's metric: for items ``(p,
        state, group)`` after the step, ``(v, e, s, div)`` with p's element
        i stepped by ``lr / div / d_i``, ``d = (sqrt(v) + e) * s`` the
        divisor of the kernel's step (v: one tensor per item, the state the
        step left or a tensor made from it, in p's dtype or the compute
        dtype; e, s: one number per item, or a 0-dim tensor on the device
        where the step counter is there; s None for 1; div: a float64 vector
        on the params' device, or None for 1), see
        :func:`pyreg.optim.apply.target_prox`; None where the optimizer's
        metric is the plain one (SGD)."""
        return None

    def _push_needs_before(self, group: Dict[str, Any]) -> bool:
        """Whether :meth:`_push` of the group's params reads the weights before
        the step (a weight decay's term of the step): they are copied, at the
        refresh steps, only where it does."""
        return bool(group.get("weight_decay"))

    def _push_terms(self, items: List[Tuple[Tensor, Dict[str, Any], Dict[str, Any], bool, Optional[Tensor]]]
                    ) -> Optional[Tuple[List[Tensor], Optional[List[Tensor]], List[float], List[float]]]:
        """``(m, v, e, s)`` with each item's push (see :meth:`_push`) equal,
        op for op, to ``m_i / ((sqrt(v_i) + e_i) * s_i)`` (``m_i / s_i`` where
        ``v`` is None), plus :meth:`_push_decay`'s term where it gives one, for
        items where the optimizer's push has that form (csrc/common/optim_math.h's
        ``adaptive_push`` and ``decayed_push``); None where it does not."""
        return None

    def _push_decay(self, items) -> Optional[Tuple[List[Tensor], List[float]]]:
        """``(w, wd)``: each item's weights before the step and the decay
        whose term ``wd_i * w_i`` (a multiply, then an add) its push adds to
        :meth:`_push_terms`' form (a decoupled decay); None where none."""
        return None

    def _push_quantiles(self, items: List[Tuple[Tensor, Dict[str, Any], Dict[str, Any], bool, Optional[Tensor]]],
                        ks: List[int], out: Optional[Tensor] = None,
                        dims: Optional[List[int]] = None) -> Optional[Tensor]:
        """The ks[i]-th smallest |push| of each item (float64; ``dims``, each
        item's group dimension: the ks[i]-th smallest L2 norm of its push's
        groups, for ``group_strength``), in one call of
        the CPU kernel (``push_kth``: the push from :meth:`_push_terms`, then
        its selection, or that of its group norms; the same operations as the
        push in torch ops and ``kth_abs``, with a correctly rounded sqrt, which
        torch's CPU sqrt is not on every CPU) where the terms are plain CPU tensors;
        else None (:meth:`_pushes` gives the pushes). ``out``: a plain float64
        CPU vector of one entry per item to write them into (its version is
        bumped), else a new one."""
        be = direct_backend() if items and items[0][0].device.type == "cpu" else None
        terms = self._push_terms(items) if be is not None and be.selects_pushes() else None
        decay = self._push_decay(items) if terms is not None else None
        if decay is None and any(it[4] is not None for it in items):  # (a term the kernel does not add)
            return None
        described = None if terms is None else plain_list(terms[0] + (terms[1] or []) + (decay[0] if decay else []))
        if described is None:
            return None
        if out is None:
            out = torch.empty(len(items), dtype=torch.float64)
        else:
            torch.autograd.graph.increment_version(out)  # (written through its pointer)
        be.push_kth(*terms, ks, out, *(decay or (None, None)), described=described, dims=dims)
        return out

    def _flags(self, group: Dict[str, Any]) -> Flags:
        """The group's flags (prox aside)."""
        return Flags(maximize=bool(group.get("maximize", False)))

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        """Creates the state torch's optimizer would create for p."""
        raise NotImplementedError

    def _buffers(self, p: Tensor, s: Dict[str, Any], group: Dict[str, Any], run: _GroupRun):
        """(s1, s2, s3, step, fresh) of p for the kernels."""
        raise NotImplementedError

    # -- param groups and state dicts -------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, with pyreg's keys and the params checked
        (as in every step: see :meth:`Engine.check_added`) and defaulted. A
        parameter listed twice is an error (torch only warns): the fused step
        would update it twice."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        ps = param_group.get("params")
        if ps is not None:  # a list, so that checking it consumes no iterator
            param_group["params"] = param_list(ps)
        made = getattr(self, "_made", False)  # (while torch's constructor adds the groups: see __init__)
        index = len(getattr(self, "param_groups", []))
        plan = self._engine.check_added(param_group, self.defaults, index, self.param_groups if made else None)
        if plan is not None and param_group.get("differentiable", self.defaults.get("differentiable")):
            st = plan.specs[0]
            if any(a or b for a, b in zip(st.l1, st.l2)):  # (as the step refuses it: see _gather_all)
                raise ValueError(f"param_groups[{index}] sets l1/l2 with differentiable=True, whose parameters "
                                 "take torch's own step: pyreg's prox takes real parameters outside autograd")
        for key in PYREG_KEYS:
            param_group.setdefault(key, self._engine.defaults[key])
        super().add_param_group(param_group)  # type: ignore[misc]
        self._engine.reset()
        self._gathered = None

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        d = self.defaults  # type: ignore[attr-defined]
        self._setup({"l1": d.get("l1", 0.0), "l2": d.get("l2", 0.0),
                     "preconditioned": d.get("preconditioned", False)})
        self._fill_keys()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``; the loaded groups' settings are kept
        (checked as a step checks them, torch's hyperparameters and the
        parameters against the keys included, and pyreg's own state entries:
        a bad one raises and the optimizer keeps what it had), and a group of a state dict of torch's optimizer
        (without pyreg's keys) keeps the pyreg keys its group holds now. The
        load pre-hooks run first, on the state dict as given (what they return
        is what is checked and loaded), the post-hooks last, on the groups as
        loaded, pyreg's keys included."""
        pre = self._optimizer_load_state_dict_pre_hooks  # type: ignore[attr-defined]
        post = self._optimizer_load_state_dict_post_hooks  # type: ignore[attr-defined]
        for hook in list(pre.values()):
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        for gi, group in enumerate(state_dict.get("param_groups", [])):
            n = len(group.get("params", ()))
            read_group(dict(group, params=[None] * n), self._engine.defaults, f"state_dict param_groups[{gi}]")
        check_step_counts(state_dict)
        state_dict, bounds = pop_own_state(state_dict)
        before = [dict(g) for g in self.param_groups]  # type: ignore[attr-defined]
        old = (self.state, self.param_groups)  # type: ignore[attr-defined]
        self._optimizer_load_state_dict_pre_hooks = type(pre)()  # (torch's load runs none of them again)
        self._optimizer_load_state_dict_post_hooks = type(post)()
        try:  # (torch's load makes new groups and state: the old ones stand until all is checked)
            try:  # (torch's own load can raise after it set them: an SGD state dict into Adam)
                super().load_state_dict(state_dict)  # type: ignore[misc]
            except KeyError as e:
                raise misfit_state(type(self).__name__, e) from e
            finally:
                self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
            keep_own_keys(before, self.param_groups, state_dict.get("param_groups", []))  # type: ignore[attr-defined]
            put_own_state(self.state, self.param_groups, state_dict.get("param_groups", []), bounds)  # type: ignore
            self._fill_keys()
            self._engine.prepare(self.param_groups)  # type: ignore[attr-defined]  # (what a step checks)
        except BaseException:
            self.state, self.param_groups = old  # type: ignore[attr-defined]
            self._fill_keys()
            raise
        for hook in list(post.values()):
            hook(self)

    def _fill_keys(self) -> None:
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key in PYREG_KEYS:
                group.setdefault(key, self._engine.defaults[key])
        self._engine.reset()
        self._runs, self._tables, self._l1_of = {}, {}, ([], {})
        self._gathered = None

    # -- the step ------------------------------------------------------------------
    def _run_of(self, gi: int, group: Dict[str, Any], plan: Plan, hypers: Any) -> _GroupRun:
        """The group's rows and flags, cached while its checked values stay the same."""
        st = plan.specs[gi]
        hit = self._runs.get(gi)
        if hit is not None and hit[0] is hypers and hit[1] is st:
            return hit[2]
        named = self._hyper(group)
        base = self._flags(group)
        rows: List[tuple] = []
        index: Dict[Tuple[float, float], int] = {}
        row_of, flags = [], []
        for j in range(len(group["params"])):
            l1, l2 = st.l1[j], st.l2[j]
            k = index.get((l1, l2))
            if k is None:
                k = index[(l1, l2)] = len(rows)
                rows.append(row(dict(named, l1=l1, l2=l2)))
            row_of.append(k)
            kinds = st.kinds(j)
            # l1_strength: the prox in the kernel, with the l1 its last refresh set (see _gather)
            pk = (prox_kind(l1, l2, st.preconditioned) if "elem" in kinds
                  else prox_kind(1.0, l2, st.preconditioned) if "strength" in kinds else NO_PROX)
            flags.append(base._replace(prox=pk))
        structured = any(k not in ("elem", "strength") for j in range(len(row_of)) for k in st.kinds(j))
        run = _GroupRun(rows, row_of, flags, structured, self._extra(group),
                        any(isinstance(v, Tensor) for r in rows for v in r))
        self._runs[gi] = (hypers, st, run)
        return run

    def _extra(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    def _gather(self, plan: Plan, runs: List[_GroupRun], l1_of: Dict[int, Tuple[Tensor, int]]):
        """(buckets, groups for torch's own step) where the last step's buckets
        do not serve this one (:meth:`_reuse`): :meth:`_gather_all`'s, kept
        for the next steps unless some parameters need torch's own step."""
        state = self.state  # type: ignore[attr-defined]
        buckets, torch_groups = self._gather_all(plan, runs, l1_of)
        if self._gather_wait:
            self._gather_wait -= 1
        elif not torch_groups:
            self._gathered = _Gathered(plan, runs, l1_of, state, self.param_groups, buckets)  # type: ignore[attr-defined]
        return buckets, torch_groups

    def _reuse(self, plan: Plan, runs: List[_GroupRun], l1_of: Dict[int, Tuple[Tensor, int]]
               ) -> Optional[List[_Bucket]]:
        """The kept buckets with this step's grads (:meth:`_Gathered.reuse`),
        else None (and they are dropped)."""
        kept = self._gathered
        if kept is None:
            return None
        buckets = kept.reuse(plan, runs, l1_of, self.state, self.param_groups)  # type: ignore[attr-defined]
        if buckets is not None:
            kept.hits += 1
            return buckets
        # Keeping costs about what the full gather does: where the kept buckets served no step
        # (something changes at every step), wait longer before keeping them again.
        self._gather_backoff = 0 if kept.hits else min(2 * self._gather_backoff + 1, 63)
        self._gather_wait, self._gathered = self._gather_backoff, None
        return None

    def _gather_all(self, plan: Plan, runs: List[_GroupRun], l1_of: Dict[int, Tuple[Tensor, int]]):
        """(buckets, groups for torch's own step). ``l1_of``: where the l1 of
        each ``l1_strength`` parameter is, by id (its vector on the device, and
        the index in it): each gets a row of its own, its l1 written into the
        table on the device.

        This loop runs over every parameter at every step: it reads each
        attribute once and tests in C where it can (the step's host time).

        The state it makes (a parameter's first step) is taken back where it
        raises, and where torch's own step for the other parameters raises
        (see :meth:`_unmake`): a step that raises leaves no state behind (a
        zero momentum buffer left would be taken for one with history)."""
        buckets: Dict[tuple, _Bucket] = {}
        made: List[Tuple[Tensor, Optional[frozenset]]] = []
        try:
            return self._gather_into(plan, runs, l1_of, buckets, made)
        except BaseException:
            self._unmake(list(buckets.values()), made)
            raise

    def _gather_into(self, plan, runs, l1_of, buckets, made):
        """:meth:`_gather_all`'s loop: the buckets into ``buckets``, and each
        parameter whose state it starts into ``made``, with its state's keys
        before (None: it had no state entry)."""
        torch_groups = []
        state = self.state  # type: ignore[attr-defined]
        new_state, buffers = self._new_state, self._buffers
        strided = torch.strided
        for gi, (group, run) in enumerate(zip(self.param_groups, runs)):  # type: ignore[attr-defined]
            st = plan.specs[gi]
            structured = run.structured
            differentiable = bool(group.get("differentiable"))
            flags_of, row_of = run.flags, run.row_of
            others = []
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                dev, dt = p.device, p.dtype
                if (differentiable or type(p) not in _PLAIN_TYPES or g.layout is not strided
                        or dt not in SUPPORTED_DTYPES):
                    # a parameter the fused kernels do not take (a grad of another dtype or device
                    # than its parameter's goes into the bucket, whose check refuses it)
                    if structured or id(p) in l1_of:
                        keys = [k for k in _AFTER_KEYS if group.get(k) is not None] or list(_AFTER_KEYS)
                        raise ValueError(f"param_groups[{gi}] sets {', '.join(map(repr, keys))}, which the fused "
                                         f"step applies to the parameters it takes, but param_groups[{gi}]['params']"
                                         f"[{j}] needs torch's own step (a sparse or complex grad, "
                                         "differentiable=True or a tensor subclass)")
                    others.append(j)
                    continue
                # As torch: no state entry for a parameter that has no state
                # (SGD without momentum), so the state dict has none either.
                s = state.get(p)
                added = s is None
                if added:
                    s = {}
                if not s or s.keys() <= _PYREG_STATE_KEYS:  # none, or pyreg's own only
                    made.append((p, None if added else frozenset(s)))
                    new_state(p, s, group)
                bufs = buffers(p, s, group, run)
                if added and s:
                    state[p] = s
                s1, s2, s3, step = bufs[0], bufs[1], bufs[2], bufs[3]
                flags = flags_of[j]
                # Which state buffers exist is part of the key: the kernels take
                # each buffer list for all of a bucket's parameters or for none.
                key = (dev, dt, flags, None if step is None else step.dtype, s1 is None, s2 is None, s3 is None)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(flags, key[3])
                b.dynamic = b.dynamic or run.dynamic
                own = l1_of.get(id(p)) if l1_of else None
                if own is not None:  # its own row, l1 written in from the device vector (see _table)
                    r = len(b.row_values)
                    b.row_values.append(run.rows[row_of[j]])
                    b.row_src.append((gi, row_of[j]))
                    b.l1_vec = own[0]
                    b.l1_rows.append(r)
                    b.l1_index.append(own[1])
                else:
                    r = b.table_rows.get((gi, row_of[j]))
                    if r is None:
                        r = b.table_rows[(gi, row_of[j])] = len(b.row_values)
                        b.row_values.append(run.rows[row_of[j]])
                        b.row_src.append((gi, row_of[j]))
                b.params.append(p)
                b.grads.append(g)
                if s1 is not None:
                    b.s1.append(s1)
                if s2 is not None:
                    b.s2.append(s2)
                if s3 is not None:
                    b.s3.append(s3)
                if step is not None:
                    b.steps.append(step)
                b.rows.append(r)
                b.fresh.append(bufs[4])
            if others:
                if st.preconditioned and any(st.l1[j] or st.l2[j] for j in others):
                    raise ValueError(f"param_groups[{gi}] has preconditioned=True, which the fused kernels "
                                     "apply, but some of its parameters need torch's own step (sparse or "
                                     "complex grads, differentiable=True or tensor subclasses)")
                ps = [group["params"][j] for j in others]
                if any(st.l1[j] or st.l2[j] for j in others) and (
                        any(p.is_complex() for p in ps) or group.get("differentiable")):
                    raise ValueError(f"param_groups[{gi}] sets l1/l2 on parameters that need torch's own "
                                     "step (complex parameters or differentiable=True): pyreg's prox "
                                     "takes real parameters outside autograd")
                torch_groups.append((group, others, st))
        for b in buckets.values():  # before any kernel runs
            self._check_paired(b)
        self._made_state = made
        return list(buckets.values()), torch_groups

    def _unmake(self, buckets: List[_Bucket], made: List[Tuple[Tensor, Optional[frozenset]]]) -> None:
        """Takes back the state a gather made (``made``, see :meth:`_gather_into`,
        and the buffers the kernels would start from the grad, marked fresh in
        ``buckets``), for a step that raises before its kernels run."""
        self._drop_fresh(buckets)
        state = self.state  # type: ignore[attr-defined]
        for p, keys in made:
            s = state.get(p)
            if s is None:
                continue
            if keys is None:
                del state[p]
            else:
                for k in [k for k in s if k not in keys]:
                    del s[k]
        self._gathered = None

    def _check_paired(self, b: _Bucket) -> None:
        """Raises ``ValueError`` where a grad or state buffer of the bucket does not
        have its param's shape, dtype and device (the kernels pair elements by
        position): a param replaced through ``.data`` after its state was made,
        or a state dict of another model."""
        like = like_tensors(b.params)
        state = self.state  # type: ignore[attr-defined]
        for ts in (b.grads, b.s1, b.s2, b.s3):
            i = first_unpaired(b.params, ts, like) if ts else None
            if i is None:
                continue
            p, t = b.params[i], ts[i]
            what = "grad" if ts is b.grads else "state " + repr(next(
                (k for k, v in state.get(p, {}).items() if v is t), "buffer"))
            gi, j = next((gi, j) for gi, g in enumerate(self.param_groups)  # type: ignore[attr-defined]
                         for j, q in enumerate(g["params"]) if q is p)
            names = self.param_groups[gi].get("param_names")  # type: ignore[attr-defined]
            name = f" ({names[j]!r})" if names and j < len(names) else ""
            raise ValueError(
                f"param_groups[{gi}] parameter {j}{name} is {tuple(p.shape)} {p.dtype} on {p.device} but its {what} "
                f"is {tuple(t.shape)} {t.dtype} on {t.device}: a grad and the optimizer's state must have their "
                "parameter's shape, dtype and device (was the parameter replaced through .data, e.g. by "
                "Module.to(), after its state was made, or a state dict of another model loaded?)")

    def _forget_fresh_if_skipped(self, buckets: List[_Bucket]) -> None:
        """After a step that made a buffer the kernels start from the grad (SGD's
        momentum buffer at a parameter's first step): where GradScaler skipped
        the step (read on the host, at such steps only), the buffer made is
        dropped, as torch's step would not have made it (a zero buffer left
        would be taken for one with history at the next step)."""
        if self._amp_skipped():
            self._drop_fresh(buckets)

    def _drop_fresh(self, buckets: List[_Bucket]) -> None:
        """Drops the buffers made this step that the kernels start from the
        grad (see :meth:`_forget_fresh_if_skipped`), and a state entry they
        leave empty."""
        if not self._fresh_keys:
            return
        state = self.state  # type: ignore[attr-defined]
        for b in buckets:
            for p, fresh in zip(b.params, b.fresh):
                s = state.get(p) if fresh else None
                if s is not None:
                    for key in self._fresh_keys:
                        s.pop(key, None)
                    if not s:
                        del state[p]
        self._gathered = None

    def _amp_skipped(self) -> bool:
        """Whether GradScaler skips this step (found_inf). Read on the host, so
        only asked when a group sets group_l1, ref, l2_bound or max_norm (their passes
        run after the fused kernel, which skips on the device by itself) or
        l1_strength/group_strength (whose count of steps, on the host, a skipped
        step leaves as it was)."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

    def _amp_scalars(self, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """GradScaler's grad_scale and found_inf (set on the optimizer around
        step), as float32 scalars on ``device``."""
        out = []
        for name in ("grad_scale", "found_inf"):
            t = getattr(self, name, None)
            if t is not None:
                t = t.to(device=device, dtype=torch.float32, non_blocking=True)
            out.append(t)
        return out[0], out[1]

    def _table(self, b: _Bucket) -> Tensor:
        """The bucket's hyperparameter table on its device: cached while the
        numbers stay the same (one asynchronous copy when they change).
        Device tensors are written in on the device: a tensor lr at each step
        (so that a captured CUDA graph reads its value at each replay), each
        ``l1_strength`` l1 into its own row when it changed in place (its
        version) or is another tensor (the cache keeps the tensors it was
        made from, so no id is reused)."""
        dev = b.params[0].device
        rows = b.row_values
        if b.dynamic:
            t = table(rows, dev)
        else:
            key = (dev, tuple(rows))
            t = self._tables.get(key)
            if t is None:
                if len(self._tables) > 16:
                    self._tables.clear()
                t = self._tables[key] = table(rows, dev)
        if not b.l1_rows:
            return t
        vec = b.l1_vec
        key = (id(t), id(vec), tuple(b.l1_rows), tuple(b.l1_index))
        version = vec._version  # (its 0-dim views in the state share it)
        hit = None if b.dynamic else self._tables.get(key)
        if hit is not None and hit[1] == version:
            return hit[0]
        if hit is not None:  # a refresh since: the new values into the same copy (the same stream
            # orders this write after the steps that read it; l1_strength's steps are never captured)
            host = hit[5]
            if host is not None:  # (on the CPU, through numpy views: a few values, without an op's dispatch)
                host[0][host[1]] = host[3][host[2]]
            else:
                hit[0].view(-1).index_copy_(0, hit[4], _l1_values(b, vec, t))
            self._tables[key] = (hit[0], vec._version) + hit[2:]
            return hit[0]
        out = t.clone()
        at = to_device([r * len(HYPER) + L1_COLUMN for r in b.l1_rows], torch.int64, dev)
        out.view(-1).index_copy_(0, at, _l1_values(b, vec, t))
        if not b.dynamic:
            host = ((out.numpy().reshape(-1), at.numpy(), torch.tensor(b.l1_index).numpy(), vec.numpy())
                    if dev.type == "cpu" else None)
            self._tables[key] = (out, vec._version, vec, t, at, host)
        return out

    def _run(self, b: _Bucket) -> None:
        f = b.flags
        grad_scale, found_inf = self._amp_scalars(b.params[0].device)
        dev = b.params[0].device
        ticket = self._tickets.get(dev)
        if ticket is None:
            ticket = self._tickets[dev] = step_ticket(dev)
        fused_step(self._algo, b.params, b.grads, b.s1, b.s2, b.s3, b.steps, b.rows, b.fresh, self._table(b),
                   decoupled=f.decoupled, amsgrad=f.amsgrad, maximize=f.maximize, nesterov=f.nesterov,
                   centered=f.centered, prox=f.prox, grad_scale=grad_scale, found_inf=found_inf, ticket=ticket)

    def _run_torch(self, torch_groups) -> None:
        """torch's own step on the parameters the kernels do not take, then the
        prox of their l1/l2 (pyreg.prox_, with the group's lr; one call per
        device mesh of sharded parameters). GradScaler's scalars, which the
        fused kernels take, torch's own step does not: as GradScaler does for
        such an optimizer, the step is skipped where it found an inf or NaN
        (read on the host), else these grads are unscaled first."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return
        # (param, its grad): torch's step takes unscaled copies; after it the grads hold the unscaled values (as
        # the kernels leave theirs), and if it raises they are as they were
        swapped = []
        base = self._torch_base()
        saved = self.param_groups  # type: ignore[attr-defined]
        given = {k: self.__dict__[k] for k in ("grad_scale", "found_inf") if k in self.__dict__}
        try:
            if grad_scale is not None:
                inv = 1.0 / float(grad_scale)
                with torch.no_grad():
                    for group, idx, _ in torch_groups:
                        for j in idx:
                            p = group["params"][j]
                            if p.grad is not None:
                                swapped.append((p, p.grad))
                                p.grad = p.grad * inv
            self.param_groups = [dict(g, params=[g["params"][j] for j in idx]) for g, idx, _ in torch_groups]
            self.grad_scale = self.found_inf = None  # (torch's own step asserts it gets none)
            raw_step(base)(self)
            with torch.no_grad():
                for p, g in swapped:
                    g.copy_(p.grad)
        finally:
            self.param_groups = saved
            for k in ("grad_scale", "found_inf"):
                self.__dict__.pop(k, None)
            self.__dict__.update(given)
            for p, g in swapped:
                p.grad = g
        with torch.no_grad():
            for group, idx, st in torch_groups:
                meshes: Dict[Any, List[int]] = {}
                for j in idx:
                    if st.l1[j] or st.l2[j]:
                        meshes.setdefault(getattr(group["params"][j], "device_mesh", None), []).append(j)
                for on in meshes.values():
                    ops.prox_([group["params"][j] for j in on], [st.l1[j] for j in on], [st.l2[j] for j in on],
                              group["lr"])

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of the optimizer on every parameter with a grad, then the
        prox of its group's ``l1``/``l2`` (see the class docstring). A closure
        is called once, with grad enabled; its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply()
        return loss

    @outside_graph
    def _apply(self) -> None:
        """The update of every parameter with a grad. Under torch.compile it
        runs eagerly (a graph break): the kernels take raw pointers."""
        groups = self.param_groups  # type: ignore[attr-defined]
        engine = self._engine
        plan, lrs, hypers = engine.prepare(groups)
        runs = [self._run_of(gi, g, plan, hypers) for gi, g in enumerate(groups)]
        work = [w for w in map(Bucket.active, plan.buckets) if w is not None]
        strength = [w for w in work if w.kind in STRENGTH_KINDS]
        state = self.state  # type: ignore[attr-defined]
        # l1_strength: the kernel's prox reads each l1 from its own table row (see _table; group_strength:
        # the group pass), from the vector whose 0-dim views are in the state (the same objects every step).
        # Where the last step's buckets serve this one, the state holds the same objects as when they were
        # gathered (see _Gathered.reuse), so the vectors are those of then.
        l1_of = self._l1_of
        buckets = self._reuse(plan, runs, l1_of[1])
        if buckets is not None:
            vecs, torch_groups = l1_of[0], []
        else:
            vecs = [strength_l1(w, state) for w in strength]
            if len(l1_of[0]) != len(vecs) or not all(map(is_, l1_of[0], vecs)):  # (the same vectors: the same params)
                l1_of = self._l1_of = (vecs, {id(p): (v, i) for w, v in zip(strength, vecs) if w.kind == "strength"
                                             for i, p in enumerate(w.params)})
            buckets, torch_groups = self._gather(plan, runs, l1_of[1])
        if torch_groups:  # (never with kept buckets: see _gather)
            try:
                self._run_torch(torch_groups)
            except BaseException:
                self._unmake(buckets, self._made_state)
                raise
            finally:
                self._made_state = ()
        self._out["last"], self._out["penalty"] = penalized(work), None
        after = [w for w in work if w.kind not in ("elem", "strength")]
        if buckets or after:
            with torch.no_grad():
                skipped = bool(strength or after) and self._amp_skipped()
                # l1_strength: the step counted at C speed where the kept buckets' counter takes it (no refresh
                # due: 0), else in Python, which then makes the counter for the next steps that keep them
                # (unless the one they have answered that a refresh is due, 1: it stays as it is)
                answer = self._count_kept(strength) if strength and not skipped else None
                due = {} if skipped or answer == 0 else self._due(plan, strength)
                if strength and not skipped and answer != 0:
                    record_strength_step([w.bucket for w in strength], self.state)  # type: ignore[attr-defined]
                    if self._gathered is not None and answer != 1:
                        self._gathered.counter = strength_counter(strength, self.state)  # type: ignore[attr-defined]
                for b in buckets:
                    self._run(b)
                    b.grads = []  # (a kept bucket must not keep this step's grads alive)
                if self._fresh_keys and any(map(any, (b.fresh for b in buckets))):
                    self._forget_fresh_if_skipped(buckets)
                if after and not skipped:
                    prox_after = penalized(after)
                    if prox_after:  # (the lrs only where a prox reads them)
                        group_lrs = {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}
                        prox_buckets([(w, plan.work_lr(w, lrs, group_lrs)) for w in prox_after],
                                     self.state, metric=self._target_metrics(plan, prox_after))  # type: ignore[attr-defined]
                    constraints(after, self.state, self.param_groups)  # type: ignore[attr-defined]
                if due:  # the new coefficients from the next step on
                    self._refresh(plan, strength, due, vecs)
                    for b in buckets:  # (into the cached tables now, while they are at hand)
                        if b.l1_rows and not b.dynamic:
                            self._table(b)

    def _target_metrics(self, plan: Plan, works: List[Work]) -> Optional[Dict[int, tuple]]:
        """:meth:`_metric_terms` of each "target" bucket whose groups set
        ``preconditioned`` (one metric per bucket: see Plan), by bucket id;
        None where there is none."""
        out = None
        for w in works:
            if w.kind != "target" or not plan.specs[w.bucket.groups[0]].preconditioned:
                continue
            groups, state = self.param_groups, self.state  # type: ignore[attr-defined]
            if w.params is w.bucket.params:  # (every param has a grad: the bucket's order)
                items = [(p, state[p], groups[g]) for p, g in zip(w.params, w.bucket.groups)]
            else:
                gi = dict(zip(map(id, w.bucket.params), w.bucket.groups))
                items = [(p, state[p], groups[gi[id(p)]]) for p in w.params]
            got = self._metric_terms(items)
            if got is not None:
                out = {} if out is None else out
                out[id(w.bucket)] = got
        return out

    def _count_kept(self, strength: List[Work]) -> Optional[int]:
        """``l1_strength``: the answer of the kept buckets' counter
        (:func:`strength_counter`: 0, this step counted; 1, a refresh due;
        -1, the state not as it was), None without one (a step that gathered
        its buckets, or before a step counted them in Python)."""
        kept = self._gathered
        counter = None if kept is None else kept.counter
        if counter is None:
            return None
        for w in strength:
            check_countable(w.bucket)
        return counter.step(self.state)  # type: ignore[attr-defined]

    def _due(self, plan: Plan, strength: List[Work]) -> Dict[int, Optional[Tensor]]:
        """``l1_strength``: the params whose l1 this step refreshes, by id,
        each with a copy of its weights before the step where the push reads
        them (a weight decay's term, see :meth:`_push_needs_before`), else None."""
        groups = self.param_groups  # type: ignore[attr-defined]
        out: Dict[int, Optional[Tensor]] = {}
        for w in strength:
            due = strength_due(w.bucket, self.state)  # type: ignore[attr-defined]
            if not due:  # (most steps)
                continue
            gi = dict(zip(map(id, w.bucket.params), w.bucket.groups))
            before = {g: self._push_needs_before(groups[g]) for g in set(w.bucket.groups)}
            for p in due:
                if p.grad is not None:
                    out[id(p)] = p.detach().clone() if before[gi[id(p)]] else None
        return out

    def _refresh(self, plan: Plan, strength: List[Work], due: Dict[int, Optional[Tensor]], vecs: List[Tensor]) -> None:
        """``l1_strength`` / ``group_strength``: after the step, the l1 (group_l1)
        of the tensors due for a refresh, from their push (:meth:`_push`),
        for the next steps (``vecs``: each work's :func:`strength_l1` this step)."""
        groups = self.param_groups  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        for w, vec in zip(strength, vecs):
            gi = dict(zip(map(id, w.bucket.params), w.bucket.groups))
            todo = [(i, p, gi[id(p)]) for i, p in enumerate(w.params) if id(p) in due]
            metrics = [plan.specs[g].preconditioned for _, _, g in todo]
            pushes: Dict[int, Tensor] = {}
            for metric in set(metrics):  # (each call: one metric)
                some = todo if len(metrics) == 1 or metrics.count(metric) == len(metrics) else [
                    t for t, m in zip(todo, metrics) if m == metric]
                idx = [i for i, _, _ in some]
                items = [(p, state[p], groups[g], metric, due[id(p)]) for _, p, g in some]
                # (every tensor of the bucket at once: straight into the state's vector, as it was where a
                # quantile is not finite; see store_strength)
                into = vec if len(idx) == len(w.params) and vec.device.type == "cpu" else None
                old = None if into is None else into.tolist()
                if w.kind == "strength":
                    q = self._push_quantiles(items, strength_ks(w, idx, [p.numel() for _, p, _ in some]), into)
                else:  # (group_strength: over the groups of each push)
                    dims = [w.dims[i] for i in idx]
                    q = self._push_quantiles(items, strength_ks(w, idx, [p.shape[d] if p.dim() else 1 for (_, p, _), d
                                                                          in zip(some, dims)]), into, dims)
                if q is not None:  # (selected in the kernel)
                    if q is into:
                        keep_finite(into, old)
                    else:
                        store_strength(w, idx, q, state, vec=vec)
                else:
                    pushes.update(zip(idx, self._pushes(items)))
            if pushes:
                refresh_strength(w, dict(sorted(pushes.items(), key=lambda x: x[0])), state, vec=vec)


def _l1_values(b: _Bucket, vec: Tensor, t: Tensor) -> Tensor:
    """The l1 of the bucket's l1_strength rows, from ``vec`` (its entries
    ``b.l1_index``), as the table ``t`` holds them (device and dtype)."""
    whole = b.l1_index == list(range(vec.numel()))
    return (vec if whole else vec[b.l1_index]).to(device=t.device, dtype=t.dtype)


def grad_push_terms(items, second: str):
    """:meth:`FusedOptimizer._push_terms` for a push grad / (sqrt(v) + eps),
    v the state buffer ``second`` (Adagrad's and RMSprop's, where nothing
    else changes it; the grad alone in the optimizer's metric): ``(grads, v
    or None, eps, 1)`` for items of one group with a number eps and float32
    or float64 params (the kernel's state types), else None."""
    group = items[0][2] if items else None
    if (group is None or not isinstance(group["eps"], (int, float))
            or any(it[2] is not group or it[0].element_size() < 4 for it in items)):
        return None
    n = len(items)
    return ([it[0].grad for it in items], None if items[0][3] else [it[1][second] for it in items],
            [float(group["eps"])] * n, [1.0] * n)


def grad_with_decay(p: Tensor, group: Dict[str, Any], before: Optional[Tensor]) -> Tensor:
    """p's grad plus its coupled weight decay, ``weight_decay * before``
    (the weights before the step, as the kernel adds it)."""
    g = wide(p.grad.detach())
    wd = group.get("weight_decay", 0)
    return g + wd * wide(before) if wd else g


L1_COLUMN = HYPER.index("l1")

#: The keys that the fused step applies only to the parameters its kernels take.
_AFTER_KEYS = ("group_l1", "ref", "l2_bound", "max_norm", "target_sparsity", "l1_strength", "group_strength")

#: The fused classes' own arguments (not torch's).
_OWN_ARGS = frozenset(("self", "params", "l1", "l2", "preconditioned"))


@functools.lru_cache(maxsize=None)
def _accepted_args(torch_cls: type) -> frozenset:
    return frozenset(inspect.signature(torch_cls.__init__).parameters)


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives step counters (float64 when that is the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
