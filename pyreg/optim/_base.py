"""What pyreg's fused optimizers (sgd.py, adam.py, adagrad.py) share.

Each is a subclass of its torch.optim class (so constructor arguments, param
groups, state dicts, hooks, schedulers and GradScaler work as on torch's) whose
``step`` runs pyreg's fused kernel: per (device, dtype, flags) bucket, one call
that reads param, grad and state once, applies the update and then the
proximal step of the group's ``l1``/``l2``, and writes them once
(``optim_step`` of the backends; the float64 spec is
``pyreg.backends.torch_ref.optim_step``).

The step in three parts:

1. per group, its hyperparameters as one row of numbers (validated when they
   change, cached otherwise) and its flags;
2. per parameter with a grad, its state (created as torch creates it) and its
   bucket; parameters the kernels do not take (sparse or complex grads,
   ``differentiable=True``, tensor subclasses such as DTensor) go to torch's
   own step instead, followed by ``pyreg.prox_``;
3. one kernel call per bucket (parameters whose grad or state is laid out
   unlike the parameter run through the spec instead, with the same result).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backends, ops
from .._common import SUPPORTED_DTYPES, to_device
from .._validate import nonneg_real
from ..backends import torch_ref as spec
from ..backends._marshal import is_dense

#: The keys pyreg adds to torch's param groups, with their defaults.
PYREG_KEYS = ("l1", "l2", "preconditioned")
_PLAIN_TYPES = (Tensor, nn.Parameter)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, got {value!r}")
    return value


def hyper_number(value: Any) -> Any:
    """A hyperparameter as a float, or a device tensor left as it is (read on
    the device, no host sync)."""
    if isinstance(value, Tensor):
        return value if value.device.type != "cpu" else float(value)
    return float(value)


class _Flags(NamedTuple):
    decoupled: bool
    amsgrad: bool
    maximize: bool
    nesterov: bool
    prox: int


class _Group(NamedTuple):
    """A param group's validated settings for one step."""

    row: List[Any]        # spec.HYPER order; a device tensor for a tensor lr/beta
    flags: _Flags
    momentum: bool        # SGD: keeps a momentum buffer
    l1: float
    l2: float
    structured: Any       # the group's _GroupSpec when it sets group_l1, ref or max_norm, else None
    gdims: Optional[List[int]]  # each parameter's group_dim (group_l1), max_norm_dim (max_norm)
    mdims: Optional[List[int]]


class _Bucket:
    """The parameters of one kernel call, with their grads, state and rows."""

    def __init__(self, backend, flags: _Flags, step_dtype: Optional[torch.dtype]):
        self.backend, self.flags, self.step_dtype = backend, flags, step_dtype
        self.params: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.s1: List[Tensor] = []
        self.s2: List[Tensor] = []
        self.s3: List[Tensor] = []
        self.steps: List[Tensor] = []
        self.group: List[int] = []
        self.fresh: List[int] = []
        self.rows: Dict[int, int] = {}  # optimizer group index -> row in this bucket's table


class FusedOptimizer:
    """Mixin that turns a torch.optim class into pyreg's fused version. A
    subclass sets ``_algo`` (spec.SGD / ADAM / ADAGRAD) and lists the torch
    class after this one in its bases."""

    _algo: int = -1
    _decoupled: bool = False  # AdamW
    # GradScaler hands grad_scale / found_inf to step() (see _amp_scalars).
    _step_supports_amp_scaling = True

    def __init__(self, params, *args, l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False,
                 **kwargs):
        self._pyreg_defaults = {"l1": nonneg_real(l1, "l1"), "l2": nonneg_real(l2, "l2"),
                                "preconditioned": _flag(preconditioned, "preconditioned")}
        self._group_cache: Dict[int, Tuple[tuple, _Group]] = {}
        self._hyper_cache: Dict[tuple, Tensor] = {}
        super().__init__(params, *args, **kwargs)
        self.defaults.update(self._pyreg_defaults)

    # -- param groups and state dicts -------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, with pyreg's keys (``l1``, ``l2``,
        ``preconditioned``) validated and defaulted. A parameter listed twice
        is an error (torch only warns): the fused step would update it twice."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        ps = param_group.get("params")
        if ps is not None:
            ps = param_group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            if len({id(p) for p in ps}) != len(ps):
                raise ValueError("a parameter group lists the same parameter twice; pyreg's fused "
                                 "optimizers update each parameter once per step, so list it once")
        defaults = self._pyreg_defaults
        where = f"param_groups[{len(getattr(self, 'param_groups', []))}]"
        for key in ("l1", "l2"):
            param_group[key] = nonneg_real(param_group.get(key, defaults[key]), f"{where}[{key!r}]")
        param_group["preconditioned"] = _flag(param_group.get("preconditioned", defaults["preconditioned"]),
                                              f"{where}['preconditioned']")
        super().add_param_group(param_group)  # type: ignore[misc]

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        d = self.defaults  # type: ignore[attr-defined]
        self._pyreg_defaults = {"l1": d.get("l1", 0.0), "l2": d.get("l2", 0.0),
                                "preconditioned": d.get("preconditioned", False)}
        self._fill_keys()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``; a state dict of torch's optimizer (without
        pyreg's keys) gets the constructor's ``l1``, ``l2``, ``preconditioned``."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._fill_keys()

    def _fill_keys(self) -> None:
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key in PYREG_KEYS:
                group.setdefault(key, self._pyreg_defaults[key])
        self._group_cache, self._hyper_cache = {}, {}

    # -- what each optimizer supplies ------------------------------------------------
    def _hyper(self, group: Dict[str, Any]) -> Tuple[List[Any], bool, bool, bool, bool]:
        """(row without l1/l2, decoupled, amsgrad, nesterov, momentum buffer)."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        """Creates the state torch's optimizer would create for p."""
        raise NotImplementedError

    # -- the step ------------------------------------------------------------------
    def _settings(self, gi: int, group: Dict[str, Any]) -> _Group:
        key = (tuple(map(id, group["params"])),
               tuple(_key(v) for k, v in group.items() if k not in ("params", "param_names")))
        hit = self._group_cache.get(gi)
        if hit is not None and hit[0] == key:
            return hit[1]
        where = f"param_groups[{gi}]"
        l1 = nonneg_real(group.get("l1", 0.0), f"{where}['l1']")
        l2 = nonneg_real(group.get("l2", 0.0), f"{where}['l2']")
        pre = _flag(group.get("preconditioned", False), f"{where}['preconditioned']")
        row, decoupled, amsgrad, nesterov, momentum = self._hyper(group)
        prox = spec.NO_PROX if l1 == 0.0 and l2 == 0.0 else spec.METRIC_PROX if pre else spec.PLAIN_PROX
        structured, gdims, mdims = _structured(group, l1, l2, where)
        if structured is not None and structured.group_l1 != 0.0:
            prox = spec.NO_PROX  # group_prox_ applies l1, group_l1 and l2 together after the update
        if structured is not None and pre and (structured.group_l1 != 0.0 or structured.ref is not None):
            raise ValueError(f"{where} sets preconditioned=True with group_l1 or ref: the prox in the "
                             "optimizer's metric is element-wise L1/L2 only")
        flags = _Flags(decoupled, amsgrad, bool(group.get("maximize", False)), nesterov, prox)
        settings = _Group(row + [l1, l2], flags, momentum, l1, l2, structured, gdims, mdims)
        self._group_cache[gi] = (key, settings)
        return settings

    def _torch_path(self, p: Tensor, g: Tensor, group: Dict[str, Any]) -> bool:
        """True for a parameter the fused kernels do not take."""
        return (type(p) not in _PLAIN_TYPES or g.layout is not torch.strided or p.dtype not in SUPPORTED_DTYPES
                or g.dtype != p.dtype or g.device != p.device or bool(group.get("differentiable")))

    def _gather(self):
        """(buckets, groups for torch's own step, structured passes after the update,
        every group's settings)."""
        settings = [self._settings(gi, g) for gi, g in enumerate(self.param_groups)]  # type: ignore[attr-defined]
        buckets: Dict[tuple, _Bucket] = {}
        torch_groups = []
        after: List[tuple] = []
        state = self.state  # type: ignore[attr-defined]
        for gi, (group, st) in enumerate(zip(self.param_groups, settings)):  # type: ignore[attr-defined]
            others = []
            sp = st.structured
            with_grad: List[int] = []
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if self._torch_path(p, g, group):
                    if sp is not None:
                        raise ValueError(f"param_groups[{gi}] sets group_l1, ref or max_norm, but some of its "
                                         "parameters need torch's own step (sparse or complex grads, "
                                         "differentiable=True or tensor subclasses)")
                    others.append(p)
                    continue
                with_grad.append(j)
                # As torch: no state entry for a parameter that has no state
                # (SGD without momentum), so the state dict has none either.
                s = state[p] if p in state else {}
                if not s:
                    self._new_state(p, s, group)
                bufs = self._buffers(p, s, group, st)
                if s and p not in state:
                    state[p] = s
                step = bufs[3]
                flags = st.flags
                if sp is not None and sp.ref is not None and sp.ref[j] is not None:
                    flags = flags._replace(prox=spec.NO_PROX)  # toward its ref, after the update
                # Which state buffers exist is part of the key: the kernels take
                # each buffer list for all of a bucket's parameters or for none
                # (SGD groups with and without momentum are separate buckets).
                key = (p.device, p.dtype, flags, None if step is None else step.dtype,
                       tuple(t is None for t in bufs[:3]))
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(backends.for_tensors([p]), flags, key[3])
                row = b.rows.setdefault(gi, len(b.rows))
                b.params.append(p)
                b.grads.append(g)
                for lst, t in zip((b.s1, b.s2, b.s3, b.steps), bufs[:4]):
                    if t is not None:
                        lst.append(t)
                b.group.append(row)
                b.fresh.append(bufs[4])
            if others:
                if st.flags.prox == spec.METRIC_PROX:
                    raise ValueError(f"param_groups[{gi}] has preconditioned=True, which the fused kernels "
                                     "apply, but some of its parameters need torch's own step (sparse or "
                                     "complex grads, differentiable=True or tensor subclasses)")
                if st.flags.prox != spec.NO_PROX and (any(p.is_complex() for p in others)
                                                      or group.get("differentiable")):
                    raise ValueError(f"param_groups[{gi}] sets l1/l2 on parameters that need torch's own "
                                     "step (complex parameters or differentiable=True): pyreg's prox "
                                     "takes real parameters outside autograd")
                torch_groups.append((group, others, st))
            if sp is not None and with_grad:
                after.append((group, st, with_grad))
        return list(buckets.values()), torch_groups, after, settings

    @staticmethod
    def _structured_pass(group: Dict[str, Any], st: _Group, idx: List[int]) -> None:
        """After the update, for the group's parameters with a grad: group lasso
        (``group_prox_`` with the group's l1 and l2 too), the prox toward each
        ``ref``, the max-norm projection; as :class:`Regularized` does."""
        sp, params, lr = st.structured, group["params"], group["lr"]
        if sp.group_l1 != 0.0:
            ops.group_prox_([params[j] for j in idx], sp.group_l1, lr, [st.gdims[j] for j in idx],
                            element_l1=st.l1, l2=st.l2)
        elif sp.ref is not None and not (st.l1 == 0.0 and st.l2 == 0.0):
            toward = [j for j in idx if sp.ref[j] is not None]
            if toward:
                ops.prox_([params[j] for j in toward], st.l1, st.l2, lr, ref=[sp.ref[j] for j in toward])
        if sp.max_norm is not None:
            ops.max_norm_([params[j] for j in idx], sp.max_norm, [st.mdims[j] for j in idx])

    def _buffers(self, p: Tensor, s: Dict[str, Any], group: Dict[str, Any], st: _Group):
        """(s1, s2, s3, step, fresh) of p for the kernels; fixes up state that a
        loaded state dict left elsewhere (a CPU step of a GPU param)."""
        algo = self._algo
        if algo == spec.SGD:
            if not st.momentum:
                return None, None, None, None, 0
            buf = s.get("momentum_buffer")
            if buf is None:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                return s["momentum_buffer"], None, None, None, 1
            return buf, None, None, None, 0
        step = s["step"]
        if step.device != p.device or step.dtype not in (torch.float32, torch.float64):
            step = s["step"] = step.to(device=p.device, dtype=torch.float32)
        if algo == spec.ADAM:
            vmax = None
            if st.flags.amsgrad:
                vmax = s.get("max_exp_avg_sq")
                if vmax is None:
                    vmax = s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return s["exp_avg"], s["exp_avg_sq"], vmax, step, 0
        return s["sum"], None, None, step, 0

    def _amp_skipped(self) -> bool:
        """Whether GradScaler skips this step (found_inf). Read on the host, so
        only asked when a group sets group_l1, ref or max_norm: their passes
        run after the fused kernel, which skips on the device by itself."""
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

    def _table(self, b: _Bucket, settings: List[_Group]) -> Tensor:
        """The bucket's hyperparameter table (float64, one row per group) on its
        device: the numbers cached while they stay the same (one asynchronous
        copy when they change), device tensors (a GPU tensor lr) written in on
        the device at each step; no host sync either way."""
        rows = [settings[gi].row for gi in b.rows]
        dev = b.params[0].device
        on_device = [(i, j, v) for i, r in enumerate(rows) for j, v in enumerate(r) if isinstance(v, Tensor)]
        numbers = tuple(tuple(0.0 if isinstance(v, Tensor) else v for v in r) for r in rows)
        key = (dev, numbers)
        t = self._hyper_cache.get(key)
        if t is None:
            if len(self._hyper_cache) > 16:
                self._hyper_cache.clear()
            t = self._hyper_cache[key] = to_device([v for r in numbers for v in r], torch.float64,
                                                   dev).reshape(len(rows), len(spec.HYPER))
        if on_device:
            t = t.clone()
            for i, j, v in on_device:
                t[i, j] = v.reshape(())
        return t

    def _run(self, b: _Bucket, settings: List[_Group]) -> None:
        f = b.flags
        dev = b.params[0].device
        hyper = self._table(b, settings)
        grad_scale, found_inf = self._amp_scalars(dev)
        lists = (b.params, b.grads, b.s1, b.s2, b.s3)
        dense = all(all(map(Tensor.is_contiguous, ts)) for ts in lists)
        if not dense:  # layouts the kernels cannot pair element for element: the spec
            if not all(_same_layout(ts) for ts in zip(*[x for x in lists if x])):
                be = spec
            else:
                be = b.backend
        else:
            be = b.backend
        be.optim_step(self._algo, b.params, b.grads, b.s1, b.s2, b.s3, b.steps, b.group, b.fresh, hyper,
                      decoupled=f.decoupled, amsgrad=f.amsgrad, maximize=f.maximize, nesterov=f.nesterov,
                      prox=f.prox, grad_scale=grad_scale, found_inf=found_inf)

    def _run_torch(self, torch_groups) -> None:
        """torch's own step on the parameters the kernels do not take, then the
        prox of their groups' l1/l2 (pyreg.prox_, with the group's lr)."""
        base = next(c for c in type(self).__mro__[1:]
                    if issubclass(c, torch.optim.Optimizer) and not issubclass(c, FusedOptimizer))
        raw = base.step
        if getattr(raw, "hooked", False):
            raw = raw.__wrapped__
        saved = self.param_groups  # type: ignore[attr-defined]
        try:
            self.param_groups = [dict(g, params=ps) for g, ps, _ in torch_groups]
            raw(self)
        finally:
            self.param_groups = saved
        with torch.no_grad():
            for group, ps, st in torch_groups:
                if st.flags.prox != spec.NO_PROX:
                    ops.prox_(ps, st.l1, st.l2, group["lr"])

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

    @torch.compiler.disable
    def _apply(self) -> None:
        """The update of every parameter with a grad. Under torch.compile it
        runs eagerly (a graph break): the kernels take raw pointers."""
        buckets, torch_groups, after, settings = self._gather()
        if torch_groups:
            self._run_torch(torch_groups)
        if buckets or after:
            with torch.no_grad():
                for b in buckets:
                    self._run(b, settings)
                if after and not self._amp_skipped():
                    for group, st, idx in after:
                        self._structured_pass(group, st, idx)


def _structured(group: Dict[str, Any], l1: float, l2: float, where: str):
    """The group's structured settings (Regularized's keys ``group_l1``,
    ``group_dim``, ``ref``, ``max_norm``, ``max_norm_dim``) validated against its
    parameters: (spec, group dims, max-norm dims), or (None, None, None) when it
    sets none of them."""
    if not any(group.get(k) is not None for k in ("group_l1", "ref", "max_norm")):
        return None, None, None
    from .regularized import check_group_params, group_spec
    sp = group_spec(group, _Defaults(l1, l2), where)
    if sp.group_l1 == 0.0 and sp.ref is None and sp.max_norm is None:
        return None, None, None
    gdims, mdims = check_group_params(sp, group["params"], where)
    return sp, gdims, mdims


class _Defaults(NamedTuple):
    l1: float
    l2: float


def _key(v: Any) -> Any:
    """A group value as the settings cache compares it: a tensor by identity
    and, on the CPU, value (a device tensor is read on the device each step)."""
    if isinstance(v, Tensor):
        return (id(v), float(v) if v.device.type == "cpu" and v.numel() == 1 else None)
    if isinstance(v, (tuple, list)):
        return tuple(map(_key, v))
    return v


def _same_layout(ts) -> bool:
    """True if the tensors (a param, its grad and state) share strides and are dense."""
    first = ts[0]
    return is_dense(first) and all(t.stride() == first.stride() for t in ts[1:])


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives step counters (float64 when that is the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
