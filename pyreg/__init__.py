"""pyreg: fused L1 / L2 / elastic-net regularization for PyTorch.

Ops (each covers a whole list of tensors, i.e. all layers, in one call):
``weight_stats``, ``penalty``, ``add_penalty_grad_``, ``prox_``.
Convention helpers: ``from_sklearn``, ``from_weight_decay``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._common import WeightStats
from .backends import backend_name, use_backend
from .ops import add_penalty_grad_, penalty, prox_, weight_stats
from .conventions import from_sklearn, from_weight_decay
from .optim import Regularized, param_groups

__all__ = [
    "Regularized",
    "WeightStats",
    "add_penalty_grad_",
    "backend_name",
    "from_sklearn",
    "from_weight_decay",
    "param_groups",
    "penalty",
    "prox_",
    "use_backend",
    "weight_stats",
]
