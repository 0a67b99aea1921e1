"""The batch type: the tensors of one micro-batch and the host-side bookkeeping of its sequences.

Built by the collate functions (:mod:`.batch` for padded and packed rows, :mod:`.shared_prompt`
for ``[prompt | chosen | rejected]`` rows), read by the forward pass and the losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .segments import SegmentPlan


@dataclass
class PreferenceBatch:
    """Model inputs and bookkeeping for S sequences in R rows of length L."""

    input_ids: Tensor  # [R, L] int64
    attention_mask: Tensor | None  # [R, L] int64 (padded); None when packed
    position_ids: Tensor  # [R, L] int64
    labels: Tensor  # [R, L] int64, already shifted; ignore_index where not scored
    sequence_ids: Tensor  # [R, L] int64, the sequence of each token, -1 for padding
    target_index: Tensor  # [N] int64, flat positions (row · L + t) of the scored labels
    target_sequence: Tensor  # [N] int64, the sequence of each scored label
    completion_tokens: Tensor  # [S] int64, scored tokens per sequence
    num_sequences: int
    num_pairs: int  # B for pairs, 0 for unpaired batches
    packed: bool
    num_tokens: int  # real (non-padding) tokens
    max_seqlen: int  # longest sequence (flash-attention varlen)
    cu_seqlens: Tensor | None = None  # [segments + 1] int32 (packed): sequence starts in the row
    num_examples: int = 0  # unpaired: number of examples (the first sequences)
    num_kl_sequences: int = 0  # unpaired: mismatched KL sequences after the examples
    target_tail: Tensor | None = None  # [N] bool (pairs): completion token past the pair's
    #                                   shared length min(|chosen|, |rejected|) (LD-DPO)
    desirable: Tensor | None = None  # [num_examples] bool (unpaired)
    indices: Tensor | None = None  # [items] int64, dataset indices (for cached reference logps)
    kl_from_dataset: bool = False  # KL partners chosen at dataset level (cacheable)
    ignore_index: int = -100
    # shared-prompt pairs (fastpo.engine.data.shared_prompt): the label of each scored target, and
    # the pair (segment) and branch (0 prompt, 1 chosen, 2 rejected) of each token, -1 = padding
    target_labels: Tensor | None = None  # [N] int64
    shared_prompt_tokens: int = 0  # prompt tokens that run once for both sequences of a pair
    segment_ids: Tensor | None = None  # [R, L] int64
    branch_ids: Tensor | None = None  # [R, L] int64
    # packed and shared-prompt rows: the pieces each row is cut into for segment attention
    # (fastpo.engine.model.attention), so the forward skips the blocks a dense mask would exclude
    attention_plan: SegmentPlan | None = None

    @property
    def num_sequence_tokens(self) -> int:
        """Σ over the sequences of prompt + completion tokens: what a concatenated batch holds
        (equal to ``num_tokens`` unless the prompts are shared); throughput is counted in these."""
        return self.num_tokens + self.shared_prompt_tokens

    @property
    def prompt_shared(self) -> bool:
        """Whether each pair is one ``[prompt | chosen | rejected]`` segment."""
        return self.segment_ids is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PreferenceBatch(**moved)

    def pin_memory(self) -> PreferenceBatch:
        """A copy whose tensors are in page-locked host memory, so that ``.to(cuda,
        non_blocking=True)`` is a true asynchronous copy (from pageable memory it is not)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.pin_memory()
        return PreferenceBatch(**moved)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def check_token_ids(name: str, ids: Sequence[int], where: str) -> None:
    """A list (or other sequence) of token ids, not a string or a scalar: else a TypeError
    naming ``where`` and ``name``."""
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise TypeError(f"{where}: {name} must be a list of token ids, got {type(ids).__name__}")
