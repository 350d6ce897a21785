"""Small facts shared by the op definitions, every backend and the fake kernels."""
from __future__ import annotations

from operator import attrgetter
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

#: dtypes every backend supports. Codes match csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


class WeightStats(NamedTuple):
    """Per-tensor statistics, one entry per tensor of the list.

    l1: sum |w|; l2: sqrt(sum w^2); linf: max |w| (0 for an empty tensor, NaN if
    any w is NaN); nnz: count of w != 0 (int64; NaN counts as nonzero).
    """

    l1: Tensor
    l2: Tensor
    linf: Tensor
    nnz: Tensor


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """dtype of the floating-point results (norms, penalty): float64 if any input
    is float64, else float32 (16-bit inputs accumulate and report in float32)."""
    return torch.float64 if torch.float64 in set(map(attrgetter("dtype"), tensors)) else torch.float32


def coef_tensor(c: Union[float, Tensor], n: int, device: torch.device) -> Tensor:
    """A validated coefficient (a float for every tensor, or one value per
    tensor) as a 1-D float64 tensor of n entries: the custom ops' form."""
    return torch.full((n,), c, dtype=torch.float64, device=device) if isinstance(c, float) else c
