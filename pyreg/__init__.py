"""pyreg: fused L1 / L2 / elastic-net regularization for PyTorch.

Ops (each covers a whole list of tensors, i.e. all layers, in one call):
``weight_stats``, ``penalty``, ``add_penalty_grad_``, ``prox_`` (element-wise,
optionally toward reference weights: ``ref=``), and the group ops
``group_norms``, ``group_penalty``, ``add_group_penalty_grad_``,
``group_prox_`` (group lasso) and ``max_norm_``; ``kth_abs``, each tensor's
k-th smallest magnitude (the threshold that leaves k exact zeros).
Convention helpers: ``from_sklearn``, ``from_weight_decay``.
``path``: fit a model along a grid of regularization strengths.
"""
__version__ = "0.1.0"

from ._common import WeightStats
from .backends import backend_name, use_backend
from .ops import (add_group_penalty_grad_, add_penalty_grad_, group_norms, group_penalty, group_prox_,
                  kth_abs, max_norm_, penalty, prox_, weight_stats)
from .conventions import from_sklearn, from_weight_decay
from .optim import Regularized, param_groups
from . import optim
from .compact import compact  # noqa: E402  (pyreg.compact: remove zeroed groups)
from .path import path  # noqa: E402  (pyreg.path: a regularization path)

__all__ = [
    "Regularized",
    "WeightStats",
    "add_group_penalty_grad_",
    "add_penalty_grad_",
    "backend_name",
    "compact",
    "from_sklearn",
    "from_weight_decay",
    "group_norms",
    "group_penalty",
    "group_prox_",
    "kth_abs",
    "max_norm_",
    "param_groups",
    "path",
    "penalty",
    "prox_",
    "use_backend",
    "weight_stats",
]

#: Public submodules (``pyreg.optim`` holds the optimizers).
_SUBMODULES = ["backends", "conventions", "ops", "optim"]


def __dir__():
    """The public API only (``dir(pyreg)``, completion)."""
    return sorted(__all__ + _SUBMODULES + ["__version__"])
