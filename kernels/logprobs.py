"""Masked per-token and per-sequence log-probabilities of the label tokens, from logits.

    token_logps[n]    = log softmax(logits[n] / T)[labels[n]]      (0 where labels[n] == ignore)
    sequence_logps[b] = Σ_t token_logps[b, t]         (reduction="sum")
                      = Σ_t token_logps[b, t] / max(1, #scored tokens of b)   (reduction="mean")

Labels are the shifted next tokens: ``labels[..., t]`` is the token that follows position ``t``;
``ignore_index`` marks prompt and padding positions. With ``shift=True`` they are a causal LM's
unshifted ``labels`` instead, shifted here without touching the logits (``labels.py``, where the
``shift`` / ``ignore_index`` / ``reduction`` conventions of all four ops are written down).
The full-vocabulary log-softmax is never materialized: the forward streams each row once and
keeps only its log-sum-exp, and the backward writes ``grad · (onehot − softmax) / T`` from it
(see ``logprobs_triton.py`` for the derivation).
Accumulation is fp32 for every input dtype; the outputs are float32 (float64 for float64 logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from . import ops as _ops  # noqa: F401  (registers the fastpo:: ops)
from .labels import prepare_labels


class SequenceLogps(NamedTuple):
    """Per-sequence results: reduced log-probs, scored-token counts, optional logit sums."""

    logps: Tensor
    num_tokens: Tensor
    logits_sum: Tensor | None = None


def _check(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float) -> None:
    checks.check_logits_labels(logits, labels)
    checks.check_temperature(temperature)
    checks.check_ignore_index(ignore_index)


def token_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    with_logits_sum: bool = False,
    shift: bool = False,
    reduction: str = "none",
    sequence_ids: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label token: [B, T, V] or [N, V] logits -> [B, T] or [N].

    Args:
        logits: float32, bfloat16, float16 or float64 logits; any strides (a shifted view
            ``logits[:, :-1]``, a slice of a wider vocabulary, a transposed or expanded tensor).
        labels: int64 or int32 labels of the leading shape; ``ignore_index`` where not scored.
            A label outside ``[0, V)`` that is not ``ignore_index`` is an error (see
            :mod:`fastpo.kernels.checks`: exact position on CPU, an asynchronous device assert
            on a GPU).
        temperature: the logits are divided by it before the softmax; a finite number > 0.
        inplace_backward: the backward writes the gradient into the logits' own storage, so it
            allocates no ``[N, V]`` buffer. **The logits are overwritten** during backward: do not
            use them afterwards, and do not use this when another op saved them for its backward.
            Logits whose elements share memory (expanded over a dimension, stride 0, or any other
            self-overlapping view) cannot hold their own gradient: their backward writes a fresh
            buffer instead, exactly as with ``inplace_backward=False``.
        with_logits_sum: also return, per token, the sum over the vocabulary of the raw logits
            (0 where ignored), computed in the same pass (for TRL's ``logits/*`` metrics).
        shift: ``labels`` are unshifted (a causal LM's ``labels``): position ``t`` is scored
            against ``labels[..., t + 1]``, the last position is not scored (see
            :mod:`fastpo.kernels.labels`); the logits are used as given, no slice needed.
        reduction: only ``"none"`` (per-token values); per-sequence reductions are
            :func:`sequence_logps`'s.
        sequence_ids: packed input only, with ``shift``: each token's sequence (``-1`` for none),
            so that no shift crosses a sequence boundary.
    """
    labels = prepare_labels(labels, ignore_index, shift=shift, reduction=reduction,
                            per_token=True, sequence_ids=sequence_ids)
    _check(logits, labels, ignore_index, temperature)
    logps, _lse, logits_sum = torch.ops.fastpo.logps_forward(
        logits, labels, ignore_index, float(temperature), with_logits_sum, inplace_backward
    )
    return (logps, logits_sum) if with_logits_sum else logps


def _segment_sum(values: Tensor, sequence_ids: Tensor, num_sequences: int) -> Tensor:
    """The segment sum, ids already checked; tokens of id -1 are dropped."""
    ids = sequence_ids.reshape(-1).long()
    keep = ids >= 0
    flat = values.reshape(-1)
    ids = torch.where(keep, ids, torch.zeros_like(ids))
    flat = torch.where(keep, flat, torch.zeros_like(flat))
    return flat.new_zeros(num_sequences).index_add(0, ids, flat)


def segment_sum(values: Tensor, sequence_ids: Tensor, num_sequences: int) -> Tensor:
    """Per-sequence sums of per-token values: ``out[s] = Σ_{i : sequence_ids[i] = s} values[i]``.

    ``values`` and ``sequence_ids`` (integer) have one shape; ``-1`` marks a token of no sequence
    (dropped). Returns ``[num_sequences]`` in the dtype of ``values``, differentiable w.r.t. them.
    An id outside ``[-1, num_sequences)`` is an error (no host synchronization on a GPU, see
    :mod:`fastpo.kernels.checks`). The per-sequence reductions of the ops use the same sum.
    """
    checks.check_tensors(values=values)
    checks.check_sequence_ids_layout(sequence_ids, values, name="values")
    checks.check_num_sequences(num_sequences)
    checks.check_sequence_ids(sequence_ids, num_sequences)
    return _segment_sum(values, sequence_ids, num_sequences)


def reduce_sequences(
    token_values: Tensor,
    scored: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum per-token values and count scored tokens per sequence.

    Rows of ``[B, T]`` inputs are sequences. For packed (padding-free) input, ``sequence_ids`` of
    the same shape gives each token's sequence (``-1`` for none) and ``num_sequences`` their count;
    an id outside ``[-1, num_sequences)`` is an error (no host synchronization on a GPU, see
    :mod:`fastpo.kernels.checks`). Without ``num_sequences`` the count is read from the ids on the
    host (one synchronization on a GPU).
    """
    if sequence_ids is None:
        if token_values.dim() == 1:
            token_values, scored = token_values.unsqueeze(0), scored.unsqueeze(0)
        if num_sequences is not None and num_sequences != token_values.shape[0]:
            raise ValueError(f"num_sequences={num_sequences!r} without sequence_ids, but the "
                             f"input has {token_values.shape[0]} rows (one sequence per row); "
                             "pass the packed sequence_ids for another layout")
        return token_values.sum(-1), scored.sum(-1)
    checks.check_sequence_ids_layout(sequence_ids, token_values)
    checks.check_sequence_ids(sequence_ids, num_sequences)
    if num_sequences is None:
        num_sequences = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
    return (_segment_sum(token_values, sequence_ids, num_sequences),
            _segment_sum(scored.long(), sequence_ids, num_sequences))


def sequence_totals(
    per_token: Tensor,
    scored: Tensor,
    *,
    reduction: str,
    sequence_ids: Tensor | None,
    num_sequences: int | None,
) -> tuple[Tensor, Tensor]:
    """(per-sequence sum of ``per_token``, scored-token counts); ``reduction="mean"`` divides the
    sums by the counts (0 for a sequence with no scored token, never NaN)."""
    totals, counts = reduce_sequences(per_token, scored, sequence_ids=sequence_ids,
                                      num_sequences=num_sequences)
    if reduction == "mean":
        totals = totals / counts.clamp(min=1).to(totals.dtype)
    return totals, counts


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "sum",
    inplace_backward: bool = False,
    with_logits_sum: bool = False,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    shift: bool = False,
) -> SequenceLogps:
    """Per-sequence log-probs of the label tokens, their token counts and optional logit sums.

    ``reduction="mean"`` divides by the number of scored tokens; a sequence with none gets 0
    (never NaN). ``logits_sum`` (with ``with_logits_sum``) is, per sequence, the sum over scored
    tokens of the sum over the vocabulary of the logits. For packed input pass ``sequence_ids``
    (and ``num_sequences`` to avoid reading the ids on the host); with ``shift=True`` the last
    token of each packed sequence is not scored (its next label belongs to another sequence).
    Other arguments as in :func:`token_logps`.
    """
    labels = prepare_labels(labels, ignore_index, shift=shift, reduction=reduction,
                            per_token=False, sequence_ids=sequence_ids)
    out = token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                      inplace_backward=inplace_backward, with_logits_sum=with_logits_sum)
    per_token, per_token_sum = out if with_logits_sum else (out, None)
    scored = labels != ignore_index
    totals, counts = sequence_totals(per_token, scored, reduction=reduction,
                                     sequence_ids=sequence_ids, num_sequences=num_sequences)
    logits_sum = None
    if per_token_sum is not None:
        logits_sum, _ = reduce_sequences(per_token_sum, scored, sequence_ids=sequence_ids,
                                         num_sequences=num_sequences)
    return SequenceLogps(totals, counts, logits_sum)
