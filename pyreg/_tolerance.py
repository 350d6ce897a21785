"""How close a result must be to the float64 specification (backends/torch_ref.py)
to count as correct: the one table behind pyreg's tests and the bench suite's
checks. ``tolerance(kind, dtype)`` gives keyword arguments for
``torch.testing.assert_close`` / ``torch.allclose``.

kinds:
- ``elementwise``: a written tensor (prox_) against the spec rounded once to
  its dtype: the op's own rounding.
- ``elementwise_fma``: the same where the compiler may fuse a multiply and an
  add (CUDA kernels on a GPU): float32 to 1e-5.
- ``grad``: a grad after add_penalty_grad_ (g + a small term): in 16 bit a sum
  that cancels to near 0 keeps the rounding of its inputs' size.
- ``elementwise_ref``: prox_ toward a reference, ``r + prox(w - r)`` with each
  step rounded to the dtype: in 16 bit the middle step may round a tie the
  other way than the spec (kernels compute it in float32), by one unit of
  ``prox(w - r)``, which the sum with ``r`` may leave as the same absolute
  error on a much smaller result (as ``grad``).
- ``reduction``: norms and penalties (float32 results for 32- and 16-bit
  inputs, summed in float32 runs folded into float64).
- ``peer_elementwise`` / ``peer_reduction``: another library's result against
  pyreg's (the bench suite's peers reduce in the input dtype in their own order).
- ``optimizer_step``: parameters after an optimizer step (fused and foreach
  kernels round the division by sqrt(v) + eps differently).
"""
from __future__ import annotations

from typing import Dict

import torch

_F64, _F32, _F16, _BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def _t(rtol: float, atol: float) -> Dict[str, float]:
    return dict(rtol=rtol, atol=atol)


TOLERANCES = {
    "elementwise": {_F64: _t(1e-7, 1e-7), _F32: _t(1.3e-6, 1e-5), _F16: _t(1e-3, 1e-5), _BF16: _t(1.6e-2, 1e-5)},
    "elementwise_fma": {_F64: _t(1e-7, 1e-7), _F32: _t(1e-5, 1e-5), _F16: _t(1e-3, 1e-5), _BF16: _t(1.6e-2, 1e-5)},
    "grad": {_F64: _t(1e-7, 1e-7), _F32: _t(1e-5, 1e-5), _F16: _t(1e-3, 5e-3), _BF16: _t(1.6e-2, 5e-3)},
    "elementwise_ref": {_F64: _t(1e-7, 1e-7), _F32: _t(1e-5, 1e-5), _F16: _t(1e-3, 5e-3),
                        _BF16: _t(1.6e-2, 3.2e-2)},
    "reduction": {_F64: _t(1e-7, 1e-7), _F32: _t(1e-5, 1e-5), _F16: _t(1e-5, 1e-5), _BF16: _t(1e-5, 1e-5)},
    "peer_elementwise": {_F64: _t(1e-7, 1e-9), _F32: _t(1.3e-6, 1e-8), _F16: _t(2e-3, 1e-5), _BF16: _t(1.6e-2, 1e-5)},
    "peer_reduction": {_F64: _t(1e-7, 1e-7), _F32: _t(1e-4, 1e-5), _F16: _t(2e-3, 1e-5), _BF16: _t(1.6e-2, 1e-5)},
    "optimizer_step": {_F64: _t(1e-5, 1e-7), _F32: _t(1e-5, 1e-7), _F16: _t(5e-3, 5e-3), _BF16: _t(5e-3, 5e-3)},
}


def tolerance(kind: str, dtype: torch.dtype) -> Dict[str, float]:
    """``dict(rtol=..., atol=...)`` for results of ``kind`` in ``dtype``."""
    return dict(TOLERANCES[kind][dtype])
