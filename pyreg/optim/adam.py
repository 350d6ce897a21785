"""``pyreg.optim.Adam`` and ``pyreg.optim.AdamW``: torch's Adam and AdamW with
L1 / L2 proximal steps (optionally in Adam's own metric), fused."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ..backends import torch_ref as spec
from ._base import FusedOptimizer, hyper_number, scalar_dtype


class _AdamBase(FusedOptimizer):
    _algo = spec.ADAM

    def _hyper(self, group: Dict[str, Any]):
        beta1, beta2 = group["betas"]
        row = [hyper_number(group["lr"]), hyper_number(beta1), hyper_number(beta2), float(group["eps"]),
               float(group["weight_decay"]), 0.0, 0.0, 0.0, 0.0]
        decoupled = self._decoupled or bool(group.get("decoupled_weight_decay", False))
        return row, decoupled, bool(group.get("amsgrad", False)), False, False

    def _new_state(self, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


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


class AdamW(_AdamBase, torch.optim.AdamW):
    __doc__ = _DOC.format(name="AdamW")
    _decoupled = True
