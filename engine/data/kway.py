"""K-way rows: one prompt and its K completions in one segment ``[prompt | c₁ | … | c_K]``.

The generalisation of :mod:`.shared_prompt` (a pair is K = 2) to any K ≥ 2, K varying per item.
An item of ``p + Σ n_k`` tokens replaces K sequences of ``p + n_k`` tokens:

- positions: prompt ``0..p−1``; every completion ``p..p+n_k−1`` (each continues the prompt, as if
  alone);
- attention: causal inside the segment, a completion's tokens never seeing another completion's:
  ``allowed(q, k) = same segment ∧ k ≤ q ∧ (branch_k = prompt ∨ branch_k = branch_q)``
  (branch 0 the prompt, ``k`` completion ``k``); segment attention runs ``[prompt | c₁]`` causal
  and each later completion over ``[prompt | c_k]`` (:func:`~.segments.shared_prompt_plan`);
- targets: the hidden state of the prompt's last token scores every completion's first token;
  every other scored position scores one token.

Every completion token sees exactly the keys and positions it sees in its own ``prompt + c_k``
sequence, so each completion's log-probs and every gradient equal those of padded rows up to
float summation order (the prompt's gradient is the sum over the K branches). The prompt goes
through the model once instead of K times — and, against expanding a ranked item into pairs,
instead of ``2·#pairs`` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .preference_batch import (
    SequenceRows,
    SharedPromptRows,
    check_token_ids,
    empty_rows,
    row_layout,
)
from .segments import shared_prompt_plan

PROMPT = 0  # branch id of prompt tokens; completion k (1-based) has branch id k


def kway_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
              sequence_of: Sequence[Sequence[int]], *, pad_token_id: int,
              padding_free: bool = False, pad_to_multiple_of: int | None = None,
              ignore_index: int = -100) -> tuple[SequenceRows, SharedPromptRows]:
    """The rows of items ``[prompts[i] | completions[i][0] | … ]``, one row each (right padding)
    or with ``padding_free`` all in one row, and what such rows add to a batch.

    ``sequence_of[i][k]``: the sequence number of completion ``k`` of item ``i`` (a permutation
    of ``0..S−1`` over all completions); per-sequence results come out in that numbering, the
    targets ordered by sequence. ``target_labels`` holds the label of each scored target (a
    prompt's last position is scored K times, so the ``labels`` grid cannot hold them all).
    """
    if len(prompts) != len(completions) or len(prompts) != len(sequence_of):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completion lists and "
                         f"{len(sequence_of)} sequence numberings")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    for i, (prompt, comps, seqs) in enumerate(zip(prompts, completions, sequence_of)):
        check_token_ids("prompt", prompt, f"item {i}")
        if not prompt:
            raise ValueError(f"item {i} has an empty prompt")
        if len(comps) < 2 or len(comps) != len(seqs):
            raise ValueError(f"item {i}: {len(comps)} completions for {len(seqs)} sequence "
                             "numbers (a shared-prompt row needs at least 2 completions)")
        for k, c in enumerate(comps):
            check_token_ids(f"completion {k}", c, f"item {i}")
            if not c:
                raise ValueError(f"item {i} has an empty completion {k}")
    num_sequences = sum(len(c) for c in completions)
    if sorted(s for seqs in sequence_of for s in seqs) != list(range(num_sequences)):
        raise ValueError(f"the sequence numbers must be a permutation of 0..{num_sequences - 1}")
    lengths = [len(p) + sum(len(c) for c in comps) for p, comps in zip(prompts, completions)]
    total = sum(lengths)
    rows, width, starts, row_of = row_layout(lengths, padding_free=padding_free,
                                             pad_to_multiple_of=pad_to_multiple_of)
    input_ids, labels, sequence_ids = empty_rows(rows, width, pad_token_id=pad_token_id,
                                                 ignore_index=ignore_index)
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    branch_ids = torch.full((rows, width), PROMPT, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    index: list[Tensor] = [torch.empty(0, dtype=torch.long)] * num_sequences
    target_labels: list[Tensor] = [torch.empty(0, dtype=torch.long)] * num_sequences
    counts = [0] * num_sequences
    for i, (prompt, comps, seqs) in enumerate(zip(prompts, completions, sequence_of)):
        p, row, s = len(prompt), row_of[i], starts[i]
        base = row * width + s
        input_ids[row, s: s + p] = torch.tensor(list(prompt), dtype=torch.long)
        position_ids[row, s: s + p] = torch.arange(p)
        segment_ids[row, s: s + lengths[i]] = i
        at = s + p  # where the next completion starts
        for k, (c, seq) in enumerate(zip(comps, seqs)):
            n = len(c)
            ids = torch.tensor(list(c), dtype=torch.long)
            input_ids[row, at: at + n] = ids
            position_ids[row, at: at + n] = torch.arange(p, p + n)
            branch_ids[row, at: at + n] = k + 1
            # c[0] is scored at the prompt's last position, c[j ≥ 1] at the token before it;
            # only the first completion's first label fits the labels grid (the others are in
            # target_labels)
            if k == 0:
                sequence_ids[row, s: at + n] = seq
                labels[row, at - 1: at + n - 1] = ids
            else:
                sequence_ids[row, at: at + n] = seq
                labels[row, at: at + n - 1] = ids[1:]
            index[seq] = torch.cat([torch.tensor([p - 1]),
                                    torch.arange(at - s, at - s + n - 1)]) + base
            target_labels[seq] = ids
            counts[seq] = n
            at += n
    if padding_free and width > total:
        position_ids[0, total:] = torch.arange(width - total)
    completion_tokens = torch.tensor(counts, dtype=torch.long)
    sizes = [(len(p), *(len(c) for c in comps)) for p, comps in zip(prompts, completions)]
    laid_out = SequenceRows(
        input_ids=input_ids, attention_mask=None, position_ids=position_ids, labels=labels,
        sequence_ids=sequence_ids, target_index=torch.cat(index),
        target_sequence=torch.repeat_interleave(torch.arange(num_sequences), completion_tokens),
        completion_tokens=completion_tokens, num_sequences=num_sequences, packed=padding_free,
        num_tokens=total, max_seqlen=max(lengths), cu_seqlens=None,
        attention_plan=shared_prompt_plan([sizes] if padding_free else [[z] for z in sizes],
                                          width),
        ignore_index=ignore_index)
    prompt_tokens = sum((len(comps) - 1) * len(p) for p, comps in zip(prompts, completions))
    shared = SharedPromptRows(target_labels=torch.cat(target_labels), segment_ids=segment_ids,
                              branch_ids=branch_ids, prompt_tokens=prompt_tokens)
    return laid_out, shared
