"""Shared-prompt pairs: the prompt of a pair runs through the model once, not twice.

A concatenated pair batch holds ``prompt + chosen`` and ``prompt + rejected``: the prompt's
``p`` tokens go through every layer twice (and through the reference model twice more). Here a
pair is one segment ``[prompt | chosen | rejected]`` of ``p + c + r`` tokens:

- positions: prompt ``0..p−1``, chosen ``p..p+c−1``, rejected ``p..p+r−1`` (both completions
  continue the prompt);
- attention: causal inside the segment, except that rejected tokens never see chosen tokens:
  ``allowed(q, k) = same segment ∧ k ≤ q ∧ (branch_k = prompt ∨ branch_k = branch_q)``;
- targets: the hidden state of the prompt's last token scores both first completion tokens
  (``chosen[0]`` and ``rejected[0]``); every other scored position scores one token.

Each completion token therefore sees exactly the context it sees in the concatenated batch, with
the same positions, so log-probs and gradients are the same (the prompt's gradient is the sum of
the two branches', as before) — up to float summation order. The model processes ``p + c + r``
tokens per pair instead of ``2p + c + r``. Used by ``collate_pairs(..., share_prompt=True)``;
SDPA (segment attention, :mod:`fastpo.engine.model.attention`: ``[prompt | chosen]`` causal,
then the rejected tokens over ``[prompt | rejected]``, no mask over the whole row) and eager
attention (a custom 4-D mask, also SDPA's fallback); not flash-attention, whose varlen kernel
has no such mask, nor sliding-window layers shorter than the segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dataset import TokenizedPair
from .preference_batch import (
    PreferenceBatch,
    SequenceRows,
    SharedPromptRows,
    check_token_ids,
    empty_rows,
    row_layout,
)
from .segments import shared_prompt_plan

PROMPT, CHOSEN, REJECTED = 0, 1, 2

SUPPORTED_ATTENTION = ("sdpa", "eager")


def shared_prompt_rows(pairs: Sequence[TokenizedPair], *, pad_token_id: int,
                       padding_free: bool = False, pad_to_multiple_of: int | None = None,
                       ignore_index: int = -100) -> tuple[SequenceRows, SharedPromptRows]:
    """The rows of B pairs, each a ``[prompt | chosen | rejected]`` segment, and what such rows
    add to a batch (:class:`SharedPromptRows`).

    Sequences keep the pair-batch numbering (chosen ``0..B−1``, rejected ``B..2B−1``). One row
    per pair (right padding), or with ``padding_free`` every pair in one row.
    ``target_labels`` holds the label of each scored target (a prompt's last position is scored
    twice, so the ``labels`` grid cannot hold them all).
    """
    for i, pair in enumerate(pairs):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            check_token_ids(name.removesuffix("_ids"), getattr(pair, name), f"pair {i}")
            if not getattr(pair, name):
                raise ValueError(f"pair {i} has an empty {name.removesuffix('_ids')}")
    num_pairs = len(pairs)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    total = sum(lengths)
    rows, width, starts, row_of = row_layout(lengths, padding_free=padding_free,
                                             pad_to_multiple_of=pad_to_multiple_of)

    input_ids, labels, sequence_ids = empty_rows(rows, width, pad_token_id=pad_token_id,
                                                 ignore_index=ignore_index)
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    branch_ids = torch.full((rows, width), PROMPT, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    index: list[list[Tensor]] = [[], []]  # chosen targets, rejected targets (pair order)
    target_labels: list[list[Tensor]] = [[], []]
    for i, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        row, s = row_of[i], starts[i]
        base = row * width + s
        chosen = torch.tensor(pair.chosen_ids, dtype=torch.long)
        rejected = torch.tensor(pair.rejected_ids, dtype=torch.long)
        input_ids[row, s: s + p] = torch.tensor(pair.prompt_ids, dtype=torch.long)
        input_ids[row, s + p: s + p + c] = chosen
        input_ids[row, s + p + c: s + p + c + r] = rejected
        position_ids[row, s: s + p + c] = torch.arange(p + c)
        position_ids[row, s + p + c: s + p + c + r] = torch.arange(p, p + r)
        branch_ids[row, s + p: s + p + c] = CHOSEN
        branch_ids[row, s + p + c: s + p + c + r] = REJECTED
        segment_ids[row, s: s + p + c + r] = i
        sequence_ids[row, s: s + p + c] = i
        sequence_ids[row, s + p + c: s + p + c + r] = num_pairs + i
        # chosen[j] is scored at position p−1+j; rejected[0] at p−1 (the prompt's last token),
        # rejected[j ≥ 1] at p+c+j−1
        labels[row, s + p - 1: s + p + c - 1] = chosen
        labels[row, s + p + c: s + p + c + r - 1] = rejected[1:]
        index[0].append(torch.arange(p - 1, p + c - 1) + base)
        index[1].append(torch.cat([torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)])
                        + base)
        target_labels[0].append(chosen)
        target_labels[1].append(rejected)
    if padding_free and width > total:
        position_ids[0, total:] = torch.arange(width - total)

    completions = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    completion_tokens = torch.tensor(completions, dtype=torch.long)
    sizes = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    laid_out = SequenceRows(
        input_ids=input_ids, attention_mask=None, position_ids=position_ids, labels=labels,
        sequence_ids=sequence_ids, target_index=torch.cat(index[0] + index[1]),
        target_sequence=torch.repeat_interleave(torch.arange(2 * num_pairs), completion_tokens),
        completion_tokens=completion_tokens, num_sequences=2 * num_pairs, packed=padding_free,
        num_tokens=total, max_seqlen=max(lengths), cu_seqlens=None,
        attention_plan=shared_prompt_plan([sizes] if padding_free else [[s] for s in sizes],
                                          width),
        ignore_index=ignore_index)
    shared = SharedPromptRows(target_labels=torch.cat(target_labels[0] + target_labels[1]),
                              segment_ids=segment_ids, branch_ids=branch_ids,
                              prompt_tokens=sum(len(p.prompt_ids) for p in pairs))
    return laid_out, shared


def shared_prompt_attention_mask(batch: PreferenceBatch, model_config: object,
                                 dtype: torch.dtype) -> Tensor:
    """The ``[R, 1, L, L]`` mask of a shared-prompt batch, as the model's attention takes it.

    SDPA gets booleans (True = attend); eager attention an additive mask (0 or the dtype's
    minimum). Padding positions attend to themselves only, so no softmax row is empty.
    """
    impl = getattr(model_config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"share_prompt needs SDPA or eager attention (a custom 4-D mask); the "
                         f"model uses {impl!r}. Load it with attn_implementation='sdpa' or turn "
                         "data.share_prompt off")
    width = batch.input_ids.shape[1]
    window = getattr(model_config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < batch.max_seqlen:
        raise ValueError(f"share_prompt: the model's sliding window ({window} tokens) is shorter "
                         f"than the longest [prompt | chosen | rejected] segment "
                         f"({batch.max_seqlen}); the custom mask would ignore the window")
    if batch.shared_prompt is None:
        raise ValueError("shared_prompt_attention_mask needs a shared-prompt batch "
                         "(collate_pairs(..., share_prompt=True))")
    seg, branch = batch.shared_prompt.segment_ids, batch.shared_prompt.branch_ids
    pos = torch.arange(width, device=seg.device)
    causal = pos[None, :] <= pos[:, None]  # [q, k]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    branch_k = branch[:, None, :]
    visible = (branch_k == PROMPT) | (branch_k == branch[:, :, None])
    allowed = same & visible & causal
    allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)
