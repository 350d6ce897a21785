"""Convert other libraries' regularization strengths into pyreg's.

pyreg's penalty is R(w) = l1 * sum|w| + l2 * sum w^2 (Keras' convention: no 1/2).
"""
from __future__ import annotations

from typing import Tuple

from ._validate import nonneg_real, real


def from_sklearn(alpha: float, l1_ratio: float = 1.0) -> Tuple[float, float]:
    """(l1, l2) equal to scikit-learn's ``ElasticNet(alpha, l1_ratio)`` penalty
    ``alpha * l1_ratio * ||w||_1 + 0.5 * alpha * (1 - l1_ratio) * ||w||_2^2``,
    whose data term is ``0.5 * mean((X w - y)^2)``. ``l1_ratio=1`` is ``Lasso(alpha)``.
    """
    alpha, r = nonneg_real(alpha, "alpha"), real(l1_ratio, "l1_ratio")
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"l1_ratio must be in [0, 1], got {r}")
    return alpha * r, alpha * (1.0 - r) / 2.0


def from_weight_decay(weight_decay: float) -> float:
    """l2 equal to torch.optim's ``weight_decay`` (which adds wd * w to the
    gradient, i.e. the penalty wd/2 * sum w^2): ``l2 = weight_decay / 2``."""
    return nonneg_real(weight_decay, "weight_decay") / 2.0
