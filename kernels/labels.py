"""The label conventions shared by the four ops: ``shift``, ``ignore_index`` and ``reduction``.

``shift=True`` takes labels as a causal LM's ``labels`` (aligned with ``input_ids``, unshifted):
position ``t`` is scored against ``labels[..., t + 1]`` and the last position against nothing.
Only the (small, integer) labels move; the logits or hidden states are used as given, so no
``logits[:, :-1]`` slice and no copy of them is needed:

    shifted[..., t] = labels[..., t + 1]      for t < T - 1
    shifted[..., T - 1] = ignore_index

For packed input (``sequence_ids``: each token's sequence, ``-1`` for none) a shift never crosses
a sequence boundary: a position whose next token belongs to another sequence (the last token of
every packed sequence) or to no sequence gets ``ignore_index``, and so does a position of no
sequence. No host synchronization: every step is an elementwise tensor op.

``reduction``: the per-sequence ops reduce over each sequence's scored tokens (``"sum"``, the
default, or ``"mean"``); the per-token ops return one value per token and accept only
``"none"`` (their default), so a reduction asked of the wrong op is an error, never ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import (
    check_ignore_index,
    check_label_dtype,
    check_reduction,
    check_sequence_ids_layout,
    check_tensors,
)

TOKEN_REDUCTIONS = ("none",)


def check_shift(shift: bool) -> None:
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be True or False, got {shift!r} of type "
                        f"{type(shift).__name__}")


def check_token_reduction(reduction: str) -> None:
    """The per-token ops return per-token values: ``reduction`` may only be ``"none"``."""
    if not isinstance(reduction, str) or reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not available on a per-token op, which "
                         "returns one value per token (reduction='none'); for per-sequence sums "
                         "or means use sequence_logps / linear_sequence_logps with "
                         "reduction='sum' or 'mean'")


def shift_labels(labels: Tensor, ignore_index: int = -100, *,
                 sequence_ids: Tensor | None = None) -> Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index`` at the end (see the module docstring).

    ``labels``: int64/int32 ``[B, T]`` or ``[N]``; the result has the same shape, dtype and
    device. ``sequence_ids`` (packed input, same shape): positions whose next token is in another
    sequence, or that are in no sequence (``-1``), get ``ignore_index``.
    """
    check_tensors(labels=labels)
    check_label_dtype(labels)
    if labels.dim() == 0:
        raise ValueError("labels must have at least one dimension to be shifted, got a scalar")
    check_ignore_index(ignore_index)
    last = min(1, labels.shape[-1])  # no column to fill in an empty sequence dimension
    fill = torch.full((*labels.shape[:-1], last), ignore_index, dtype=labels.dtype,
                      device=labels.device)
    shifted = torch.cat([labels[..., 1:], fill], dim=-1)
    if sequence_ids is None:
        return shifted
    check_sequence_ids_layout(sequence_ids, labels)
    current, following = sequence_ids[..., :-1], sequence_ids[..., 1:]
    same = torch.cat([(current == following) & (current >= 0),
                      torch.zeros_like(fill, dtype=torch.bool)], dim=-1)
    return torch.where(same, shifted, torch.full_like(shifted, ignore_index))


def prepare_labels(labels: Tensor, ignore_index: int, *, shift: bool, reduction: str,
                   per_token: bool, sequence_ids: Tensor | None = None) -> Tensor:
    """Check ``shift`` and ``reduction`` for a per-token or per-sequence op and return the labels
    it scores (shifted when ``shift``). The one call at the top of each of the four ops."""
    check_shift(shift)
    if per_token:
        check_token_reduction(reduction)
    else:
        check_reduction(reduction)
    if not shift:
        return labels
    return shift_labels(labels, ignore_index, sequence_ids=sequence_ids)
