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
from functools import partial
from operator import attrgetter
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends, ops
from .._common import DTYPE_CODES, SUPPORTED_DTYPES, has_dtensor, to_device
from .._validate import (check_grads_apart, disjoint_pointers, first_overlap, group_dims, nonneg_real,
                         one_value_tensor, plain_cpu, tensor_list)

__all__ = ["Regularized", "param_groups", "default_exclude", "ParamStats", "Sparsity"]

MODES = ("proximal", "gradient")
_COEF_KEYS = ("l1", "l2")
#: Param-group keys of the structured regularizers (see Regularized).
_STRUCTURED_KEYS = ("group_l1", "group_dim", "max_norm", "max_norm_dim")


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
# A group's regularization settings
# --------------------------------------------------------------------------
class _GroupSpec(NamedTuple):
    """A param group's validated settings (see :class:`Regularized`)."""

    l1: float
    l2: float
    group_l1: float
    group_dim: Any            # int, or one int per parameter
    max_norm: Optional[float]
    max_norm_dim: Any         # int, or one int per parameter
    ref: Optional[tuple]      # one tensor (or None) per parameter

    def values(self) -> Tuple[float, float, float, Optional[float]]:
        """The numbers a plan writes into its coefficient tensors in place."""
        return self.l1, self.l2, self.group_l1, self.max_norm

    def shape(self) -> tuple:
        """What the plan's buckets depend on (not the coefficient values)."""
        ref = None if self.ref is None else tuple(None if r is None else id(r) for r in self.ref)
        return (self.l1 == 0.0 and self.l2 == 0.0, self.group_l1 == 0.0, _hashable(self.group_dim),
                self.max_norm is None, _hashable(self.max_norm_dim), ref)


def _hashable(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def _key(value: Any) -> Any:
    """A cheap signature of a param-group setting, equal for two settings only
    when their validation and plan are the same: a float or None as itself
    (by value), a tensor by identity, in-place version and (for a one-value
    CPU tensor) value, a list by its items' keys, anything else by its type
    and identity. Never reads a device tensor's value (no host sync)."""
    tp = type(value)
    if tp is float or value is None:
        return value
    if tp is int or tp is bool:
        return tp, value
    if isinstance(value, Tensor):
        v = None
        if value.device.type == "cpu" and value.numel() == 1 and value.dtype in _VALUE_DTYPES:
            v = float(value)
        return Tensor, id(value), value._version, v
    if tp is list or tp is tuple:
        return tp, tuple(map(_key, value))
    return tp, id(value)


_kind_of = attrgetter("dtype", "device")
_VALUE_DTYPES = frozenset(SUPPORTED_DTYPES + (torch.int32, torch.int64))
#: The group keys a plan depends on (their values and, through the plan's
#: buckets, the parameters).
_PLAN_KEYS = ("l1", "l2", "group_l1", "group_dim", "max_norm", "max_norm_dim", "ref")


def _group_key(group: Dict[str, Any]) -> tuple:
    """What a plan depends on in one group, cheaply (see :func:`_key`): its
    settings and its parameters (identity, dtype, device)."""
    vals = tuple(map(group.get, _PLAN_KEYS))
    types = tuple(map(type, vals))
    if not set(types) <= _SIMPLE_TYPES:  # tensors, lists: see _key
        vals = tuple(map(_key, vals))
    ps = group["params"]
    return vals, types, tuple(map(id, ps)), tuple(map(_kind_of, ps))


#: Setting types whose value is its own key (compared with their type: 1, 1.0
#: and True are equal numbers but not equal settings).
_SIMPLE_TYPES = frozenset({float, int, type(None)})


def group_spec(group: Dict[str, Any], defaults: "Regularized", where: str) -> _GroupSpec:
    """A group's settings, validated (cheap: runs every step). What depends on
    its parameters is checked by :func:`check_group_params` when a plan is
    built."""
    get = group.get
    l1 = _group_coef(get("l1", defaults.l1), f"{where}['l1']")
    l2 = _group_coef(get("l2", defaults.l2), f"{where}['l2']")
    gl1 = _group_coef(get("group_l1", 0.0), f"{where}['group_l1']")
    mx = get("max_norm")
    mx = None if mx is None else _group_coef(mx, f"{where}['max_norm']")
    ref = get("ref")
    if ref is not None:
        if isinstance(ref, Tensor) or not isinstance(ref, (list, tuple)):
            raise TypeError(f"{where}['ref'] must be a list with one tensor (or None) per parameter, "
                            f"got {type(ref).__name__}")
        ref = tuple(ref)
    return _GroupSpec(l1, l2, gl1, get("group_dim", 1), mx, get("max_norm_dim", 0), ref)


def check_group_params(spec: _GroupSpec, params: Sequence[Tensor], where: str
                        ) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """A group's settings against its parameters: the refs (one per parameter,
    each like it) and the group dimensions. Returns the normalized group_dim
    and max_norm_dim of each parameter (None where unused)."""
    if spec.ref is not None:
        if len(spec.ref) != len(params):
            raise ValueError(f"{where}['ref'] has {len(spec.ref)} entries but the group has "
                             f"{len(params)} parameters")
        for k, (r, p) in enumerate(zip(spec.ref, params)):
            if r is None:
                continue
            if not isinstance(r, Tensor):
                raise TypeError(f"{where}['ref'][{k}] is a {type(r).__name__}, not a tensor or None")
            if r.shape != p.shape or r.dtype != p.dtype or r.device != p.device:
                raise ValueError(f"{where}['ref'][{k}] is {tuple(r.shape)} {r.dtype} on {r.device} but its "
                                 f"parameter is {tuple(p.shape)} {p.dtype} on {p.device}")
        if spec.group_l1 != 0.0 and any(r is not None for r in spec.ref):
            raise ValueError(f"{where} sets both 'group_l1' and 'ref': group lasso toward a reference "
                             "is not supported")
    gdims = group_dims(spec.group_dim, params, f"{where}['group_dim']") if spec.group_l1 != 0.0 else None
    mdims = (group_dims(spec.max_norm_dim, params, f"{where}['max_norm_dim']")
             if spec.max_norm is not None else None)
    return gdims, mdims


# --------------------------------------------------------------------------
# The cached plan: buckets of parameters with per-tensor coefficients
# --------------------------------------------------------------------------
#: What a bucket does: element-wise L1/L2 ("elem"), toward reference weights
#: ("ref"), with group lasso ("group"), or the max-norm projection ("max_norm").
_KINDS = ("elem", "ref", "group", "max_norm")
#: The coefficients each kind of bucket holds, as per-tensor float64 tensors.
_KIND_COEFS = {"elem": ("l1", "l2"), "ref": ("l1", "l2"), "group": ("l1", "l2", "group_l1"),
               "max_norm": ("max_norm",)}


class _Bucket:
    """Parameters of one (device, dtype) and kind, with their per-tensor
    coefficients (float64 tensors on the device), group dimensions and refs."""

    def __init__(self, kind: str, params: List[Tensor], groups: List[int], values: Dict[str, List[float]],
                 dims: Optional[List[int]], refs: Optional[List[Tensor]]):
        self.kind, self.params, self.groups = kind, params, groups
        self.dims, self.refs = dims, refs
        dev = self.device = params[0].device
        self.values = values
        self.coefs = {k: to_device(v, torch.float64, dev) for k, v in values.items()}
        self.scalars = _scalars(values)
        self.group_index = to_device(groups, torch.int64, dev)  # selects each tensor's group lr
        self.one_group = groups[0] if groups.count(groups[0]) == len(groups) else None
        self._subsets: Dict[Tuple[bool, ...], Tuple[List[int], Tensor]] = {}
        self._direct: Optional[list] = None  # see direct()

    def direct(self) -> Optional[list]:
        """For a plain eager step on the CPU: ``[pointers, numels, dtype codes,
        nnz scratch, grad pointers]`` of this bucket's params (the last: of
        grads last found apart from each other and from the params, see
        ``_direct_grads``), for calling the kernels with no per-call list
        checks, or None (then the ops run, with their checks).

        Only an "elem" bucket of plain, contiguous, non-inference CPU tensors,
        pairwise disjoint in memory; checked when first asked and again
        whenever a parameter's data pointer or size changed. The plan's
        signature covers the rest (each parameter's identity, dtype, device)."""
        ps = self.params
        if self.kind != "elem" or self.device.type != "cpu":
            return None
        d = self._direct
        ptrs = list(map(Tensor.data_ptr, ps))
        if (d is not None and ptrs == d[0] and all(map(Tensor.is_contiguous, ps))
                and list(map(Tensor.numel, ps)) == d[1]):
            return d
        if (not plain_cpu(ps) or any(map(Tensor.is_inference, ps))
                or disjoint_pointers(ps) is None):
            self._direct = None
            return None
        code = DTYPE_CODES[ps[0].dtype]
        self._direct = d = [ptrs, list(map(Tensor.numel, ps)), [code] * len(ps),
                            torch.empty(len(ps), dtype=torch.int64), None]
        return d

    def set_values(self, values: Dict[str, List[float]]) -> None:
        """New coefficient values, written into the same tensors: a compiled step
        (or a CUDA graph) reads them as inputs, so a change recompiles nothing."""
        for k, new in values.items():
            if new != self.values[k]:
                self.coefs[k].copy_(to_device(new, torch.float64, self.device))
        self.values = values
        self.scalars = _scalars(values)

    def active(self) -> Optional["_Work"]:
        """The bucket restricted to params with a grad (None if there are none),
        with each tensor's group index as a device tensor."""
        mask = tuple(p.grad is not None for p in self.params)
        if all(mask):
            return _Work(self.kind, self.params, self.group_index, self.coefs, self.dims, self.refs, self)
        if not any(mask):
            return None
        sub = self._subsets.get(mask)
        if sub is None:
            idx = [i for i, m in enumerate(mask) if m]
            # One transfer per new mask, then cached; the values are gathered
            # from the coefficient tensors at each use, so in-place updates apply.
            sub = (idx, to_device(idx, torch.int64, self.device))
            if len(self._subsets) >= 8:
                self._subsets.clear()
            self._subsets[mask] = sub
        idx, sel = sub
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])  # noqa: E731
        return _Work(self.kind, pick(self.params), self.group_index.index_select(0, sel),
                     {k: c.index_select(0, sel) for k, c in self.coefs.items()}, pick(self.dims),
                     pick(self.refs), self)


def _scalars(values: Dict[str, List[Optional[float]]]) -> Dict[str, Optional[float]]:
    """Per coefficient, its one value when every tensor of the bucket has the
    same (the ops then take it as a number: no tensor to read), else None."""
    return {k: (v[0] if v and v[0] is not None and v.count(v[0]) == len(v) else None)
            for k, v in values.items()}


class _Work(NamedTuple):
    """What a step does to one bucket: its params (with a grad), their group
    indices, per-tensor coefficients, group dimensions and refs."""

    kind: str
    params: List[Tensor]
    groups: Tensor
    coefs: Dict[str, Tensor]
    dims: Optional[List[int]]
    refs: Optional[List[Tensor]]
    bucket: "_Bucket"

    def coef(self, name: str, eager: bool) -> Union[float, Tensor]:
        """Coefficient ``name`` as the ops take it: in eager mode the one value
        when every tensor has the same, else (and under torch.compile, where
        coefficients are graph inputs) the per-tensor tensor."""
        v = self.bucket.scalars[name] if eager else None
        return self.coefs[name] if v is None else v


class _Plan:
    """What a step needs, derived from the param groups and cached on them."""

    def __init__(self, groups: List[Dict[str, Any]], specs: List[_GroupSpec]):
        seen = set()
        reg: Dict[tuple, Tuple[list, list, Dict[str, list], list, list]] = OrderedDict()
        every: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list]] = OrderedDict()
        reg_names: Dict[int, str] = {}
        self.names: List[str] = []
        position = 0
        for gi, (group, spec) in enumerate(zip(groups, specs)):
            names = group.get("param_names")
            params = group["params"]
            where = f"param_groups[{gi}]"
            gdims, mdims = check_group_params(spec, params, where)
            for j, p in enumerate(params):
                name = names[j] if names is not None and j < len(names) else f"param_groups.{gi}.{j}"
                if id(p) in seen:
                    raise ValueError(f"{where} holds a parameter ({name!r}) that appears "
                                     "earlier in the optimizer; each parameter must appear once")
                seen.add(id(p))
                self.names.append(name)
                key = (p.device, p.dtype)
                e = every.setdefault(key, ([], []))
                e[0].append(p)
                e[1].append(position)
                position += 1
                ref = spec.ref[j] if spec.ref is not None else None
                kinds = []
                if spec.group_l1 != 0.0:
                    kinds.append("group")
                elif not (spec.l1 == 0.0 and spec.l2 == 0.0):
                    kinds.append("ref" if ref is not None else "elem")
                if spec.max_norm is not None:
                    kinds.append("max_norm")
                if not kinds:
                    continue  # nothing to do for this tensor: leave it out of the ops
                if p.dtype not in SUPPORTED_DTYPES or p.layout != torch.strided:
                    raise TypeError(f"{where} parameter {name!r} is {p.dtype} "
                                    f"({p.layout}); pyreg regularizes dense float32, float64, "
                                    "float16 and bfloat16 tensors")
                if p.is_meta:
                    raise ValueError(f"{where} parameter {name!r} is a meta tensor: "
                                     "it has no data to regularize")
                if kinds != ["elem"] and has_dtensor([p]):
                    raise TypeError(f"{where} parameter {name!r} is a DTensor (sharded): group_l1, "
                                    "ref and max_norm need the full tensor; use l1/l2 on sharded "
                                    "parameters")
                vals = dict(zip(("l1", "l2", "group_l1", "max_norm"), spec.values()))
                for kind in kinds:
                    b = reg.setdefault((kind, p.device, p.dtype), ([], [], {}, [], []))
                    b[0].append(p), b[1].append(gi)
                    for k in _KIND_COEFS[kind]:
                        b[2].setdefault(k, []).append(vals[k])
                    b[3].append(gdims[j] if kind == "group" else mdims[j] if kind == "max_norm" else None)
                    b[4].append(ref)
                reg_names[id(p)] = name
        # The ops write the params after the inner step: reject shared memory
        # now, before any step, rather than half-way through one.
        reg_params = list({id(p): p for b in reg.values() for p in b[0]}.values())
        bad = None if torch.compiler.is_compiling() else first_overlap(reg_params)
        if bad is not None:
            na, nb = (reg_names[id(reg_params[i])] for i in bad)
            raise ValueError(f"parameter {na!r} overlaps itself in memory (an expanded view?)"
                             if bad[0] == bad[1] else
                             f"parameters {na!r} and {nb!r} share memory; "
                             "pyreg updates each regularized parameter in place, so they must be distinct")
        order = {k: i for i, k in enumerate(_KINDS)}
        self.buckets = [_Bucket(kind, ps, gs, vals, dims if kind in ("group", "max_norm") else None,
                                refs if kind == "ref" else None)
                        for (kind, _, _), (ps, gs, vals, dims, refs)
                        in sorted(reg.items(), key=lambda kv: order[kv[0][0]])]
        self.devices = list(dict.fromkeys(b.device for b in self.buckets))
        self.specs = specs
        self._lr_cache: Dict[torch.device, Tuple[tuple, Tensor]] = {}
        self._work_lr_cache: Dict[int, Tuple[Tensor, Tensor]] = {}
        # For stats(): every parameter (regularized or not), bucketed, plus the
        # permutation back to optimizer order.
        self.stat_buckets = [ps for ps, _ in every.values()]
        order_ = [i for _, pos in every.values() for i in pos]
        self.first_device = next(iter(every))[0] if every else torch.device("cpu")
        inverse = [0] * len(order_)
        for k, i in enumerate(order_):
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

    def work_lr(self, w: "_Work", lrs: list, group_lrs: Dict[torch.device, Tensor]) -> Union[float, Tensor]:
        """The lr of each tensor of ``w``: in eager mode, a bucket whose tensors
        all belong to one group with a number lr gets that number; else one
        float64 per tensor on the device (in eager mode cached while the
        groups' lrs stay the same)."""
        g = w.bucket.one_group
        compiling = torch.compiler.is_compiling()
        if g is not None and type(lrs[g]) is float and not compiling:
            return lrs[g]
        lr = group_lrs[w.bucket.device]
        if compiling or w.groups is not w.bucket.group_index:
            return lr.index_select(0, w.groups)
        hit = self._work_lr_cache.get(id(w.bucket))
        if hit is not None and hit[0] is lr:
            return hit[1]
        out = lr.index_select(0, w.groups)
        self._work_lr_cache[id(w.bucket)] = (lr, out)
        return out

    def set_values(self, specs: List[_GroupSpec]) -> None:
        """New coefficient values with the same shape (so the same buckets)."""
        for b in self.buckets:
            b.set_values({k: [dict(zip(("l1", "l2", "group_l1", "max_norm"), specs[g].values()))[k]
                              for g in b.groups] for k in _KIND_COEFS[b.kind]})
        self.specs = specs


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

    Parameters whose ``grad`` is None are not touched in either mode, nor are
    groups without any regularizer.

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
        self._quick: Optional[tuple] = None  # quick signature of the groups the plan was checked for
        self._lr_values: Optional[Tuple[tuple, list]] = None  # (signature, validated lrs)
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
        skip = ("_plan_cache", "_signature", "_out", "_quick", "_lr_values")  # caches: rebuilt on use
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._out = {"last": [], "penalty": None}
        self._plan_cache, self._signature = None, None
        self._quick, self._lr_values = None, None
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
        param_group = dict(param_group)
        if "params" in param_group:  # a list, so that checking it consumes no iterator
            ps = param_group["params"]
            param_group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
        check_group_params(group_spec(param_group, self, where), param_group.get("params", []), where)
        param_group.setdefault("l1", self.l1)
        param_group.setdefault("l2", self.l2)
        self.optimizer.add_param_group(param_group)
        self._signature = self._quick = None

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
            for key, default in (("l1", l1), ("l2", l2), ("group_l1", 0.0), ("max_norm", None)):
                value = group.get(key, default)
                if value is not None:
                    _group_coef(value, f"state_dict param_groups[{gi}][{key!r}]")
        self.optimizer.load_state_dict(sd)
        self.mode, self.l1, self.l2 = mode, l1, l2
        self._fill_defaults()
        self._signature = self._quick = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- the cached plan --------------------------------------------------------
    def _specs(self) -> List[_GroupSpec]:
        """Validated settings of every group."""
        return [group_spec(group, self, f"param_groups[{gi}]") for gi, group in enumerate(self.param_groups)]

    def _plan(self) -> _Plan:
        """The cached plan, rebuilt when the groups changed (cheap check).

        First a quick signature of every group's settings and parameters
        (:func:`_group_key`: numbers by value, tensors by identity and
        version): unchanged, the plan is used as is, with nothing validated
        again. Otherwise every group's settings are validated (a bad value
        raises here, before anything changed) and the plan is rebuilt, or only
        its coefficient values rewritten when the buckets stay the same."""
        groups = self.param_groups
        quick = tuple(map(_group_key, groups))
        if self._plan_cache is not None and quick == self._quick:
            return self._plan_cache
        self._quick = None
        specs = self._specs()
        # Coefficient values are not part of the signature, only which groups
        # use which regularizers: new values are written into the plan's
        # coefficient tensors in place (no recompilation under torch.compile).
        sig = (tuple(spec.shape() for spec in specs),
               tuple(tuple((id(p), p.dtype, p.device) for p in g["params"]) for g in groups))
        if self._plan_cache is None or sig != self._signature:
            self._plan_cache = _Plan(groups, specs)
            self._signature = sig
        elif [sp.values() for sp in specs] != [sp.values() for sp in self._plan_cache.specs]:
            self._plan_cache.set_values(specs)
        self._quick = quick
        return self._plan_cache

    def _lrs(self) -> list:
        """Per-group lrs (the groups' current lr), validated; re-validated only
        when one changed (cheap signature, :func:`_key`). Under torch.compile
        they are checked without the signature: it reads a CPU tensor lr's
        value, which would become a guard (a recompilation at every change)."""
        if torch.compiler.is_compiling():
            return self._check_lrs()
        key = tuple(_key(g.get("lr")) for g in self.param_groups)
        hit = self._lr_values
        if hit is not None and hit[0] == key:
            return hit[1]
        lrs = self._check_lrs()
        self._lr_values = (key, lrs)
        return lrs

    def _check_lrs(self) -> list:
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
    def _inner_step(self, closure: Optional[Callable[[], Any]]):
        """The inner optimizer's step, with its own step hooks but not the global
        ones (``register_optimizer_step_pre_hook`` / ``_post_hook``): those run
        once, around this wrapper's step, as for any optimizer."""
        inner = self.optimizer
        step = type(inner).step
        raw = getattr(step, "__wrapped__", None)
        if raw is None or not getattr(step, "hooked", False):  # not torch's hooked step
            return inner.step() if closure is None else inner.step(closure)
        args: tuple = (inner,) if closure is None else (inner, closure)
        kwargs: Dict[str, Any] = {}
        for hook in list(inner._optimizer_step_pre_hooks.values()):
            result = hook(inner, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{raw} must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result}.")
                args, kwargs = result
        out = raw(*args, **kwargs)
        inner._optimizer_step_code()
        for hook in list(inner._optimizer_step_post_hooks.values()):
            hook(inner, args, kwargs)
        return out

    def _add_penalty_grads(self, work: List[_Work]) -> None:
        self._penalty = add_penalty_grads([w for w in work if w.kind != "max_norm"])

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
        plan = _plan_outside_graph(self) if torch.compiler.is_compiling() else self._plan()
        self._last, self._penalty = [], None
        if self.mode == "gradient":
            if closure is None:
                work = [w for w in map(_Bucket.active, plan.buckets) if w is not None]
                self._add_penalty_grads(work)
                loss = self._inner_step(None)
            else:
                work = []

                def closure_with_penalty():
                    loss = closure()
                    work[:] = [w for w in map(_Bucket.active, plan.buckets) if w is not None]
                    self._add_penalty_grads(work)
                    return loss

                loss = self._inner_step(closure_with_penalty)
            max_norm_buckets([w for w in work if w.kind == "max_norm"])
            return loss

        # The lrs on each device before the inner step: a bad lr (or one that
        # cannot be copied during graph capture) raises before anything changed.
        lrs = self._lrs()
        group_lrs = {dev: plan.group_lrs(lrs, dev) for dev in plan.devices}
        loss = self._inner_step(closure)
        work = [w for w in map(_Bucket.active, plan.buckets) if w is not None]
        prox_buckets([(w, plan.work_lr(w, lrs, group_lrs)) for w in work if w.kind != "max_norm"])
        max_norm_buckets([w for w in work if w.kind == "max_norm"])
        self._last = [w for w in work if w.kind != "max_norm"]
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
            self._penalty = penalty_of(self._last)
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
def prox_buckets(buckets: Sequence[Tuple[_Work, Tensor]]) -> None:
    """The proximal step of each bucket ``(work, lr)`` (lr: one float64 per
    tensor on the params' device), in place: element-wise L1/L2 (``prox_``,
    toward the refs in a "ref" bucket), or the exact sparse-group-lasso prox
    with L2 (``group_prox_``) in a "group" bucket."""
    eager = not torch.compiler.is_compiling()
    be = _direct_backend() if eager else None
    for w, lr in buckets:
        c = partial(w.coef, eager=eager)
        d = w.bucket.direct() if be is not None and w.params is w.bucket.params else None
        if d is not None:  # the checks were made: straight to the kernels
            be.prox_ptrs(d[0], d[1], d[2], c("l1"), c("l2"), lr, d[3])
            torch.autograd.graph.increment_version(w.params)
        elif w.kind == "group":
            ops.group_prox_(w.params, c("group_l1"), lr, w.dims, element_l1=c("l1"), l2=c("l2"))
        else:
            ops.prox_(w.params, c("l1"), c("l2"), lr, ref=w.refs)


def _direct_backend():
    """The cpu backend when a step may call it directly (plain eager mode,
    no dispatch mode, no other backend forced), else None."""
    return None if _get_current_dispatch_mode() is not None else backends.eager_cpu()


def max_norm_buckets(buckets: Sequence[_Work]) -> None:
    """The max-norm projection of each "max_norm" bucket, in place."""
    eager = not torch.compiler.is_compiling()
    for w in buckets:
        ops.max_norm_(w.params, w.coef("max_norm", eager), w.dims)


def add_penalty_grads(buckets: Sequence[_Work]) -> Tensor:
    """Adds the gradient of each bucket's penalty to its params' grads
    (``l1 * sign(d) + 2 * l2 * d`` with d = w, or w - ref in a "ref" bucket;
    plus ``group_l1 * w_g / ||w_g||`` in a "group" bucket); returns the total
    penalty of the params (0-dim). With several buckets, every bucket's grads
    are checked before the first one is written, so a bad grad changes nothing."""
    grads = [[p.grad for p in w.params] for w in buckets]
    eager = not torch.compiler.is_compiling()
    be = _direct_backend() if eager else None
    # Buckets whose params and grads pass the direct path's checks (see
    # _direct_grads) go straight to the kernels; the others through the op.
    direct = [_direct_grads(w, gs) if be is not None else None for w, gs in zip(buckets, grads)]
    if len(buckets) > 1 and eager:
        for w, gs, d in zip(buckets, grads, direct):
            if d is None:
                check_grads_apart(w.params, tensor_list(gs, "grads"))
    total = None
    for w, gs, d in zip(buckets, grads, direct):
        c = partial(w.coef, eager=eager)
        if d is not None:
            b, gptrs = d
            value = torch.empty((), dtype=torch.float64 if w.params[0].dtype is torch.float64 else torch.float32)
            be.add_penalty_grad_ptrs(b[0], b[1], b[2], gptrs, c("l1"), c("l2"), value)
            torch.autograd.graph.increment_version(gs)
        else:
            value = ops.add_penalty_grad_(w.params, gs, c("l1"), c("l2"), ref=w.refs)
        if w.kind == "group":
            value = _sum(value, ops.add_group_penalty_grad_(w.params, gs, c("group_l1"), w.dims))
        total = value if total is None else _sum(total, value)
    return total if total is not None else torch.zeros(())


def _direct_grads(w: _Work, gs: List[Optional[Tensor]]) -> Optional[Tuple[list, List[int]]]:
    """(the bucket's ``direct()`` arguments, the grads' pointers) when the
    kernels may take this bucket and these grads directly: the whole bucket,
    and grads that are plain contiguous CPU tensors of the params' dtype and
    sizes, not inference tensors, sharing no memory with each other or with
    any param. Else None (the op then checks, and explains)."""
    if w.params is not w.bucket.params:
        return None
    b = w.bucket.direct()
    if (b is None or not plain_cpu(gs) or gs[0].dtype is not w.params[0].dtype
            or list(map(Tensor.numel, gs)) != b[1] or any(map(Tensor.is_inference, gs))):
        return None
    gptrs = list(map(Tensor.data_ptr, gs))
    if gptrs != b[4]:  # grads elsewhere than the last checked ones: check again
        ptrs = disjoint_pointers(gs + w.params)
        if ptrs is None:
            return None
        b[4] = gptrs
    return b, gptrs


def penalty_of(buckets: Sequence[_Work]) -> Tensor:
    """The total penalty of the buckets' params as they are now (0-dim)."""
    total = None
    for w in buckets:
        c = w.coefs
        ps = [p.detach() for p in w.params]
        value = ops.penalty(ps, c["l1"], c["l2"], ref=w.refs)
        if w.kind == "group":
            value = _sum(value, ops.group_penalty(ps, c["group_l1"], w.dims))
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
                 overrides: Optional[Dict[str, Dict[str, Any]]] = None,
                 ref: Union[None, nn.Module, Dict[str, Tensor]] = None) -> List[Dict[str, Any]]:
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

    Overrides may also set the structured regularizers of
    :class:`Regularized`: ``group_l1`` and ``group_dim`` (group lasso),
    ``max_norm`` and ``max_norm_dim`` (max-norm constraint), e.g.
    ``overrides={"fc1": {"group_l1": 1e-3, "group_dim": 1}}`` for group lasso
    on the first layer's input columns only. These apply to the matching
    parameters that are not excluded (so ``"fc1"`` sets them on ``fc1.weight``,
    not on ``fc1.bias``).

    ``ref``: reference weights (a model, or a state dict such as the
    pre-trained one) to regularize toward (L1-SP / L2-SP): every group gets a
    ``"ref"`` list with, per parameter, a copy of the reference tensor of the
    same name (moved to the parameter's device and dtype), or None where the
    reference has no tensor of that name and shape (new layers, a replaced
    head): those get plain L1/L2. The copies are the one extra copy of the
    weights that regularizing toward a reference needs.

    Parameters with equal options share a group, excluded ones apart from the
    others even when the options are equal (``l1 = l2 = 0``): the groups are
    the same whatever the coefficient values, so a checkpoint of a run with
    one set of values loads into an optimizer built with another. Each group is
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
        for key in _COEF_KEYS + ("group_l1",):
            if key in opts:
                nonneg_real(opts[key], f"overrides[{pattern!r}][{key!r}]")
        if opts.get("max_norm") is not None:
            nonneg_real(opts["max_norm"], f"overrides[{pattern!r}]['max_norm']")
        if "ref" in opts:
            raise ValueError(f"overrides[{pattern!r}] may not set 'ref'; pass ref= to param_groups")
    if ref is not None:
        if isinstance(ref, nn.Module):
            ref = dict(ref.state_dict())
        elif not isinstance(ref, dict):
            raise TypeError(f"ref must be an nn.Module or a state dict, got {type(ref).__name__}")
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
                    opts.update({k: v for k, v in extra.items() if not (excluded and k in _STRUCTURED_KEYS)})
                    used.add(pattern)
            # The groups depend on which parameters are excluded, not on the
            # coefficient values: l1 = l2 = 0 gives the same groups as any other.
            for group in groups:
                if group["_opts"] == opts and group["_excluded"] == excluded:
                    break
            else:
                group = {"_opts": opts, "_excluded": excluded, "params": [], "param_names": []}
                groups.append(group)
            group["params"].append(param)
            group["param_names"].append(name)
    unused = [p for p in overrides if p not in used]
    if unused:
        raise ValueError(f"overrides pattern(s) {unused} match no trainable parameter of the model")
    out = []
    for group in groups:
        opts = group.pop("_opts")
        group.pop("_excluded")
        out.append({"params": group["params"], "param_names": group["param_names"], **opts})
        if ref is not None:
            out[-1]["ref"] = [_ref_copy(ref, name, p) for name, p in zip(group["param_names"], group["params"])]
    return out


def _ref_copy(ref: Dict[str, Any], name: str, param: Tensor) -> Optional[Tensor]:
    """A copy of ``ref[name]`` like ``param`` (device, dtype), or None when the
    reference has no tensor of that name and shape."""
    r = ref.get(name)
    if not isinstance(r, Tensor) or r.shape != param.shape:
        return None
    return r.detach().to(device=param.device, dtype=param.dtype, copy=True)
