"""The argument checks of the fused linear log-prob op's public functions, and whether the
Triton backend runs for its inputs (shared by ``linear_logprobs`` and ``linear_logprobs_stats``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from . import ops as _ops
from .dtypes import accumulation_dtype


def uses_triton(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the Triton backend runs for these inputs (CUDA tensors, or CPU tensors under
    ``use_cpu_backend("triton")``; never float64)."""
    if accumulation_dtype(hidden, weight) == torch.float64:
        return False
    return _ops.resolve_backend(hidden.device) == "triton"


def check_linear_call(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                      ignore_index: int, temperature: float, chunk_tokens: int,
                      chunk_vocab: int, design: str, deterministic: bool,
                      num_scored: int | None, logit_scale: float, softcap: float | None
                      ) -> None:
    """Every argument of a public fused-linear call, before the op runs (metadata only)."""
    checks.check_linear_inputs(hidden, weight, labels, bias)
    checks.check_temperature(temperature)
    checks.check_ignore_index(ignore_index)
    checks.check_linear_options(logit_scale=logit_scale, softcap=softcap,
                                chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                                design=design, deterministic=deterministic,
                                num_scored=num_scored, num_labels=labels.numel())
    if design == "tile" and not uses_triton(hidden, weight):
        raise ValueError("design='tile' needs the Triton backend (CUDA tensors, or CPU tensors "
                         "under use_cpu_backend('triton')) and no float64 input; got "
                         f"{hidden.dtype}/{weight.dtype} tensors on {hidden.device}")
