"""What an optimizer's ``stats()`` and ``sparsity()`` return."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

from torch import Tensor


class ParamStats(NamedTuple):
    """Per-parameter statistics, in the optimizer's parameter order.

    ``names[i]`` names entry ``i`` of the 1-D tensors ``l1`` (sum|w|), ``l2``
    (sqrt(sum w^2)), ``linf`` (max|w|), ``nnz`` (count of w != 0) and ``numel``.
    """

    names: List[str]
    l1: Tensor
    l2: Tensor
    linf: Tensor
    nnz: Tensor
    numel: Tensor

    def as_dict(self) -> Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """name -> (l1, l2, linf, nnz) as 0-dim tensors (views; no host sync)."""
        return {n: (self.l1[i], self.l2[i], self.linf[i], self.nnz[i]) for i, n in enumerate(self.names)}


class Sparsity(NamedTuple):
    """Fraction of exact zeros: ``overall`` (0-dim, over all elements) and
    ``per_param`` (1-D, one entry per ``names``; 0 for empty tensors)."""

    overall: Tensor
    per_param: Tensor
    names: List[str]

    def as_dict(self) -> Dict[str, Tensor]:
        return {n: self.per_param[i] for i, n in enumerate(self.names)}


# --------------------------------------------------------------------------
