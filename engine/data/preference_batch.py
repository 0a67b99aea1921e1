"""The batch type: the tensors of one micro-batch and the host-side bookkeeping of its sequences.

Built by the collate functions (:mod:`.batch` for padded and packed rows, :mod:`.shared_prompt`
for ``[prompt | chosen | rejected]`` rows, :mod:`.ranked` for ranked items, in K-way rows
``[prompt | c₁ | … | c_K]`` or one sequence per completion), read by the forward pass and the
losses.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .segments import SegmentPlan


@dataclass(frozen=True)
class SharedPromptRows:
    """What a batch of ``[prompt | chosen | rejected]`` rows adds (:mod:`.shared_prompt`): the
    label of each scored target (a prompt's last position scores two tokens, so the ``labels``
    grid cannot hold them all), the pair (segment) and branch (0 prompt, 1 chosen, 2 rejected) of
    each token (-1 = padding), and the prompt tokens that run once for both sequences."""

    target_labels: Tensor  # [N] int64
    segment_ids: Tensor  # [R, L] int64
    branch_ids: Tensor  # [R, L] int64
    prompt_tokens: int


@dataclass(frozen=True)
class RankedGroups:
    """What a batch of ranked items adds (:mod:`.ranked`): its K completions per item are
    sequences ``offsets[i]..offsets[i+1]−1`` (item-major), and the training signal is read off
    the per-sequence results by index, never by expanding rows:

    - ``pair_chosen`` / ``pair_rejected`` ``[P]``: the sequences of the pairs the pair rule chose
      (``PreferenceBatch.num_pairs`` = P), ``pair_item`` ``[P]`` the item of each;
    - ``order`` ``[I, K_max]``: each item's sequences from best to worst score, -1 past its K
      (the Plackett–Luce ranking; ties kept in the data's order);
    - ``strict_*`` ``[Q]``: every pair of an item with a strictly higher score, for the
      full-ranking accuracy (an item is ranked right when its implicit rewards order all of them).

    ``dataset_indices`` and ``counts`` are the host copies a reference cache reads (no sync)."""

    pair_chosen: Tensor  # [P] int64
    pair_rejected: Tensor  # [P] int64
    pair_item: Tensor  # [P] int64
    order: Tensor  # [I, K_max] int64, -1 = no completion
    strict_better: Tensor  # [Q] int64
    strict_worse: Tensor  # [Q] int64
    strict_item: Tensor  # [Q] int64
    scores: Tensor  # [S] float64
    num_items: int
    counts: tuple[int, ...]  # K of each item
    dataset_indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PreferenceBatch:
    """Model inputs and bookkeeping for S sequences in R rows of length L, built once, whole."""

    input_ids: Tensor  # [R, L] int64
    attention_mask: Tensor | None  # [R, L] int64 (padded); None when packed or prompt-shared
    position_ids: Tensor  # [R, L] int64
    labels: Tensor  # [R, L] int64, already shifted; ignore_index where not scored
    sequence_ids: Tensor  # [R, L] int64, the sequence of each token, -1 for padding
    target_index: Tensor  # [N] int64, flat positions (row · L + t) of the scored labels
    target_sequence: Tensor  # [N] int64, the sequence of each scored label
    completion_tokens: Tensor  # [S] int64, scored tokens per sequence
    num_sequences: int
    packed: bool
    num_tokens: int  # real (non-padding) tokens
    max_seqlen: int  # longest sequence (flash-attention varlen)
    cu_seqlens: Tensor | None = None  # [segments + 1] int32 (packed): sequence starts in the row
    # packed and shared-prompt rows: the pieces each row is cut into for segment attention
    # (fastpo.engine.model.attention), so the forward skips the blocks a dense mask would exclude
    attention_plan: SegmentPlan | None = None
    ignore_index: int = -100
    indices: Tensor | None = None  # [items] int64, dataset indices (for cached reference logps)
    # pairs: sequences 0..B-1 chosen, B..2B-1 rejected
    num_pairs: int = 0  # B for pairs, 0 for unpaired batches
    target_tail: Tensor | None = None  # [N] bool: completion token past the pair's shared
    #                                   length min(|chosen|, |rejected|) (LD-DPO)
    # unpaired (KTO): the examples first, then their mismatched KL sequences
    num_examples: int = 0
    num_kl_sequences: int = 0
    desirable: Tensor | None = None  # [num_examples] bool
    kl_from_dataset: bool = False  # KL partners chosen at dataset level (cacheable)
    shared_prompt: SharedPromptRows | None = None
    ranked: RankedGroups | None = None  # ranked items: K completions each, pairs by index

    @property
    def num_sequence_tokens(self) -> int:
        """Σ over the sequences of prompt + completion tokens: what a concatenated batch holds
        (equal to ``num_tokens`` unless the prompts are shared); throughput is counted in these."""
        shared = self.shared_prompt.prompt_tokens if self.shared_prompt is not None else 0
        return self.num_tokens + shared

    @property
    def prompt_shared(self) -> bool:
        """Whether each pair is one ``[prompt | chosen | rejected]`` segment."""
        return self.shared_prompt is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """A copy with every tensor on ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PreferenceBatch:
        """A copy whose tensors are in page-locked host memory, so that ``.to(cuda,
        non_blocking=True)`` is a true asynchronous copy (from pageable memory it is not)."""
        return _map_tensors(self, Tensor.pin_memory)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor field, also inside its typed parts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (PreferenceBatch, SharedPromptRows, RankedGroups)):
        return dataclasses.replace(value, **{
            f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)})
    return value


def check_token_ids(name: str, ids: Sequence[int], where: str) -> None:
    """A list (or other sequence) of token ids, not a string or a scalar: else a TypeError
    naming ``where`` and ``name``."""
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise TypeError(f"{where}: {name} must be a list of token ids, got {type(ids).__name__}")


class SequenceRows(NamedTuple):
    """The rows of S ``prompt + completion`` sequences: every :class:`PreferenceBatch` field that
    does not depend on what the sequences are (pairs or unpaired examples)."""

    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor
    labels: Tensor
    sequence_ids: Tensor
    target_index: Tensor
    target_sequence: Tensor
    completion_tokens: Tensor
    num_sequences: int
    packed: bool
    num_tokens: int
    max_seqlen: int
    cu_seqlens: Tensor | None
    attention_plan: SegmentPlan | None
    ignore_index: int


def empty_rows(rows: int, width: int, *, pad_token_id: int, ignore_index: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids`` (``pad_token_id``), ``labels`` (``ignore_index``) and ``sequence_ids`` (-1):
    the int64 ``[rows, width]`` buffers a collate function fills."""
    return (torch.full((rows, width), pad_token_id, dtype=torch.long),
            torch.full((rows, width), ignore_index, dtype=torch.long),
            torch.full((rows, width), -1, dtype=torch.long))


def row_layout(lengths: Sequence[int], *, padding_free: bool, pad_to_multiple_of: int | None
               ) -> tuple[int, int, list[int], list[int]]:
    """(rows, width, start of each item in its row, row of each item) for items of ``lengths``
    tokens: one right-padded row each, or with ``padding_free`` all of them in one row; the width
    rounded up to a multiple of ``pad_to_multiple_of`` (None or a positive int)."""
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int)
                                           or isinstance(pad_to_multiple_of, bool)
                                           or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    multiple = pad_to_multiple_of or 1
    n = len(lengths)
    if padding_free:
        starts = list(itertools.accumulate(lengths[:-1], initial=0))
        return 1, -(-sum(lengths) // multiple) * multiple, starts, [0] * n
    return n, -(-max(lengths) // multiple) * multiple, [0] * n, list(range(n))
