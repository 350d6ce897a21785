"""``pyreg.optim.SGD``: torch's SGD with L1 / L2 proximal steps, fused."""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from . import functional as F
from .fused import Params, Flags, FusedOptimizer, grad_with_decay, hyper_number, wide


class SGD(FusedOptimizer, torch.optim.SGD):
    """:class:`torch.optim.SGD` (same arguments, state and state dict; momentum,
    dampening, nesterov, weight_decay, maximize), plus keyword-only

    * ``l1``, ``l2`` (default 0; per param group as well): after each update,
      ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)`` (exact zeros);
    * ``preconditioned`` (default False): accepted for symmetry with the
      adaptive optimizers; SGD's metric is its lr, so it changes nothing.

    Each step is one fused pass per (device, dtype) bucket: param, grad and
    momentum buffer are read once and written once. With ``l1 = l2 = 0`` it
    computes what ``torch.optim.SGD`` computes.
    """

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 l1: float = 0.0, l2: float = 0.0, preconditioned: bool = False):
        super().__init__(params, **self._torch_args(locals()), l1=l1, l2=l2, preconditioned=preconditioned)


    _algo = F.SGD

    def _hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"lr": hyper_number(group["lr"]), "weight_decay": float(group["weight_decay"]),
                "momentum": float(group["momentum"]), "dampening": float(group["dampening"])}

    def _flags(self, group: Dict[str, Any]) -> Flags:
        momentum = group["momentum"] != 0
        return Flags(maximize=bool(group.get("maximize", False)),
                     nesterov=bool(group.get("nesterov", False)) and momentum)

    def _extra(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"momentum": group["momentum"] != 0}

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        pass  # the momentum buffer starts at the first step (see _buffers)

    _fresh_keys = ("momentum_buffer",)

    def _buffers(self, p, s, group, run):
        if not run.extra["momentum"]:
            return None, None, None, None, 0
        buf = s.get("momentum_buffer")
        if buf is None:
            s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return s["momentum_buffer"], None, None, None, 1
        return buf, None, None, None, 0

    def _push(self, p, s, group, metric, before):  # SGD's metric is the plain one
        g = grad_with_decay(p, group, before)
        buf = s.get("momentum_buffer") if group["momentum"] != 0 else None
        if buf is None:
            return g
        return g + group["momentum"] * wide(buf) if group.get("nesterov", False) else wide(buf)
