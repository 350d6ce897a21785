"""The plan of a step: the regularized parameters of an optimizer's groups
in buckets, one per (kind of regularization, device, dtype), each with its
per-tensor coefficients on the device. Built from the groups' checked
settings (keys.py) and cached by the engine (engine.py) until the groups
change; the apply functions (apply.py) run the ops on it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._common import SUPPORTED_DTYPES, has_dtensor, to_device
from .._validate import first_overlap, overlap_between
from ..backends._marshal import group_shapes, plain_list
from .keys import GroupSettings, check_params

_KINDS = ("elem", "ref", "group", "target", "strength", "gstrength", "l2_bound", "max_norm")
#: The coefficients each kind of bucket holds, as per-tensor float64 tensors.
_KIND_COEFS = {"elem": ("l1", "l2"), "ref": ("l1", "l2"), "group": ("l1", "l2", "group_l1"),
               "target": ("l2", "target_sparsity"), "strength": ("l2", "l1_strength", "l1_refresh"),
               "gstrength": ("l1", "l2", "group_strength", "l1_refresh"),
               "l2_bound": ("l2_bound", "l2_warmup", "l2_mu"), "max_norm": ("max_norm",)}


class Bucket:
    """Parameters of one (device, dtype) and kind, with their per-tensor
    coefficients (float64 tensors on the device), group dimensions and refs."""

    def __init__(self, kind: str, params: List[Tensor], groups: List[int], index: List[int],
                 values: Dict[str, List[float]], dims: Optional[List[int]], refs: Optional[List[Tensor]]):
        self.kind, self.params, self.groups, self.index = kind, params, groups, index
        self.dims, self.refs = dims, refs
        dev = self.device = params[0].device
        self.values = values
        self.coefs = {k: to_device(v, torch.float64, dev) for k, v in values.items()}
        self.scalars = _scalars(values)
        self.group_index = to_device(groups, torch.int64, dev)  # selects each tensor's group lr
        self.one_group = groups[0] if groups.count(groups[0]) == len(groups) else None
        self._subsets: Dict[Tuple[bool, ...], Tuple[List[int], Tensor]] = {}
        self._direct: Optional[list] = None  # see direct()
        self._group_shapes: Optional[tuple] = None  # see group_direct()
        self.own_state: Optional[tuple] = None  # a "target", "(g)strength" or "l2_bound" bucket's state (apply.py)
        self.steps_taken: Optional[List[int]] = None  # a "strength" bucket's steps of each param (apply.strength_due)
        # its l1_refresh values, and the (l1_refresh, shift) of each tensor or one for all (apply.strength_due)
        self.refresh_at: Tuple[Optional[list], Union[List[Tuple[int, int]], Tuple[int, int]]] = (None, [])
        self.target_ks: Optional[tuple] = None  # a "target" bucket's zeros per tensor, cached (apply.target_prox)

    def direct(self) -> Optional[list]:
        """For a plain eager step on the CPU: ``[pointers, numels, dtype codes,
        nnz scratch, grad pointers]`` of this bucket's params (the last: of
        grads last found apart from each other and from the params, see
        ``_direct_grads``), for calling the kernels with no per-call list
        checks, or None (then the ops run, with their checks).

        Only an "elem", "strength", "target" or "l2_bound" bucket of plain, contiguous, non-inference CPU tensors,
        pairwise disjoint in memory; checked when first asked and again
        whenever a parameter's data pointer or size changed. The plan's
        signature covers the rest (each parameter's identity, dtype, device)."""
        if self.kind not in ("elem", "strength", "target", "l2_bound") or self.device.type != "cpu":
            return None
        return self._described()

    def group_direct(self) -> Optional[Tuple[list, Tuple[List[int], List[int], List[int]]]]:
        """:meth:`direct` for a "group" or "gstrength" bucket, with the group
        shapes of its params as pyreg._C takes them (``(outer, groups,
        inner)``, see ``_marshal.group_shapes``; kept while the description
        is: the plan is made again where a shape changes), or None."""
        if self.kind not in ("group", "gstrength") or self.device.type != "cpu":
            return None
        d = self._described()
        if d is None:
            return None
        shapes = self._group_shapes
        if shapes is None or shapes[0] is not d:
            shapes = self._group_shapes = (d, group_shapes(self.params, self.dims))
        return d, shapes[1]

    def _described(self) -> Optional[list]:
        """The cached description of :meth:`direct` (checked again where a
        pointer or size changed)."""
        ps = self.params
        d = self._direct
        ptrs = list(map(Tensor.data_ptr, ps))
        if (d is not None and ptrs == d[0] and all(map(Tensor.is_contiguous, ps))
                and list(map(Tensor.numel, ps)) == d[1]):
            return d
        # (inference tensors refused in inference mode too: the description outlives the step)
        desc = None if any(map(Tensor.is_inference, ps)) else plain_list(list(ps), True)
        if desc is None:
            self._direct = None
            return None
        self._direct = d = [*desc, torch.empty(len(ps), dtype=torch.int64), None]
        return d

    def set_values(self, values: Dict[str, List[float]]) -> None:
        """New coefficient values, written into the same tensors: a compiled step
        (or a CUDA graph) reads them as inputs, so a change recompiles nothing."""
        for k, new in values.items():
            if new != self.values[k]:
                self.coefs[k].copy_(to_device(new, torch.float64, self.device))
        self.values = values
        self.scalars = _scalars(values)

    def active(self) -> Optional["Work"]:
        """The bucket restricted to params with a grad (None if there are none),
        with each tensor's group index as a device tensor."""
        mask = tuple(p.grad is not None for p in self.params)
        if all(mask):
            return Work(self.kind, self.params, self.group_index, self.coefs, self.dims, self.refs, self)
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
        return Work(self.kind, pick(self.params), self.group_index.index_select(0, sel),
                     {k: c.index_select(0, sel) for k, c in self.coefs.items()}, pick(self.dims),
                     pick(self.refs), self)


def _scalars(values: Dict[str, List[Optional[float]]]) -> Dict[str, Optional[float]]:
    """Per coefficient, its one value when every tensor of the bucket has the
    same (the ops then take it as a number: no tensor to read), else None."""
    return {k: (v[0] if v and v[0] is not None and v.count(v[0]) == len(v) else None)
            for k, v in values.items()}


class Work(NamedTuple):
    """What a step does to one bucket: its params (with a grad), their group
    indices, per-tensor coefficients, group dimensions and refs."""

    kind: str
    params: List[Tensor]
    groups: Tensor
    coefs: Dict[str, Tensor]
    dims: Optional[List[int]]
    refs: Optional[List[Tensor]]
    bucket: "Bucket"

    def coef(self, name: str, eager: bool) -> Union[float, Tensor]:
        """Coefficient ``name`` as the ops take it: in eager mode the one value
        when every tensor has the same, else (and under torch.compile, where
        coefficients are graph inputs) the per-tensor tensor."""
        v = self.bucket.scalars[name] if eager else None
        return self.coefs[name] if v is None else v


class Plan:
    """What a step needs, derived from the param groups and cached on them."""

    def __init__(self, groups: List[Dict[str, Any]], specs: List[GroupSettings], first: int = 0):
        """``first``: the index of ``groups[0]`` in the optimizer (in messages
        and the buckets' group indices: a trial plan of a group being added)."""
        seen = set()
        reg: Dict[tuple, Tuple[list, list, Dict[str, list], list, list, list]] = OrderedDict()
        every: Dict[Tuple[torch.device, torch.dtype, Any], Tuple[list, list]] = OrderedDict()
        reg_names: Dict[int, str] = {}
        self.names: List[str] = []
        position = 0
        for gi, (group, spec) in enumerate(zip(groups, specs), first):
            names = group.get("param_names")
            params = group["params"]
            where = f"param_groups[{gi}]"
            gdims, mdims = check_params(spec, params, where)
            for j, p in enumerate(params):
                name = names[j] if names is not None and j < len(names) else f"param_groups.{gi}.{j}"
                if id(p) in seen:
                    raise ValueError(f"{where} holds a parameter ({name!r}) that appears "
                                     "earlier in the optimizer; each parameter must appear once")
                seen.add(id(p))
                self.names.append(name)
                # (a DTensor's mesh too: one pyreg call takes the DTensors of one mesh)
                key = (p.device, p.dtype, getattr(p, "device_mesh", None))
                e = every.setdefault(key, ([], []))
                e[0].append(p)
                e[1].append(position)
                position += 1
                ref = spec.ref[j] if spec.ref is not None else None
                kinds = list(spec.kinds(j))
                if not kinds:
                    continue  # nothing to do for this tensor: leave it out of the ops
                if p.dtype not in SUPPORTED_DTYPES or p.layout != torch.strided:
                    raise TypeError(f"{where} parameter {name!r} is {p.dtype} "
                                    f"({p.layout}); pyreg regularizes dense float32, float64, "
                                    "float16 and bfloat16 tensors")
                if p.is_meta:
                    raise ValueError(f"{where} parameter {name!r} is a meta tensor: "
                                     "it has no data to regularize")
                if (kinds != ["elem"] or spec.preconditioned) and has_dtensor([p]):
                    raise TypeError(f"{where} parameter {name!r} is a DTensor (sharded): group_l1, "
                                    "ref, l2_bound, max_norm, target_sparsity, l1_strength and group_strength "
                                    "need the full tensor, and preconditioned the fused kernels (a DTensor "
                                    "takes torch's step); use l1/l2 on sharded parameters")
                vals = _values_of(spec, j)
                for kind in kinds:
                    # (a "target" bucket has one metric: its prox reads the optimizer's step sizes where
                    # its groups set preconditioned)
                    b = reg.setdefault((kind, *key, kind == "target" and spec.preconditioned),
                                       ([], [], {}, [], [], []))
                    b[0].append(p), b[1].append(gi), b[5].append(j)
                    for k in _KIND_COEFS[kind]:
                        b[2].setdefault(k, []).append(vals[k])
                    b[3].append(gdims[j] if kind in ("group", "gstrength") else mdims[j] if kind == "max_norm" else None)
                    b[4].append(ref)
                reg_names[id(p)] = name
        # The ops write the params after the inner step: reject shared memory
        # now, before any step, rather than half-way through one.
        self._reg_params = list({id(p): p for b in reg.values() for p in b[0]}.values())
        self._reg_names = [reg_names[id(p)] for p in self._reg_params]
        # A reference is read while every parameter is written: none may share memory with one.
        self._refs = [(r, f"param_groups[{gi}]['ref'][{j}]") for gi, (group, spec) in enumerate(zip(groups, specs), first)
                      if spec.ref is not None for j, r in enumerate(spec.ref) if r is not None]
        self._all_params = (list(zip([p for g in groups for p in g["params"]], self.names))  # (self.names: in order)
                            if self._refs else [])
        self._memory: Optional[list] = None
        self._sharded = has_dtensor(self._reg_params)  # (the same parameter objects while the plan lasts)
        if not torch.compiler.is_compiling():
            self.check_memory()
        order = {k: i for i, k in enumerate(_KINDS)}
        self.buckets = [Bucket(kind, ps, gs, idx, vals, dims if kind in ("group", "gstrength", "max_norm") else None,
                               refs if kind == "ref" else None)
                        for (kind, *_), (ps, gs, vals, dims, refs, idx)
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


    def check_memory(self) -> None:
        """Raise if two regularized parameters share memory (or one overlaps
        itself): the ops write each in place. Checked when the plan is made
        and again, before a step changes anything, whenever a parameter's
        memory moved since (``.data`` replaced: two may have come to share
        it); the data pointers are compared at C speed."""
        ps = self._reg_params
        if not ps or self._sharded:  # (a DTensor's shards: FSDP2 moves them; checked when made)
            if self._memory is None:
                self._memory = []
                self._raise_overlap(first_overlap(ps))
            return
        ptrs = list(map(Tensor.data_ptr, ps))
        if self._refs:
            ptrs += [r.data_ptr() for r, _ in self._refs] + [p.data_ptr() for p, _ in self._all_params]
        if ptrs == self._memory:
            return
        self._raise_overlap(first_overlap(ps))
        if self._refs:
            bad = overlap_between([p for p, _ in self._all_params], [r for r, _ in self._refs])
            if bad is not None:
                raise ValueError(f"{self._refs[bad[1]][1]} shares memory with parameter "
                                 f"{self._all_params[bad[0]][1]!r}; the step writes the parameters while it "
                                 "reads the references (pass a copy: p.detach().clone())")
        self._memory = ptrs

    @staticmethod
    def check_apart_all(plans: Sequence["Plan"], other: "Plan") -> None:
        """Raise if a regularized parameter of ``other`` (a group being added)
        shares memory with one of ``plans``' (the optimizer's groups)."""
        if not other._reg_params or other._sharded or any(p._sharded for p in plans):
            return
        ps = [q for p in plans for q in p._reg_params]
        if ps:
            names = [n for p in plans for n in p._reg_names]
            other._raise_overlap(first_overlap(ps + other._reg_params), names + other._reg_names)

    def _raise_overlap(self, bad: Optional[Tuple[int, int]], names: Optional[List[str]] = None) -> None:
        if bad is None:
            return
        na, nb = ((names or self._reg_names)[i] for i in bad)
        raise ValueError(f"parameter {na!r} overlaps itself in memory (an expanded view?)"
                         if bad[0] == bad[1] else
                         f"parameters {na!r} and {nb!r} share memory; "
                         "pyreg updates each regularized parameter in place, so they must be distinct")
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

    def work_lr(self, w: "Work", lrs: list, group_lrs: Dict[torch.device, Tensor]) -> Union[float, Tensor]:
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

    def set_values(self, specs: List[GroupSettings]) -> None:
        """New coefficient values with the same shape (so the same buckets)."""
        for b in self.buckets:
            b.set_values({k: [_values_of(specs[g], j)[k] for g, j in zip(b.groups, b.index)]
                          for k in _KIND_COEFS[b.kind]})
        self.specs = specs


def _values_of(spec: GroupSettings, j: int) -> Dict[str, Optional[float]]:
    """Parameter j's coefficients, by name."""
    return {"l1": spec.l1[j], "l2": spec.l2[j], "group_l1": spec.group_l1[j],
            "max_norm": None if spec.max_norm is None else spec.max_norm[j],
            "l2_bound": None if spec.l2_bound is None else spec.l2_bound[j],
            "l2_warmup": float(spec.l2_warmup), "l2_mu": spec.l2_mu[j] if spec.l2_mu else 1.0,
            "target_sparsity": None if spec.target is None else spec.target[j],
            "l1_strength": None if spec.strength is None else spec.strength[j], "l1_refresh": float(spec.refresh),
            "group_strength": None if spec.gstrength is None else spec.gstrength[j]}
