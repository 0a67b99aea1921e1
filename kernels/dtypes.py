"""The accumulation dtype of every kernel and CPU path, written once.

Sums (log-sum-exp, matmul tiles, gradient accumulators) run in float32 for float32, bfloat16 and
float16 inputs, and in float64 when an input is float64, so that ``torch.autograd.gradcheck`` and
the float64 tests see float64 arithmetic end to end. The ops' results come out in this dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(*inputs: Tensor | torch.dtype | None) -> torch.dtype:
    """``torch.float64`` when any input (a tensor or a dtype; None is skipped) is float64, else
    ``torch.float32``."""
    for item in inputs:
        dtype = item.dtype if isinstance(item, Tensor) else item
        if dtype == torch.float64:
            return torch.float64
    return torch.float32
