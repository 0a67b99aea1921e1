"""What TRL's fused lm_head reports besides the log-probs, computed without the full logits.

Pure tensor functions used by the TRL integration: the per-token statistics of the next-token
distribution (chunked, no gradient), and scattering per-scored-token values back to the label
grid. The logit transform and ``log Σ p²`` are :mod:`fastpo.kernels.logit_transform`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastpo.kernels.logit_transform import log_sum_sq_probs

STATISTICS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
# float32 elements of one chunk of logits in the statistics pass (32 MiB per temporary)
STATS_CHUNK_ELEMENTS = 2**23


@torch.no_grad()
def head_statistics(
    logits_rows: Callable[[int, int], Tensor],
    labels: Tensor,
    *,
    vocab_size: int,
    which: frozenset[str] | set[str],
    transform: Callable[[Tensor], Tensor] = lambda z: z,
    chunk_elements: int = STATS_CHUNK_ELEMENTS,
) -> dict[str, Tensor]:
    """Per-token statistics of the next-token distribution p = softmax(z), no gradient.

    ``logits_rows(start, end)`` returns the (untransformed) logits of rows ``start:end``;
    ``transform`` maps them to z. With lse = log Σ_v exp z_v:
        entropy          = lse − Σ_v p_v z_v          (= −Σ p log p)
        mean_logits      = (1/V) Σ_v z_v
        is_top1          = argmax_v z_v == label      (first maximum, as TRL)
        log_sum_sq_probs = log Σ_v p_v² = logsumexp(2z) − 2·lse
    Rows are processed ``chunk_elements // V`` at a time, so one chunk of float32 logits (and a
    few temporaries of its size) is the peak memory.
    """
    n = labels.shape[0]
    device = labels.device
    out = {name: torch.empty(n, device=device, dtype=torch.bool if name == "is_top1"
                             else torch.float32) for name in which}
    rows = max(1, chunk_elements // max(1, vocab_size))
    for start in range(0, n, rows):
        end = min(n, start + rows)
        z = transform(logits_rows(start, end).float())
        lse = torch.logsumexp(z, dim=-1)
        if "entropy" in which:
            p = torch.exp(z - lse.unsqueeze(-1))
            out["entropy"][start:end] = lse - (p * z).sum(-1)
            del p
        if "mean_logits" in which:
            out["mean_logits"][start:end] = z.mean(-1)
        if "is_top1" in which:
            out["is_top1"][start:end] = z.argmax(-1) == labels[start:end]
        if "log_sum_sq_probs" in which:
            out["log_sum_sq_probs"][start:end] = log_sum_sq_probs(z, lse)
    return out


def scatter_scored(values: Tensor, mask: Tensor) -> Tensor:
    """Per-scored-token ``values [n]`` back to ``mask``'s shape, zero (False) elsewhere.

    ``masked_scatter`` keeps the result connected to the graph even when nothing is scored.
    """
    return values.new_zeros(mask.shape).masked_scatter(mask, values)
