"""The regularization keys of a param group, read and checked once for both
optimizer families (:class:`pyreg.Regularized` and the fused
``pyreg.optim`` optimizers), and the checks of torch's own hyperparameters.

The keys (defaults in parentheses):

* ``l1``, ``l2`` (0): element-wise L1 / L2 coefficients;
* ``group_l1`` (0), ``group_dim`` (1): group lasso over the slices along ``group_dim``;
* ``ref`` (None): one reference tensor (or None) per parameter (L1-SP / L2-SP);
* ``max_norm`` (None), ``max_norm_dim`` (0): the max-norm constraint;
* ``l2_bound`` (None), ``l2_warmup`` (None), ``l2_mu`` (1): Constrained
  Parameter Regularization, a bound on each tensor's squared L2 norm kept by
  a Lagrange multiplier (see :func:`pyreg.optim.apply.l2_bound_buckets`):
  ``l2_bound`` is the bound (a coefficient), or ``"warm_start"``, each
  tensor's own squared norm after ``l2_warmup`` steps; ``l2_mu`` is the
  multiplier's rate;
* ``target_sparsity`` (None): a fraction of exact zeros in [0, 1] (a
  coefficient: one for the group, or one per parameter); at every step each
  tensor's ``l1`` is the smallest that gives it that fraction (see
  :func:`pyreg.optim.apply.target_prox`), in place of the group's ``l1``
  (with ``preconditioned``, in the optimizer's metric: the fraction of
  each tensor with the smallest ``|w| * d``, d the divisor of its step);
* ``l1_strength`` (None), ``l1_refresh`` (10): the L1 strength as a
  dimensionless fraction in [0, 1] (a coefficient): every ``l1_refresh``
  steps each tensor's ``l1`` becomes the ``l1_strength``-quantile of the
  magnitudes of its push, the optimizer's step in the prox's metric (see
  :func:`pyreg.optim.apply.refresh_strength`), in place of the group's ``l1``
  (0 until the first refresh; a quantile that is not finite, from a push
  with NaN or inf, leaves the l1 as it was);
* ``group_strength`` (None): the same for group lasso: every ``l1_refresh``
  steps each tensor's ``group_l1`` becomes the ``group_strength``-quantile,
  over its groups (slices along ``group_dim``), of the L2 norms of its push
  (see :func:`pyreg.optim.apply.refresh_strength`), in place of a given
  ``group_l1`` (plain metric; ``l1``/``l2`` add to it as with ``group_l1``);
* ``preconditioned`` (False): the prox in the optimizer's own metric (fused
  optimizers only).

A coefficient (``l1``, ``l2``, ``group_l1``, ``max_norm``) is accepted in the
same forms everywhere (so are ``l2_bound`` and ``l2_mu``): a number; a sequence with one number per parameter of
the group; a tensor with one value (0-dim or one element) or one value per
parameter (1-D). Each value must be finite and >= 0. A CPU tensor's values are
read when the group changes (a device tensor's would need a host sync: keep
coefficient tensors on the CPU).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._validate import dim_values, flag, group_dims, nonneg_real, one_value_tensor, with_values

#: The coefficient keys, and what each defaults to (None: not set).
COEF_KEYS = ("l1", "l2", "group_l1", "max_norm")
#: Every key pyreg reads from a param group.
KEYS = ("l1", "l2", "group_l1", "group_dim", "ref", "max_norm", "max_norm_dim", "preconditioned",
        "l2_bound", "l2_warmup", "l2_mu", "target_sparsity", "l1_strength", "l1_refresh",
        "group_strength")
#: The keys of the structured regularizers (after the update, outside the fused kernel).
STRUCTURED_KEYS = ("group_l1", "group_dim", "max_norm", "max_norm_dim", "l2_bound", "l2_warmup", "l2_mu",
                   "target_sparsity", "group_strength")


class GroupSettings(NamedTuple):
    """A param group's regularization, checked: one value per parameter."""

    l1: Tuple[float, ...]
    l2: Tuple[float, ...]
    group_l1: Tuple[float, ...]
    group_dim: Any                         # as given: an int or one int per parameter
    max_norm: Optional[Tuple[float, ...]]  # None: no constraint
    max_norm_dim: Any
    ref: Optional[tuple]                   # one tensor (or None) per parameter
    preconditioned: bool
    l2_bound: Optional[Tuple[float, ...]] = None  # None: no bound; NaN: "warm_start"
    l2_warmup: int = 0                             # steps before a "warm_start" bound is set
    l2_mu: Tuple[float, ...] = ()
    target: Optional[Tuple[float, ...]] = None  # target_sparsity (None: l1 as given)
    strength: Optional[Tuple[float, ...]] = None  # l1_strength (None: l1 as given)
    refresh: int = 10                              # l1_refresh: steps between two refreshes of l1
    gstrength: Optional[Tuple[float, ...]] = None  # group_strength (None: group_l1 as given)

    def kinds(self, j: int) -> Tuple[str, ...]:
        """What regularizes parameter ``j``: "group" (sparse group lasso with
        its l1/l2), "ref" (l1/l2 toward its reference), "elem" (l1/l2), and
        "max_norm"."""
        out: Tuple[str, ...] = ()
        if self.target is not None:
            out = ("target",)
        elif self.strength is not None:
            out = ("strength",)
        elif self.gstrength is not None:
            out = ("gstrength",)
        elif self.group_l1[j] != 0.0:
            out = ("group",)
        elif self.l1[j] != 0.0 or self.l2[j] != 0.0:
            out = ("ref",) if self.ref is not None and self.ref[j] is not None else ("elem",)
        if self.l2_bound is not None:
            out += ("l2_bound",)
        if self.max_norm is not None:
            out += ("max_norm",)
        return out

    def shape(self) -> tuple:
        """What a plan's buckets depend on (not the coefficient values); a
        ref by identity and layout (a tensor resized in place is checked
        against its parameter again)."""
        ref = None if self.ref is None else tuple(None if r is None else (id(r), r.shape, r.dtype, r.device)
                                                  for r in self.ref)
        return (tuple(self.kinds(j) for j in range(len(self.l1))), _hashable(self.group_dim),
                _hashable(self.max_norm_dim), ref, self.preconditioned)

    def values(self) -> tuple:
        return (self.l1, self.l2, self.group_l1, self.max_norm, self.l2_bound, self.l2_warmup, self.l2_mu,
                self.target, self.strength, self.refresh, self.gstrength)


def _hashable(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def coef_values(value: Any, n: int, where: str) -> Tuple[float, ...]:
    """A coefficient as one float per parameter (see the module docstring)."""
    if isinstance(value, Tensor):
        with_values(value, where)
        if value.numel() == 1:
            return (float(one_value_tensor(value, where)),) * n
        if value.dim() != 1 or value.numel() != n:
            raise ValueError(f"{where} is a tensor of shape {tuple(value.shape)}; expected one value "
                             f"or one per parameter ({n})")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{where} has dtype {value.dtype}; expected a real dtype")
        vals = value.detach().cpu().tolist()
        return tuple(nonneg_real(v, f"{where}[{i}]") for i, v in enumerate(vals))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (nonneg_real(value, where),) * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{where} has {len(value)} values but the group has {n} parameters")
        return tuple(_one(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where} must be a number, a sequence with one number per parameter or a "
                    f"tensor, got {type(value).__name__}")


def _one(v: Any, where: str) -> float:
    if isinstance(v, Tensor):
        return float(one_value_tensor(v, where))
    return nonneg_real(v, where)


def read_group(group: Dict[str, Any], defaults: Dict[str, Any], where: str) -> GroupSettings:
    """A group's keys, checked (a missing key takes ``defaults``' value, else
    the key's default). What depends on the parameters themselves (dims,
    refs) is checked by :func:`check_params`."""
    get = group.get
    n = len(group.get("params", ()))

    def coef(key, default):
        return coef_values(get(key, defaults.get(key, default)), n, f"{where}[{key!r}]")

    l1, l2, gl1 = coef("l1", 0.0), coef("l2", 0.0), coef("group_l1", 0.0)
    mx = get("max_norm", defaults.get("max_norm"))
    mx = None if mx is None else coef_values(mx, n, f"{where}['max_norm']")
    ref = get("ref")
    if ref is not None:
        if isinstance(ref, Tensor) or not isinstance(ref, (list, tuple)):
            raise TypeError(f"{where}['ref'] must be a list with one tensor (or None) per parameter, "
                            f"got {type(ref).__name__}")
        ref = tuple(ref)
        if len(ref) != n:
            raise ValueError(f"{where}['ref'] has {len(ref)} entries but the group has {n} parameters")
        for k, r in enumerate(ref):
            if r is not None and not isinstance(r, Tensor):
                raise TypeError(f"{where}['ref'][{k}] is a {type(r).__name__}, not a tensor or None")
            if r is not None and r.layout != torch.strided:
                raise TypeError(f"{where}['ref'][{k}] is a tensor of layout {r.layout}; a reference is a dense "
                                "(strided) tensor like its parameter")
    pre = flag(get("preconditioned", defaults.get("preconditioned", False)), f"{where}['preconditioned']")
    bound, warmup = _l2_bound(get("l2_bound", defaults.get("l2_bound")), get("l2_warmup", defaults.get("l2_warmup")),
                              n, where)
    target = get("target_sparsity", defaults.get("target_sparsity"))
    if target is not None:
        target = coef_values(target, n, f"{where}['target_sparsity']")
        bad = next((t for t in target if t > 1.0), None)
        if bad is not None:
            raise ValueError(f"{where}['target_sparsity'] is a fraction of exact zeros, in [0, 1]; got {bad}")
        if any(gl1):
            raise ValueError(f"{where} sets both 'target_sparsity' and 'group_l1': the target adapts the "
                             "element-wise l1 (group lasso with a target is not supported)")
        if ref is not None and any(r is not None for r in ref):
            raise ValueError(f"{where} sets both 'target_sparsity' and 'ref': the target counts exact zeros, "
                             "not weights equal to their reference")
    strength, refresh = _strength(get("l1_strength", defaults.get("l1_strength")),
                                  get("l1_refresh", defaults.get("l1_refresh")), n, where)
    if strength is not None:
        other = ("target_sparsity" if target is not None else "group_l1" if any(gl1) else "l1" if any(l1)
                 else "ref" if ref is not None and any(r is not None for r in ref) else None)
        if other is not None:
            raise ValueError(f"{where} sets both 'l1_strength' and {other!r}: the strength sets each tensor's "
                             "element-wise l1 (leave 'l1' at 0; group lasso or a reference with a strength is "
                             "not supported)")
    gstrength = _fraction(get("group_strength", defaults.get("group_strength")), n, where, "group_strength")
    if gstrength is not None:
        other = ("l1_strength" if strength is not None else "target_sparsity" if target is not None
                 else "group_l1" if any(gl1) else "ref" if ref is not None and any(r is not None for r in ref)
                 else "preconditioned" if pre else None)
        if other is not None:
            raise ValueError(f"{where} sets both 'group_strength' and {other!r}: the strength sets each tensor's "
                             "group_l1 in the plain metric (leave 'group_l1' at 0; l1 and l2 may be set)")
    gdim, mdim = get("group_dim", 1), get("max_norm_dim", 0)
    if any(gl1) or gstrength is not None:  # (their types at every read: 1.0 or True would match 1 in the plan)
        dim_values(gdim, n, f"{where}['group_dim']")
    if mx is not None:
        dim_values(mdim, n, f"{where}['max_norm_dim']")
    st = GroupSettings(l1, l2, gl1, gdim, mx, mdim, ref, pre, bound, warmup,
                       coef("l2_mu", 1.0), target, strength, refresh, gstrength)
    if pre and (any(gl1) or (ref is not None and any(r is not None for r in ref))):
        raise ValueError(f"{where} sets preconditioned=True with group_l1 or ref: the prox in the "
                         "optimizer's metric is element-wise L1/L2 only")
    return st


def _l2_bound(bound: Any, warmup: Any, n: int, where: str) -> Tuple[Optional[Tuple[float, ...]], int]:
    """``l2_bound`` and ``l2_warmup`` checked: (one bound per parameter, NaN
    for "warm_start", or None; the warm-up steps, 0 for a given bound)."""
    if isinstance(bound, str):
        if bound != "warm_start":
            raise ValueError(f"{where}['l2_bound'] must be a bound (a number, one per parameter, or a tensor) "
                             f"or 'warm_start', got {bound!r}")
        if warmup is None:
            raise ValueError(f"{where}['l2_bound'] is 'warm_start', which sets each tensor's bound from its "
                             "weights after a warm-up: set 'l2_warmup' to the number of steps (>= 1)")
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1:
            raise ValueError(f"{where}['l2_warmup'] must be a number of steps >= 1, got {warmup!r}")
        return (math.nan,) * n, int(warmup)
    if warmup is not None:
        raise ValueError(f"{where}['l2_warmup'] is set, but 'l2_bound' is {bound!r}: the warm-up sets the "
                         "bound of l2_bound='warm_start' only")
    if bound is None:
        return None, 0
    return coef_values(bound, n, f"{where}['l2_bound']"), 0


def _strength(strength: Any, refresh: Any, n: int, where: str) -> Tuple[Optional[Tuple[float, ...]], int]:
    """``l1_strength`` and ``l1_refresh`` checked: (one fraction in [0, 1]
    per parameter, or None; the steps between refreshes)."""
    if refresh is None:
        refresh = 10
    elif isinstance(refresh, bool) or not isinstance(refresh, numbers.Integral) or refresh < 1:
        raise ValueError(f"{where}['l1_refresh'] must be a number of steps >= 1, got {refresh!r}")
    return _fraction(strength, n, where, "l1_strength"), int(refresh)


def _fraction(value: Any, n: int, where: str, key: str) -> Optional[Tuple[float, ...]]:
    """A strength (``l1_strength``, ``group_strength``): None, or one
    fraction in [0, 1] per parameter."""
    if value is None:
        return None
    vals = coef_values(value, n, f"{where}[{key!r}]")
    bad = next((v for v in vals if v > 1.0), None)
    if bad is not None:
        raise ValueError(f"{where}[{key!r}] is a fraction in [0, 1] (0: no penalty, 1: the largest push "
                         f"of each tensor); got {bad}")
    return vals


def check_params(st: GroupSettings, params: Sequence[Tensor], where: str
                 ) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """A group's settings against its parameters: the refs (one per parameter,
    each like it) and the group dimensions. Returns each parameter's
    normalized group_dim and max_norm_dim (None where unused)."""
    if st.ref is not None:
        if len(st.ref) != len(params):
            raise ValueError(f"{where}['ref'] has {len(st.ref)} entries but the group has "
                             f"{len(params)} parameters")
        for k, (r, p) in enumerate(zip(st.ref, params)):
            if r is None:
                continue
            if not isinstance(r, Tensor):
                raise TypeError(f"{where}['ref'][{k}] is a {type(r).__name__}, not a tensor or None")
            if r.shape != p.shape or r.dtype != p.dtype or r.device != p.device:
                raise ValueError(f"{where}['ref'][{k}] is {tuple(r.shape)} {r.dtype} on {r.device} but its "
                                 f"parameter is {tuple(p.shape)} {p.dtype} on {p.device}")
        if any(g != 0.0 and r is not None for g, r in zip(st.group_l1, st.ref)):
            raise ValueError(f"{where} sets both 'group_l1' and 'ref': group lasso toward a reference "
                             "is not supported")
    gdims = (group_dims(st.group_dim, params, f"{where}['group_dim']")
             if any(st.group_l1) or st.gstrength is not None else None)
    mdims = (group_dims(st.max_norm_dim, params, f"{where}['max_norm_dim']")
             if st.max_norm is not None else None)
    return gdims, mdims


# --------------------------------------------------------------------------
# torch's hyperparameters, checked at each step where they changed
# --------------------------------------------------------------------------
def lr_value(lr: Any, where: str):
    """An lr: a finite number >= 0, or a one-value tensor (a CPU one's value
    checked; a device tensor's value is not read: that would sync)."""
    if isinstance(lr, Tensor):
        return one_value_tensor(lr, where)
    return nonneg_real(lr, where)


def _unit(v: Any, where: str) -> None:
    """A beta: 0 <= v < 1."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{where} is a tensor of shape {tuple(v.shape)}; expected one value")
        if v.device.type != "cpu" or torch.compiler.is_compiling():
            return
        v = float(v)
    x = nonneg_real(v, where)
    if not x < 1.0:
        raise ValueError(f"{where} must be in [0, 1), got {x}")


def _finite(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{where} must be a finite number, got {v!r}")


#: torch.optim's hyperparameters that pyreg checks at each step (where a group
#: has them), with their rule: what torch's constructors check, plus finite.
_HYPER_RULES = {
    "lr": lr_value,
    "eps": nonneg_real,
    "weight_decay": nonneg_real,
    "momentum": nonneg_real,
    "dampening": _finite,
    "alpha": nonneg_real,
    "lr_decay": nonneg_real,
    "initial_accumulator_value": nonneg_real,
}


#: The hyperparameters checked for each torch.optim class (by name): those
#: whose meaning is known there (another optimizer's ``eps`` may be a pair).
TORCH_HYPER_KEYS: Dict[str, Tuple[str, ...]] = {
    "SGD": ("lr", "weight_decay", "momentum", "dampening"),
    "Adagrad": ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
    **{name: ("lr", "betas", "eps", "weight_decay") for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam")},
}


def hyper_keys_of(optimizer_cls: type) -> Tuple[str, ...]:
    """The hyperparameters to check for an optimizer class: those of the
    torch.optim class it is or derives from, else none."""
    for c in optimizer_cls.__mro__:
        if c.__module__.startswith("torch.optim") and c.__name__ in TORCH_HYPER_KEYS:
            return TORCH_HYPER_KEYS[c.__name__]
    return ()


def check_values(values: Dict[str, Any]) -> None:
    """The hyperparameters of a functional call (``lr``, ``beta1``, ``beta2``,
    ``eps``, ``weight_decay``, ``momentum``, ``dampening``, ``alpha``,
    ``lr_decay``, ``initial_accumulator_value``, ``l1``, ``l2``): ValueError
    (TypeError for a value that is no number) naming the argument, as a
    group's are checked."""
    for key, v in values.items():
        rule = _unit if key in ("beta1", "beta2") else nonneg_real if key in ("l1", "l2") else _HYPER_RULES.get(key)
        if rule is not None:
            rule(v, key)


def check_hypers(group: Dict[str, Any], where: str, keys: Sequence[str], tensor_decay: bool = False) -> None:
    """torch's hyperparameters ``keys`` of a group (lr, betas, eps,
    weight_decay, momentum, dampening, alpha, lr_decay,
    initial_accumulator_value; SGD's nesterov with its momentum and
    dampening), where present: ValueError for a value torch's constructor
    would reject, or one that is not finite. ``tensor_decay``: a one-value
    tensor ``weight_decay`` is taken (torch's own step reads it)."""
    for key in keys:
        rule = _HYPER_RULES.get(key)
        if rule is not None and key in group:
            if tensor_decay and key == "weight_decay" and isinstance(group[key], Tensor):
                rule = one_value_tensor
            rule(group[key], f"{where}[{key!r}]")
    if "dampening" in keys and bool(group.get("nesterov")) and (
            group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
        raise ValueError(f"{where} sets nesterov=True: Nesterov momentum needs a momentum > 0 and zero dampening "
                         f"(as torch's SGD), got momentum={group.get('momentum', 0)!r}, "
                         f"dampening={group.get('dampening', 0)!r}")
    if "betas" in keys and "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}['betas'] must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            _unit(b, f"{where}['betas'][{i}]")


# --------------------------------------------------------------------------
# Signatures: when a group's settings must be checked again
# --------------------------------------------------------------------------
#: A CPU tensor setting of up to this many values is compared by value at each step (see :func:`signature`).
VALUES_READ = 1024
_VALUE_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64))
#: Setting types whose value is its own key (with their type: 1, 1.0 and True
#: are equal numbers but not equal settings).
SIMPLE_TYPES = frozenset({float, int, bool, str, type(None)})


def signature(value: Any) -> Any:
    """A cheap signature of a param-group setting, equal for two settings only
    when their checks and plan are the same: a number by value, a tensor by
    identity, in-place version, shape (``resize_`` bumps no version), dtype,
    device and layout (``.data`` replaced keeps the first two) and, for a dense
    CPU tensor, values (up to :data:`VALUES_READ` of them: a write that bumps no
    version, through a numpy view or ``.data``, is seen), a list by its items'
    signatures, anything else by type and identity. Never reads a device
    tensor's value (no host sync)."""
    tp = type(value)
    if tp in SIMPLE_TYPES:
        return tp, value
    if isinstance(value, Tensor):
        v = None
        if value.device.type == "cpu" and value.dtype in _VALUE_DTYPES and value.layout is torch.strided:
            n = value.numel()
            v = float(value) if n == 1 else tuple(value.detach().reshape(-1).tolist()) if n <= VALUES_READ else None
        return Tensor, id(value), value._version, value.shape, value.dtype, value.device, value.layout, v
    if tp is list or tp is tuple:
        return tp, tuple(map(signature, value))
    return tp, id(value)


def group_signature(group: Dict[str, Any], keys: Sequence[str]) -> tuple:
    """The signature of a group's ``keys`` (see :func:`signature`)."""
    vals = tuple(map(group.get, keys))
    types = tuple(map(type, vals))
    if set(types) <= SIMPLE_TYPES:
        return vals, types
    return tuple(map(signature, vals)), types


def hyper_signature(group: Dict[str, Any]) -> tuple:
    """The signature of every key of a group but its parameters and pyreg's
    keys (their checks do not depend on a number's type: 1 and 1.0 are equal)."""
    return tuple([v if type(v) in _PLAIN else signature(v) for k, v in group.items() if k not in _NOT_HYPER])


_PLAIN = frozenset({float, int, bool, str, type(None)})


_NOT_HYPER = frozenset(("params", "param_names") + KEYS)
