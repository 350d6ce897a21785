"""pyreg's optimizers.

* :class:`Regularized` (regularized.py): L1 / L2 / elastic net and the
  structured regularizers around any ``torch.optim`` optimizer.
* :func:`param_groups`, :func:`default_exclude` (regularized.py): per-layer
  groups from a model.
"""
from .regularized import ParamStats, Regularized, Sparsity, default_exclude, param_groups

__all__ = ["ParamStats", "Regularized", "Sparsity", "default_exclude", "param_groups"]
