"""``pyreg.optim.Adam`` and ``pyreg.optim.AdamW``: torch's Adam and AdamW with
L1 / L2 proximal steps (optionally in Adam's own metric), fused."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional as F
from .fused import Params, Flags, FusedOptimizer, hyper_number, scalar_dtype, wide


def step_counter(p: Tensor, s: Dict[str, Any]) -> Tensor:
    """p's step counter on p's device, as float32/64 (fixes up a loaded state
    dict's CPU step of a GPU param)."""
    step = s["step"]
    if step.device != p.device or step.dtype not in (torch.float32, torch.float64):
        step = s["step"] = step.to(device=p.device, dtype=torch.float32)
    return step


class _AdamBase(FusedOptimizer):
    _algo = F.ADAM
    _decoupled = False

    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": hyper_number(group["lr"]), "beta1": hyper_number(beta1), "beta2": hyper_number(beta2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _flags(self, group: Dict[str, Any]) -> Flags:
        return Flags(decoupled=self._decoupled or bool(group.get("decoupled_weight_decay", False)),
                     amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group.get("maximize", False)))

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _buffers(self, p, s, group, run):
        vmax = None
        if group.get("amsgrad", False):
            vmax = s.get("max_exp_avg_sq")
            if vmax is None:
                vmax = s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return s["exp_avg"], s["exp_avg_sq"], vmax, step_counter(p, s), 0

    def _push_needs_before(self, group):
        """A coupled decay is in m_hat already; a decoupled one adds
        ``weight_decay * w`` (w before the step) to the step over lr."""
        return bool(group["weight_decay"]) and self._flags(group).decoupled

    def _metric_terms(self, items):
        """sqrt(v_hat) + eps = (sqrt(v) + eps * r) / r, r = sqrt(1 - beta2^t)
        (v: max_exp_avg_sq with amsgrad), as the push's terms write it."""
        vs, e, sc = [], [], []
        for _, s, group in items:
            beta2, step = group["betas"][1], s["step"]
            r = (math.sqrt(1 - beta2 ** float(step)) if step.device.type == "cpu"
                 else (1 - beta2 ** step.to(torch.float64)).sqrt())
            e.append(group["eps"] * r)
            sc.append(1 / r)
            vs.append(s["max_exp_avg_sq"] if group.get("amsgrad", False) else s["exp_avg_sq"])
        return vs, e, sc, None

    def _push_terms(self, items):
        """(exp_avgs, the second moments or None in Adam's metric, e, s) for
        items that share one group with number betas and eps, float32/64
        state and CPU step counters; else None. Plain metric: m_hat / (sqrt(v_hat) + eps) =
        m / ((sqrt(v) + eps*r) * c1 / r), c1 = 1 - beta1^t, r = sqrt(1 - beta2^t);
        Adam's metric: m_hat = m / c1."""
        group = items[0][2] if items else None
        beta1, beta2 = group["betas"] if group is not None else (None, None)
        steps = [it[1]["step"] for it in items]
        if (group is None or not all(isinstance(x, (int, float)) for x in (beta1, beta2, group["eps"]))
                or (items[0][3] and any(it[4] is not None for it in items))  # (the metric's decay term: by hand)
                or not all(s.is_cpu for s in steps)
                or any(it[2] is not group or it[0].element_size() < 4 for it in items)):
            return None
        ts = list(map(float, steps))
        m = [it[1]["exp_avg"] for it in items]
        c1 = [1 - beta1 ** t for t in ts]
        if items[0][3]:  # the metric prox: m_hat
            return m, None, [0.0] * len(ts), c1
        r = [math.sqrt(1 - beta2 ** t) for t in ts]
        v = [it[1]["max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"] for it in items]
        return m, v, [group["eps"] * x for x in r], [a / x for a, x in zip(c1, r)]

    def _push_decay(self, items):
        """A decoupled decay's term in the plain metric: (the weights before
        the step, the group's weight_decay); None without one (or where not
        every item has its weights before the step)."""
        if not items or items[0][3] or not any(it[4] is not None for it in items):
            return None
        if any(it[4] is None or it[2] is not items[0][2] for it in items):
            return None
        return [it[4] for it in items], [float(items[0][2]["weight_decay"])] * len(items)

    def _pushes(self, items):
        """As :meth:`_push` for each item, in four multi-tensor ops where
        :meth:`_push_terms` applies (in the plain metric, a decoupled decay's
        term in two more)."""
        terms = self._push_terms(items)
        decay = self._push_decay(items) if terms is not None else None
        if terms is None or (decay is None and any(it[4] is not None for it in items)):
            return super()._pushes(items)
        m, v, e, s = terms
        one = s.count(s[0]) == len(s) and e.count(e[0]) == len(e)  # (one number each: the faster ops)
        if v is None:
            return torch._foreach_div(m, s[0] if one else s)
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, e[0] if one else e)
        torch._foreach_mul_(d, s[0] if one else s)
        out = torch._foreach_div(m, d)
        if decay is not None:  # (decayed_push: the term rounded, then added)
            torch._foreach_add_(out, torch._foreach_mul(decay[0], decay[1]))
        return out

    def _push(self, p, s, group, metric, before):
        beta1, beta2 = group["betas"]
        step = s["step"]
        # the bias corrections: numbers for a CPU counter (no sync), else on the device
        t = float(step) if step.device.type == "cpu" else step.to(torch.float64)
        m = wide(s["exp_avg"]) / (1 - beta1 ** t)  # m_hat
        v = s["max_exp_avg_sq"] if group.get("amsgrad", False) else s["exp_avg_sq"]
        if metric:  # the metric prox's step size is lr / (sqrt(v_hat) + eps): the push is m_hat
            if before is None:
                return m
            # (plus the decoupled decay's term of the step, over that step size)
            d = (wide(v) / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            return m.add_(d.mul_(wide(before)), alpha=group["weight_decay"])
        m.div_((wide(v) / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
        return m if before is None else m.add_(wide(before), alpha=group["weight_decay"])


_DOC = """:class:`torch.optim.{name}` (same arguments, state and state dict: ``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; betas, eps, weight_decay,
    amsgrad, maximize), plus keyword-only

    * ``l1``, ``l2`` (default 0; per param group as well): after each update,
      ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` (exact zeros);
    * ``preconditioned`` (default False; per param group as well): the prox
      in Adam's own metric instead: each element's lr is
      ``lr / (sqrt(v_hat) + eps)``, the step size Adam gives it, so the
      threshold is ``lr * l1 / (sqrt(v_hat) + eps)`` (proximal Adam).

    Each step is one fused pass per (device, dtype) bucket: param, grad and
    state are read once and written once; step counters live on the params'
    device (CUDA graphs can capture the step). With ``l1 = l2 = 0`` it
    computes what ``torch.optim.{name}`` computes.
    """


class Adam(_AdamBase, torch.optim.Adam):
    __doc__ = _DOC.format(name="Adam")

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False):
        super().__init__(params, **self._torch_args(locals()), l1=l1, l2=l2, preconditioned=preconditioned)


class AdamW(_AdamBase, torch.optim.AdamW):
    __doc__ = _DOC.format(name="AdamW")
    _decoupled = True

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False):
        super().__init__(params, **self._torch_args(locals()), l1=l1, l2=l2, preconditioned=preconditioned)
