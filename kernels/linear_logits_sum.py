"""The sum over the vocabulary of the lm_head's logits per row, without building the logits.

TRL logs ``logits/chosen`` and ``logits/rejected``: the mean logit over the completion tokens and
the vocabulary. From hidden states h and the head (W, b) the per-row sum has a closed form,
``Σ_v (h·W_v + b_v) = h · Σ_v W_v + Σ_v b_v``: one mat-vec, no ``[N, V]`` logits. A soft-cap
(tanh) has none, and the logits are then built a chunk of rows at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .dtypes import accumulation_dtype

__all__ = ["linear_logits_sum"]


def linear_logits_sum(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int = 1024,
) -> Tensor:
    """Per row of ``hidden`` (``[N, H]`` or ``[B, T, H]`` → ``[N]`` or ``[B, T]``), the sum over
    the vocabulary of the head's logits ``z = (h Wᵀ + b)·s``, soft-capped ``c·tanh(z / c)`` with
    ``softcap=c``; no gradient (a metric: TRL's ``logits/*``).

    Without a soft-cap in closed form, ``(h · Σ_v W_v + Σ_v b_v)·s``: a mat-vec, no logits. With
    one (no closed form under tanh) the logits are built ``chunk_tokens`` rows at a time, in the
    inputs' dtype as the model computes them, and summed in the accumulation dtype. Returns
    float32 (float64 when an input is float64).
    """
    checks.check_linear_head(hidden, weight, bias)
    checks.check_logit_transform(logit_scale, softcap)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    acc = accumulation_dtype(hidden, weight, bias)
    with torch.no_grad():
        if softcap is None:
            sums = hidden.to(acc) @ weight.sum(dim=0, dtype=acc)
            if bias is not None:
                sums = sums + bias.sum(dtype=acc)
            return sums * logit_scale if logit_scale != 1.0 else sums
        op = torch.promote_types(hidden.dtype, weight.dtype)
        if bias is not None:
            op = torch.promote_types(op, bias.dtype)
        rows = hidden.reshape(-1, hidden.shape[-1])
        w, b = weight.to(op), None if bias is None else bias.to(op)
        parts = []
        for part in rows.split(chunk_tokens):
            z = torch.nn.functional.linear(part.to(op), w, b).to(acc)
            if logit_scale != 1.0:
                z = z * logit_scale
            parts.append((torch.tanh(z / softcap) * softcap).sum(-1))
        sums = torch.cat(parts) if parts else rows.new_zeros(0, dtype=acc)
        return sums.view(hidden.shape[:-1])
