"""Batches: chosen and rejected of B pairs as one batch of 2B sequences, padded or packed.

Sequence ``s`` is ``prompt + completion`` (``n_s`` tokens, prompt ``p_s``). Labels are shifted
once, here: ``labels[t] = input_ids[t + 1]`` for the completion targets ``t ∈ [p_s − 1, n_s − 2]``
and ``ignore_index`` everywhere else (prompt, padding, the last position), so a model's hidden
state (or logits) at position ``t`` is scored against ``labels[t]`` with no further shifting.

- Padded: one row per sequence, right padding, ``attention_mask`` marks real tokens.
- Packed (padding-free): every sequence in one row, ``position_ids`` restarting at 0 per
  sequence and no attention mask. transformers (checked against 5.23) detects the packed
  sequences from the position ids when ``attention_mask`` is None and no cache is passed, and
  builds a block-diagonal causal mask for SDPA/eager; flash-attention 2 gets ``cu_seqlens``
  (``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs) from :attr:`PreferenceBatch.cu_seqlens`.

Pairs: sequences ``0..B−1`` are the chosen, ``B..2B−1`` the rejected. Unpaired (KTO): ``0..B−1``
the examples, then (optionally) ``B..2B−1`` the mismatched prompt/completion sequences for KTO's
KL estimate. Everything the forward needs to pick the scored positions (``target_index``,
``target_sequence``, ``completion_tokens``) is computed here on the host, so the forward never
reads a tensor back.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor

from .dataset import TokenizedDataset, TokenizedExample, TokenizedPair
from .kway import kway_rows
from .preference_batch import (
    PreferenceBatch,
    SequenceRows,
    check_token_ids,
    empty_rows,
    row_layout,
)
from .ranked import TokenizedRanked, ranked_groups
from .sampler import length_grouped_order, shuffle_batches
from .segments import packed_plan
from .shared_prompt import shared_prompt_rows

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_ITEMS = 4  # items per micro-batch assumed by a length-grouping window under a
#                           token budget alone (no item cap)


def sequence_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                  pad_token_id: int, padding_free: bool = False,
                  pad_to_multiple_of: int | None = None, ignore_index: int = -100
                  ) -> SequenceRows:
    """Lay out ``prompts[s] + completions[s]`` sequences: one padded row each, or all in one
    packed row (``padding_free``)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    lengths, prompt_lengths = [], []
    for s, (prompt, completion) in enumerate(zip(prompts, completions)):
        check_token_ids("prompt", prompt, f"sequence {s}")
        check_token_ids("completion", completion, f"sequence {s}")
        if not prompt:
            raise ValueError(f"sequence {s} has an empty prompt: its first completion token "
                             "could not be scored")
        if not completion:
            raise ValueError(f"sequence {s} has an empty completion")
        prompt_lengths.append(len(prompt))
        lengths.append(len(prompt) + len(completion))

    num_sequences = len(lengths)
    total = sum(lengths)
    rows, width, starts, row_of = row_layout(lengths, padding_free=padding_free,
                                             pad_to_multiple_of=pad_to_multiple_of)

    input_ids, labels, sequence_ids = empty_rows(rows, width, pad_token_id=pad_token_id,
                                                 ignore_index=ignore_index)
    if padding_free:
        position_ids = torch.empty((1, width), dtype=torch.long)
    else:
        position_ids = torch.arange(width, dtype=torch.long).expand(rows, width).clone()
    target_index: list[Tensor] = []
    for s in range(num_sequences):
        r, start, n, p = row_of[s], starts[s], lengths[s], prompt_lengths[s]
        ids = torch.tensor([*prompts[s], *completions[s]], dtype=torch.long)
        input_ids[r, start: start + n] = ids
        labels[r, start + p - 1: start + n - 1] = ids[p:]
        sequence_ids[r, start: start + n] = s
        if padding_free:
            position_ids[0, start: start + n] = torch.arange(n)
        target_index.append(torch.arange(start + p - 1, start + n - 1) + r * width)

    cu_seqlens = attention_plan = None
    max_seqlen = max(lengths)
    attention_mask = None
    if padding_free:
        tail = width - total  # padding after the last sequence: its own segment, never scored
        if tail:
            position_ids[0, total:] = torch.arange(tail)
            max_seqlen = max(max_seqlen, tail)
        bounds = [0, *(st + n for st, n in zip(starts, lengths))] + ([width] if tail else [])
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        attention_plan = packed_plan(lengths, width)
    else:
        attention_mask = (sequence_ids >= 0).long()
    completion_tokens = torch.tensor([n - p for n, p in zip(lengths, prompt_lengths)],
                                     dtype=torch.long)
    return SequenceRows(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        labels=labels, sequence_ids=sequence_ids, target_index=torch.cat(target_index),
        target_sequence=torch.repeat_interleave(torch.arange(num_sequences), completion_tokens),
        completion_tokens=completion_tokens, num_sequences=num_sequences, packed=padding_free,
        num_tokens=total, max_seqlen=max_seqlen, cu_seqlens=cu_seqlens,
        attention_plan=attention_plan, ignore_index=ignore_index)


def pair_tail(completion_lengths: Sequence[int], num_pairs: int) -> Tensor:
    """LD-DPO's ``target_tail`` of a pair batch whose completions (chosen ``0..B−1``, then
    rejected) have these lengths: True for a token past ``min(|chosen|, |rejected|)``."""
    shared = [min(c, r) for c, r in zip(completion_lengths[:num_pairs],
                                        completion_lengths[num_pairs:])] * 2
    return torch.cat([torch.arange(n) >= m for n, m in zip(completion_lengths, shared)])


def collate_pairs(pairs: Sequence[TokenizedPair], *, pad_token_id: int,
                  padding_free: bool = False, pad_to_multiple_of: int | None = None,
                  indices: Sequence[int] | None = None, ignore_index: int = -100,
                  share_prompt: bool = False) -> PreferenceBatch:
    """One batch of 2B sequences: the B chosen (``0..B−1``), then the B rejected.

    ``share_prompt``: each pair as one ``[prompt | chosen | rejected]`` segment, so the prompt
    runs once (see :mod:`fastpo.engine.data.shared_prompt`).
    """
    if not pairs or not all(isinstance(p, TokenizedPair) for p in pairs):
        raise TypeError("collate_pairs needs a non-empty list of TokenizedPair")
    index = _indices(indices, len(pairs))
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    tail = pair_tail([len(c) for c in completions], len(pairs))
    if share_prompt:
        rows, shared = shared_prompt_rows(pairs, pad_token_id=pad_token_id,
                                          padding_free=padding_free,
                                          pad_to_multiple_of=pad_to_multiple_of,
                                          ignore_index=ignore_index)
    else:
        rows = sequence_rows([p.prompt_ids for p in pairs] * 2, completions,
                             pad_token_id=pad_token_id, padding_free=padding_free,
                             pad_to_multiple_of=pad_to_multiple_of, ignore_index=ignore_index)
        shared = None
    return PreferenceBatch(**rows._asdict(), indices=index, num_pairs=len(pairs),
                           target_tail=tail, shared_prompt=shared)


def collate_ranked(items: Sequence[TokenizedRanked], *, pad_token_id: int, pairs: str = "all",
                   margin: float = 0.0, padding_free: bool = False, share_prompt: bool = False,
                   pad_to_multiple_of: int | None = None, indices: Sequence[int] | None = None,
                   ignore_index: int = -100) -> PreferenceBatch:
    """One batch of ranked items (:mod:`.ranked`): their ``ΣK`` completions as sequences
    (item-major) and the pairs of ``pairs``/``margin`` as indices into them. ``share_prompt``:
    one K-way row ``[prompt | c₁ | … | c_K]`` per item (:mod:`.kway`; with ``padding_free`` all
    in one row), else one ``prompt + c_k`` sequence per completion (padded or packed)."""
    if not items or not all(isinstance(it, TokenizedRanked) for it in items):
        raise TypeError("collate_ranked needs a non-empty list of TokenizedRanked")
    index = _indices(indices, len(items))
    groups = ranked_groups(items, pairs=pairs, margin=margin, indices=indices)
    if share_prompt:
        numbering, start = [], 0
        for it in items:
            numbering.append(range(start, start + len(it.completions)))
            start += len(it.completions)
        rows, shared = kway_rows([it.prompt_ids for it in items],
                                 [it.completions for it in items], numbering,
                                 pad_token_id=pad_token_id, padding_free=padding_free,
                                 pad_to_multiple_of=pad_to_multiple_of, ignore_index=ignore_index)
    else:
        rows = sequence_rows([it.prompt_ids for it in items for _ in it.completions],
                             [c for it in items for c in it.completions],
                             pad_token_id=pad_token_id, padding_free=padding_free,
                             pad_to_multiple_of=pad_to_multiple_of, ignore_index=ignore_index)
        shared = None
    return PreferenceBatch(**rows._asdict(), indices=index,
                           num_pairs=int(groups.pair_chosen.numel()), shared_prompt=shared,
                           ranked=groups)


def collate_unpaired(examples: Sequence[TokenizedExample], *, pad_token_id: int,
                     padding_free: bool = False, pad_to_multiple_of: int | None = None,
                     with_kl: bool = True, kl_completions: Sequence[Sequence[int]] | None = None,
                     indices: Sequence[int] | None = None, ignore_index: int = -100,
                     kl_from_dataset: bool = False) -> PreferenceBatch:
    """KTO batch: the B examples, then (``with_kl``) B mismatched KL sequences.

    KL sequence ``i`` is prompt ``i`` with ``kl_completions[i]``; by default the completion of
    the next example in the batch (``(i + 1) mod B``), as TRL does. ``kl_from_dataset``: the
    ``kl_completions`` are the dataset-level partners (:func:`kl_partner`), which a reference
    cache can serve.
    """
    if not examples or not all(isinstance(e, TokenizedExample) for e in examples):
        raise TypeError("collate_unpaired needs a non-empty list of TokenizedExample")
    index = _indices(indices, len(examples))
    prompts = [e.prompt_ids for e in examples]
    completions = [e.completion_ids for e in examples]
    num_kl = 0
    if with_kl:
        if kl_completions is None:
            kl_completions = completions[1:] + completions[:1]
        elif len(kl_completions) != len(examples):
            raise ValueError(f"{len(kl_completions)} KL completions for {len(examples)} examples")
        prompts, completions = prompts * 2, completions + list(kl_completions)
        num_kl = len(examples)
    rows = sequence_rows(prompts, completions, pad_token_id=pad_token_id,
                         padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of,
                         ignore_index=ignore_index)
    return PreferenceBatch(**rows._asdict(), indices=index, num_examples=len(examples),
                           num_kl_sequences=num_kl,
                           desirable=torch.tensor([e.label for e in examples], dtype=torch.bool),
                           kl_from_dataset=with_kl and kl_from_dataset)


def _indices(indices: Sequence[int] | None, n: int) -> Tensor | None:
    if indices is None:
        return None
    if len(indices) != n:
        raise ValueError(f"{len(indices)} indices for {n} items")
    return torch.tensor(list(indices), dtype=torch.long)


def kl_partner(index: int, size: int) -> int:
    """Dataset-level KL partner of an unpaired example: the completion of the next example."""
    return (index + 1) % size


def collate_batch(dataset: TokenizedDataset, indices: Sequence[int], *, pad_token_id: int,
                  padding_free: bool = False, pad_to_multiple_of: int | None = None,
                  with_kl: bool = True, ignore_index: int = -100,
                  share_prompt: bool = False) -> PreferenceBatch:
    """Collate dataset items by index (pairs, or KTO examples with dataset-level KL partners).

    ``share_prompt`` applies to pairs (see :func:`collate_pairs`) and ranked items (K-way rows,
    :func:`collate_ranked`, with the dataset's pair rule); unpaired data ignores it.
    """
    if not indices:
        raise ValueError("cannot collate an empty batch")
    n = len(dataset)
    for i in indices:
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
    items = [dataset[i] for i in indices]
    if dataset.is_ranked:  # the pair rule travels with the dataset (with_pair_rule)
        return collate_ranked(items, pad_token_id=pad_token_id,
                              pairs=dataset.settings.get("pairs", "all"),
                              margin=dataset.settings.get("pair_margin", 0.0),
                              padding_free=padding_free, share_prompt=share_prompt,
                              pad_to_multiple_of=pad_to_multiple_of, indices=indices,
                              ignore_index=ignore_index)
    if dataset.paired:
        return collate_pairs(items, pad_token_id=pad_token_id, padding_free=padding_free,
                             pad_to_multiple_of=pad_to_multiple_of, indices=indices,
                             ignore_index=ignore_index, share_prompt=share_prompt)
    kl = [dataset.examples[kl_partner(i, n)].completion_ids for i in indices] if with_kl else None
    return collate_unpaired(items, pad_token_id=pad_token_id, padding_free=padding_free,
                            pad_to_multiple_of=pad_to_multiple_of, with_kl=with_kl,
                            kl_completions=kl, indices=indices, ignore_index=ignore_index,
                            kl_from_dataset=True)


# ------------------------------------------------------------------------------ batching
def _item_shapes(dataset: TokenizedDataset, with_kl: bool, share_prompt: bool = False
                 ) -> list[tuple[int, int, int]]:
    """(real tokens, longest row segment, rows) of each item as it will be collated."""
    shapes = []
    if dataset.is_ranked:
        for it in dataset.ranked:
            p, sizes = len(it.prompt_ids), [len(c) for c in it.completions]
            if share_prompt:  # one K-way row
                n = p + sum(sizes)
                shapes.append((n, n, 1))
            else:
                shapes.append((len(sizes) * p + sum(sizes), p + max(sizes), len(sizes)))
        return shapes
    if dataset.paired:
        for p in dataset.pairs:
            if share_prompt:
                n = len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                shapes.append((n, n, 1))
                continue
            n_c = len(p.prompt_ids) + len(p.chosen_ids)
            n_r = len(p.prompt_ids) + len(p.rejected_ids)
            shapes.append((n_c + n_r, max(n_c, n_r), 2))
        return shapes
    n = len(dataset)
    for i, e in enumerate(dataset.examples):
        length = len(e.prompt_ids) + len(e.completion_ids)
        if with_kl:
            kl = len(e.prompt_ids) + len(dataset.examples[kl_partner(i, n)].completion_ids)
            shapes.append((length + kl, max(length, kl), 2))
        else:
            shapes.append((length, length, 1))
    return shapes


def rank_share(batches: Sequence[list[int]], *, rank: int,
               world_size: int) -> list[tuple[list[int], bool]]:
    """Rank ``rank``'s share of ``batches`` (every ``world_size``-th), as (batch, counts) pairs.

    Ranks with fewer batches repeat the first one with ``counts`` False (its results are not
    added), so that every rank runs the same number of forwards: ZeRO-3 gathers are collective.
    """
    per_rank = math.ceil(len(batches) / world_size)
    mine = [(list(b), True) for b in batches[rank::world_size]]
    while len(mine) < per_rank:
        mine.append((list(batches[0]), False))
    return mine


def plan_batches(dataset: TokenizedDataset, *, pairs_per_batch: int | None = None,
                 max_tokens_per_batch: int | None = None, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, padding_free: bool = False, with_kl: bool = True,
                 drop_last: bool = False, num_shards: int = 1, shard_index: int = 0,
                 share_prompt: bool = False, group_by_length: int | None = None
                 ) -> list[list[int]]:
    """All batches of one epoch, as lists of dataset indices (deterministic in seed and epoch).

    Items (pairs or examples) are taken in a seeded random order (or in order) and grouped while
    the batch holds at most ``pairs_per_batch`` items and at most ``max_tokens_per_batch``
    tokens, counted as collated: real tokens when ``padding_free``, else rows × padded length.
    An item larger than the token budget forms a batch alone. ``drop_last`` drops a final batch
    with fewer than ``pairs_per_batch`` items. With ``num_shards`` > 1 (data-parallel ranks) the
    batch list is cut to a multiple of ``num_shards`` and shard ``k`` gets batches ``k, k + n, …``.
    ``share_prompt`` counts a pair as one ``[prompt | chosen | rejected]`` row.
    ``group_by_length`` (a window, in micro-batches): items of similar length are batched together
    within each window of the shuffle, and the batches shuffled (:mod:`fastpo.engine.data.sampler`).
    """
    for name, value in (("pairs_per_batch", pairs_per_batch),
                        ("max_tokens_per_batch", max_tokens_per_batch)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if pairs_per_batch is None and max_tokens_per_batch is None:
        raise ValueError("give pairs_per_batch, max_tokens_per_batch or both")
    if not isinstance(num_shards, int) or num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index!r} must be in [0, num_shards={num_shards!r})")
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(f"fastpo-batches:{seed}:{epoch}").shuffle(order)
    shapes = _item_shapes(dataset, with_kl, share_prompt)
    if group_by_length is not None:  # windows of global batches: the same for every world size
        window = group_by_length * (pairs_per_batch or DEFAULT_WINDOW_ITEMS) * num_shards
        order = length_grouped_order(order, lambda i: shapes[i][1], window=window)

    batches: list[list[int]] = []
    current: list[int] = []
    real = longest = rows = 0
    oversized = 0
    for i in order:
        tokens, length, seqs = shapes[i]
        new_real, new_longest, new_rows = real + tokens, max(longest, length), rows + seqs
        cost = new_real if padding_free else new_rows * new_longest
        full = pairs_per_batch is not None and len(current) >= pairs_per_batch
        over = max_tokens_per_batch is not None and cost > max_tokens_per_batch
        if current and (full or over):
            batches.append(current)
            current, new_real, new_longest, new_rows = [], tokens, length, seqs
            cost = new_real if padding_free else new_rows * new_longest
        if max_tokens_per_batch is not None and not current and cost > max_tokens_per_batch:
            oversized += 1
        current.append(i)
        real, longest, rows = new_real, new_longest, new_rows
    if current:
        batches.append(current)
    if drop_last and pairs_per_batch is not None and batches and len(batches[-1]) < pairs_per_batch:
        batches.pop()
    if oversized:
        logger.warning("%d item(s) exceed max_tokens_per_batch=%d alone and form their own "
                       "batches", oversized, max_tokens_per_batch)
    batches = batches[: len(batches) - len(batches) % num_shards]  # whole global batches
    if group_by_length is not None and shuffle:
        batches = shuffle_batches(batches, seed=seed, epoch=epoch, group=num_shards)
    if num_shards > 1:
        batches = batches[shard_index::num_shards]
    return batches

