"""``pyreg.optim.SGD``: torch's SGD with L1 / L2 proximal steps, fused."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ..backends import torch_ref as spec
from ._base import FusedOptimizer, hyper_number


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

    _algo = spec.SGD

    def _hyper(self, group: Dict[str, Any]):
        row = [hyper_number(group["lr"]), 0.0, 0.0, 0.0, float(group["weight_decay"]), float(group["momentum"]),
               float(group["dampening"]), 0.0, 0.0]
        momentum = group["momentum"] != 0
        return row, False, False, bool(group.get("nesterov", False)) and momentum, momentum

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        pass  # the momentum buffer starts at the first step (see _buffers)
