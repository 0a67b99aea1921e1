"""Per-token statistics of the next-token distribution, from the fused op's own tile pass.

TRL's trainers log, per scored token, the entropy of p = softmax(z), the mean logit, whether the
label is the top-1 token, and (WPO) log Σ_v p_v². Each is a reduction over the vocabulary that
can be carried along the vocabulary slices the fused linear op already walks for its
log-sum-exp, so asking for them costs elementwise work on tiles that exist anyway, never a second
``[N, V] × H`` matmul. Per row, over slices j with maximum m_j:

    s = Σ e^{z−M}   t = Σ e^{z−M}(z−M)   q = Σ e^{2(z−M)}   Σ z   (max, first argmax)

merged online as M grows (M the running maximum), then

    lse = M + log s,   entropy = log s − t/s,   log Σ p² = log q − 2 log s,
    mean logit = Σ z / V,   top-1 = (first argmax == label).

:class:`RowStatistics` is that accumulator; the chunked (CPU) and gemm designs feed it their
tiles when the op is called with ``statistics=True`` (the tile design's forward gives way to the
gemm design then). :func:`linear_token_logps_with_statistics` is the public entry.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .dtypes import accumulation_dtype
from .linear_logprobs_checks import check_linear_call

STATISTICS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


class TokenStatistics(NamedTuple):
    """Per-token statistics (no gradient), of the labels' shape, 0 / False where ignored."""

    entropy: Tensor
    mean_logits: Tensor
    is_top1: Tensor  # bool
    log_sum_sq_probs: Tensor


class RowStatistics:
    """The online accumulator of one chunk of rows over the vocabulary slices (see the module
    doc); ``update`` takes each slice's tile (left as it was)."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        def full(value: float) -> Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        self.m, self.top = full(float("-inf")), full(float("-inf"))
        self.s, self.t, self.q, self.zsum = full(0.0), full(0.0), full(0.0), full(0.0)
        self.arg = torch.zeros(rows, dtype=torch.int64, device=device)
        self._buf: Tensor | None = None  # z − M and e^{z−M} of a tile (reused)

    def update(self, tile: Tensor, v0: int, scale: float = 1.0) -> None:
        """Fold in one vocabulary slice, z = ``tile`` · ``scale`` (> 0), starting at column
        ``v0``; the tile is left as it was (the caller's own log-sum-exp reads it next)."""
        n = tile.numel()
        if self._buf is None or self._buf.shape[1] < n:
            self._buf = torch.empty((2, n), dtype=tile.dtype, device=tile.device)
        d, e = (b[:n].view_as(tile) for b in self._buf)
        self.zsum += tile.sum(dim=1) * scale
        value, index = tile.max(dim=1)  # the first maximum of the slice
        value = value * scale
        better = value > self.top  # a later slice must beat it strictly: the first maximum
        self.arg = torch.where(better, index + v0, self.arg)
        self.top = torch.where(better, value, self.top)
        m = torch.maximum(self.m, value)
        shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        old = self.s > 0
        rescale = torch.where(old, torch.exp(self.m - shift), torch.zeros_like(m))
        delta = torch.where(old, self.m - shift, torch.zeros_like(m))
        torch.mul(tile, scale, out=d).sub_(shift.unsqueeze(1))  # z − M
        torch.exp(d, out=e)
        d.clamp_(min=torch.finfo(d.dtype).min)  # a −inf logit: e = 0 times a finite d
        # row dot products: einsum reads both tiles once, without a product temporary
        self.t = rescale * (self.t + self.s * delta) + torch.einsum("ij,ij->i", e, d)
        self.q = rescale * rescale * self.q + torch.einsum("ij,ij->i", e, e)
        self.s = rescale * self.s + e.sum(dim=1)
        self.m = m

    def finish(self, labels: Tensor, vocab: int) -> Tensor:
        """The statistics ``[4, rows]`` (entropy, mean logit, top-1 as 0/1, log Σ p²) of the
        rows whose ``labels`` are given. (The op's log-sum-exp stays its own computation, so
        that the log-probs are the same numbers with or without the statistics.)"""
        log_s = torch.log(self.s)
        return torch.stack([log_s - self.t / self.s, self.zsum / vocab,
                            (self.arg == labels).to(self.s.dtype),
                            torch.log(self.q) - 2 * log_s])


@torch.no_grad()
def logits_statistics(z: Tensor, labels: Tensor, *, ignore_index: int = -100
                      ) -> TokenStatistics:
    """The :class:`TokenStatistics` of rows of logits ``z [N, V]`` that exist already (already
    transformed: temperature, scale, soft-cap), with the same accumulator, in the accumulation
    dtype; 0 / False where ``labels`` is ``ignore_index``."""
    z = z.detach().to(accumulation_dtype(z))
    acc = RowStatistics(z.shape[0], z.dtype, z.device)
    acc.update(z, 0)
    stats = acc.finish(labels, z.shape[-1])
    stats = torch.where(labels != ignore_index, stats, torch.zeros((), dtype=stats.dtype))
    return unpack_statistics(stats, labels.shape)


def unpack_statistics(stats: Tensor, shape: torch.Size) -> TokenStatistics:
    """The op's ``[4, N]`` statistics as a :class:`TokenStatistics` of ``shape``."""
    entropy, mean, top1, sum_sq = (row.view(shape) for row in stats)
    return TokenStatistics(entropy, mean, top1 > 0.5, sum_sq)


def linear_token_logps_with_statistics(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
    ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
    logit_scale: float = 1.0, chunk_tokens: int = 0, chunk_vocab: int = 0, design: str = "auto",
    num_scored: int | None = None,
) -> tuple[Tensor, TokenStatistics]:
    """:func:`~fastpo.kernels.linear_logprobs.linear_token_logps` (the same arguments; labels
    already shifted; with gradient) and the per-token :class:`TokenStatistics` of z, the
    transformed logits (logit scale, soft-cap, temperature), from the same pass over the
    vocabulary: the entropy of softmax(z), the mean of z over the vocabulary, whether the label
    is the (first) arg-max, log Σ softmax(z)². No gradient flows through the statistics."""
    check_linear_call(hidden, weight, labels, bias, ignore_index, temperature, chunk_tokens,
                      chunk_vocab, design, False, num_scored, logit_scale, softcap)
    logps, _lse, stats = torch.ops.fastpo.linear_logps_forward(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, ignore_index,
        float(temperature), chunk_tokens, chunk_vocab, design, False,
        -1 if num_scored is None else num_scored, float(logit_scale),
        0.0 if softcap is None else float(softcap), True)
    return logps, unpack_statistics(stats, labels.shape)
