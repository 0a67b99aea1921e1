"""Exact pair weighting: every pair (KTO: example) of an optimizer step weighs the same.

A step's micro-batches need not hold the same number of pairs: a token budget
(``max_tokens_per_batch``) cuts them by length, an online round pairs what its scorer ranks,
and ranks can get different shares. Averaging each micro-batch's mean loss would give a pair of
a small micro-batch more weight. Instead the step's counts are taken before its first forward,

    items   Σ over micro-batches and ranks of the pairs (KTO: examples),
    tokens  Σ of the scored tokens of their chosen completions (the NLL / SFT term's unit),

summed across ranks by one all-reduce of a device tensor (no host read), and each micro-batch
backpropagates ``Σ_b ℓ[b] · world_size / items`` (the data-parallel gradient average divides
by ``world_size`` again), with the NLL term per pair taken as −π_c[b] · items / tokens. The
accumulated gradient is then the gradient of the whole step's mean loss, exactly, whatever the
split (``tests/engine/train/test_step_weighting.py``). A MoE router loss, a function of a whole
micro-batch's routing, is averaged over the micro-batches (÷ ``micro_batches`` each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.batch import PreferenceBatch
from .runtime import Runtime


@dataclass(frozen=True)
class StepCounts:
    """The counts of one optimizer step over every micro-batch and rank (device scalars)."""

    items: Tensor  # 0-d float32: pairs (KTO: examples)
    chosen_tokens: Tensor  # 0-d float32: scored tokens of the chosen completions (pairs)
    world_size: int
    micro_batches: int  # per rank (the same on every rank)

    def loss_scale(self) -> Tensor:
        """What a micro-batch's summed per-item losses are multiplied by: ``world_size /
        items`` (the data-parallel average divides by ``world_size``)."""
        return self.world_size / self.items.clamp(min=1.0)

    def tokens_per_pair(self) -> Tensor:
        """The step's mean chosen completion length (the NLL term's normalizer per pair)."""
        return self.chosen_tokens.clamp(min=1.0) / self.items.clamp(min=1.0)


def _local_counts(batch: PreferenceBatch, *, listwise: bool) -> tuple[int, Tensor]:
    if batch.ranked is not None:  # K-way rows: the rule's pairs, or the items (listwise loss)
        chosen = batch.completion_tokens[batch.ranked.pair_chosen].sum()
        return (batch.ranked.num_items if listwise else batch.num_pairs), chosen
    if batch.num_pairs:
        return batch.num_pairs, batch.completion_tokens[:batch.num_pairs].sum()
    return batch.num_examples, batch.completion_tokens[:batch.num_examples].sum()


def step_counts(batches: Sequence[PreferenceBatch], *, runtime: Runtime,
                listwise: bool = False) -> StepCounts:
    """The step's :class:`StepCounts`: this rank's counts (the item count is host knowledge,
    the token counts a device sum), then summed over the ranks (one all-reduce of a device
    tensor, no host synchronization; nothing in one process). ``listwise``: ranked items are
    the unit (a Plackett–Luce loss per item), else pairs."""
    if not batches:
        raise ValueError("an optimizer step needs at least one micro-batch")
    local = [_local_counts(b, listwise=listwise) for b in batches]
    items = sum(n for n, _ in local)
    tokens = torch.stack([t for _, t in local]).sum().float()
    packed = torch.stack([tokens.new_full((), float(items)), tokens])  # a fill, no host copy
    packed = runtime.all_reduce_(packed)
    return StepCounts(items=packed[0], chosen_tokens=packed[1], world_size=runtime.world_size,
                      micro_batches=len(batches))
