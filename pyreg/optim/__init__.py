"""pyreg's optimizers.

* :class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`Adagrad`,
  :class:`RMSprop` (sgd.py, adam.py, adagrad.py, rmsprop.py): torch's
  optimizers with L1 / L2 proximal steps, each step one fused pass per
  (device, dtype) bucket (fused.py holds what they share; functional.py the
  steps as functions).
* :class:`Regularized` (regularized.py): L1 / L2 / elastic net and the
  structured regularizers around any ``torch.optim`` optimizer.
* Both families read, check and apply the regularization keys through one
  engine: keys.py (the keys), engine.py (checks and cache), plan.py (the
  buckets), apply.py (the ops on them).
* :func:`param_groups`, :func:`default_exclude` (groups.py): per-layer
  groups from a model.
"""
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .groups import default_exclude, param_groups
from .regularized import Regularized
from .results import ParamStats, Sparsity
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop", "ParamStats", "Regularized", "Sparsity",
           "default_exclude", "param_groups"]
