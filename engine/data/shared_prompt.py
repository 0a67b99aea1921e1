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

The rows are the K = 2 case of :mod:`.kway`. Each completion token therefore sees exactly the
context it sees in the concatenated batch, with the same positions, so log-probs and gradients are
the same (the prompt's gradient is the sum of the two branches', as before) — up to float summation
order. The model processes ``p + c + r`` tokens per pair instead of ``2p + c + r``. Used by
``collate_pairs(..., share_prompt=True)``; SDPA (segment attention,
:mod:`fastpo.engine.model.attention`: ``[prompt | chosen]`` causal, then the rejected tokens over
``[prompt | rejected]``, no mask over the whole row) and eager attention (a custom 4-D mask, also
SDPA's fallback); not flash-attention, whose varlen kernel has no such mask, nor sliding-window
layers shorter than the segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dataset import TokenizedPair
from .kway import PROMPT, kway_rows
from .preference_batch import PreferenceBatch, SequenceRows, SharedPromptRows, check_token_ids

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
    b = len(pairs)
    return kway_rows([p.prompt_ids for p in pairs], [(p.chosen_ids, p.rejected_ids) for p in pairs],
                     [(i, b + i) for i in range(b)], pad_token_id=pad_token_id,
                     padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of,
                     ignore_index=ignore_index)


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
