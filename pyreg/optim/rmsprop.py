"""``pyreg.optim.RMSprop``: torch's RMSprop with L1 / L2 proximal steps
(optionally in RMSprop's own metric), fused."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from . import functional as F
from .adam import step_counter
from .fused import Params, Flags, FusedOptimizer, grad_push_terms, grad_with_decay, hyper_number, scalar_dtype, wide


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """:class:`torch.optim.RMSprop` (same arguments, state and state dict:
    ``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``; alpha, eps,
    weight_decay, momentum, centered, maximize), plus keyword-only

    * ``l1``, ``l2`` (default 0; per param group as well): after each update,
      ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` (exact zeros);
    * ``preconditioned`` (default False; per param group as well): the prox
      in RMSprop's own metric: each element's lr is ``lr / (sqrt(v) + eps)``
      (v the running average of squared grads, centered if ``centered``), the
      step size RMSprop gives it, so the threshold is
      ``lr * l1 / (sqrt(v) + eps)``.

    Each step is one fused pass per (device, dtype) bucket: param, grad and
    state are read once and written once. With ``l1 = l2 = 0`` it computes
    what ``torch.optim.RMSprop`` computes.
    """

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: Optional[bool] = None, maximize: bool = False, differentiable: bool = False, *,
                 l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False):
        super().__init__(params, **self._torch_args(locals()), l1=l1, l2=l2, preconditioned=preconditioned)


    _algo = F.RMSPROP

    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"lr": hyper_number(group["lr"]), "alpha": float(group["alpha"]), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "momentum": float(group["momentum"])}

    def _flags(self, group: Dict[str, Any]) -> Flags:
        return Flags(centered=bool(group.get("centered", False)), maximize=bool(group.get("maximize", False)))

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("centered", False):
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _buffers(self, p, s, group, run):
        buf = avg = None
        if group["momentum"] > 0:
            buf = s.get("momentum_buffer")
            if buf is None:
                buf = s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("centered", False):
            avg = s.get("grad_avg")
            if avg is None:
                avg = s["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return s["square_avg"], buf, avg, step_counter(p, s), 0

    def _metric_terms(self, items):
        """sqrt(square_avg) + eps (centered: sqrt(square_avg - grad_avg^2) +
        eps, the difference made here), as the kernel's step divides."""
        vs = []
        for _, s, group in items:
            sq = s["square_avg"]
            if group.get("centered", False):
                sq, avg = wide(sq), wide(s["grad_avg"])
                sq = sq - avg * avg
            vs.append(sq)
        return vs, [group["eps"] for _, _, group in items], None, None

    def _push_terms(self, items):
        """Without momentum, centering or weight decay: the push is the grad
        (RMSprop's metric) or grad / (sqrt(v) + eps), the terms ``(grads, v or
        None, eps, 1)`` (see :meth:`_push`: the same ops)."""
        group = items[0][2] if items else {}
        if group.get("weight_decay") or group.get("momentum", 0) > 0 or group.get("centered", False):
            return None
        return grad_push_terms(items, "square_avg")

    def _push(self, p, s, group, metric, before):
        sq = wide(s["square_avg"])
        if group.get("centered", False):
            sq = sq - wide(s["grad_avg"]).square()
        denom = sq.sqrt() + group["eps"]
        if group["momentum"] > 0:
            buf = wide(s["momentum_buffer"])
            return buf * denom if metric else buf
        g = grad_with_decay(p, group, before)
        return g if metric else g / denom
