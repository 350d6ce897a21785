"""pyreg's optimizers.

* :class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`Adagrad` (sgd.py,
  adam.py, adagrad.py): torch's optimizers with L1 / L2 proximal steps, each
  step one fused pass per (device, dtype) bucket (_base.py holds what they
  share).
* :class:`Regularized` (regularized.py): L1 / L2 / elastic net and the
  structured regularizers around any ``torch.optim`` optimizer.
* :func:`param_groups`, :func:`default_exclude` (regularized.py): per-layer
  groups from a model.
"""
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .regularized import ParamStats, Regularized, Sparsity, default_exclude, param_groups
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "ParamStats", "Regularized", "Sparsity", "default_exclude",
           "param_groups"]
