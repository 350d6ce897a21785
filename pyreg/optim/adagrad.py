"""``pyreg.optim.Adagrad``: torch's Adagrad with L1 / L2 proximal steps
(optionally in Adagrad's own metric: proximal Adagrad), fused."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from . import functional as F
from .adam import step_counter
from .fused import Params, FusedOptimizer, grad_push_terms, grad_with_decay, hyper_number, scalar_dtype, wide


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """:class:`torch.optim.Adagrad` (same arguments, state and state dict:
    ``step``, ``sum``; lr_decay, weight_decay, initial_accumulator_value, eps,
    maximize), plus keyword-only

    * ``l1``, ``l2`` (default 0; per param group as well): after each update,
      ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` (exact zeros);
    * ``preconditioned`` (default False; per param group as well): the prox
      in Adagrad's own metric: each element's lr is ``clr / (sqrt(G) + eps)``
      (G the sum of squared grads, clr the decayed lr), so the threshold is
      ``clr * l1 / (sqrt(G) + eps)``. With ``eps=0`` this is TensorFlow's
      ``ProximalAdagrad`` (whose ``l2`` is twice pyreg's).

    Each step is one fused pass per (device, dtype) bucket: param, grad and
    sum are read once and written once. With ``l1 = l2 = 0`` it computes
    what ``torch.optim.Adagrad`` computes.
    """

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: Optional[bool] = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False):
        super().__init__(params, **self._torch_args(locals()), l1=l1, l2=l2, preconditioned=preconditioned)


    _algo = F.ADAGRAD

    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"lr": hyper_number(group["lr"]), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "lr_decay": float(group["lr_decay"])}

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["sum"] = torch.full_like(p, group.get("initial_accumulator_value", 0.0),
                                       memory_format=torch.preserve_format)

    def _buffers(self, p, s, group, run):
        return s["sum"], None, None, step_counter(p, s), 0

    def _metric_terms(self, items):
        """sqrt(sum) + eps, and the lr's decay, 1 + (t - 1) * lr_decay (the
        kernel's step size clr = lr / that)."""
        vs, eps = [s["sum"] for _, s, _ in items], [group["eps"] for _, _, group in items]
        if not any(group.get("lr_decay", 0) for _, _, group in items):
            return vs, eps, None, None
        div = [1 + (s["step"].to(torch.float64) - 1) * group.get("lr_decay", 0) for _, s, group in items]
        return vs, eps, None, torch.stack(div).to(items[0][0].device)

    def _push_terms(self, items):
        """Without weight decay or lr_decay: the push is the grad (Adagrad's
        metric) or grad / (sqrt(G) + eps), the terms ``(grads, G or None,
        eps, 1)`` (see :meth:`_push`: the same ops)."""
        group = items[0][2] if items else {}
        return None if group.get("weight_decay") or group.get("lr_decay") else grad_push_terms(items, "sum")

    def _push(self, p, s, group, metric, before):
        g = grad_with_decay(p, group, before)
        if metric:  # the metric prox's step size is clr / (sqrt(G) + eps): the push is the grad
            return g
        decay = 1 + (s["step"].to(torch.float64) - 1) * group["lr_decay"]  # lr / clr
        return g / decay / (wide(s["sum"]).sqrt() + group["eps"])
