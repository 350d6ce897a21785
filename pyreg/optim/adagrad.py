"""``pyreg.optim.Adagrad``: torch's Adagrad with L1 / L2 proximal steps
(optionally in Adagrad's own metric: proximal Adagrad), fused."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ..backends import torch_ref as spec
from ._base import FusedOptimizer, hyper_number, scalar_dtype


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

    _algo = spec.ADAGRAD

    def _hyper(self, group: Dict[str, Any]):
        row = [hyper_number(group["lr"]), 0.0, 0.0, float(group["eps"]), float(group["weight_decay"]), 0.0, 0.0,
               float(group["lr_decay"]), 0.0]
        return row, False, False, False, False

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["sum"] = torch.full_like(p, group.get("initial_accumulator_value", 0.0),
                                       memory_format=torch.preserve_format)
