"""Batches: shifted labels, padded and packed layouts, KTO KL sequences, token-based batching."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from fastpo.engine.data import batch as B
from fastpo.engine.data.dataset import DataStats, TokenizedDataset, TokenizedExample, TokenizedPair
from fastpo.engine.data.segments import CAUSAL
from fastpo.engine.data.segments import PAD as PAD_PIECE

PAD = 0
IGNORE = -100


def make_pairs(lengths: list[tuple[int, int, int]], start: int = 1) -> list[TokenizedPair]:
    """Pairs with distinct token ids, so every id says where it came from."""
    pairs, tok = [], start
    for p, c, r in lengths:
        ids = list(range(tok, tok + p + c + r))
        tok += p + c + r
        pairs.append(TokenizedPair(ids[:p], ids[p:p + c], ids[p + c:]))
    return pairs


def dataset_of(items) -> TokenizedDataset:
    paired = isinstance(items[0], TokenizedPair)
    return TokenizedDataset(items if paired else [], [] if paired else items, DataStats(), {})


def expected_targets(prompt: list[int], completion: list[int]) -> list[tuple[int, int]]:
    """(position, label) of every scored target of one sequence, computed directly."""
    ids = prompt + completion
    return [(t, ids[t + 1]) for t in range(len(prompt) - 1, len(ids) - 1)]


def check_layout(batch: B.PreferenceBatch, sequences: list[tuple[list[int], list[int]]]) -> None:
    """Every sequence sits where sequence_ids say, with exactly its expected targets."""
    width = batch.input_ids.shape[1]
    flat_labels = batch.labels.reshape(-1)
    scored = (flat_labels != IGNORE).nonzero().squeeze(1)
    assert torch.equal(scored, batch.target_index)
    assert torch.equal(batch.target_sequence, batch.sequence_ids.reshape(-1)[scored])
    for s, (prompt, completion) in enumerate(sequences):
        rows, cols = (batch.sequence_ids == s).nonzero(as_tuple=True)
        assert rows.unique().numel() == 1 and cols.tolist() == list(
            range(cols[0], cols[0] + len(prompt) + len(completion)))
        r, start = int(rows[0]), int(cols[0])
        assert batch.input_ids[r, cols].tolist() == prompt + completion
        assert batch.position_ids[r, cols].tolist() == list(range(len(cols)))
        got = [(int(c) - start, int(batch.labels[r, c])) for c in cols
               if batch.labels[r, c] != IGNORE]
        assert got == expected_targets(prompt, completion)
        assert batch.completion_tokens[s] == len(completion)
        assert batch.labels[r, start + len(cols) - 1] == IGNORE  # last position never scored
    pad = batch.sequence_ids < 0
    assert (batch.labels[pad] == IGNORE).all() and (batch.input_ids[pad] == PAD).all()
    assert batch.num_tokens == sum(len(p) + len(c) for p, c in sequences)
    assert flat_labels.numel() == batch.input_ids.shape[0] * width


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("multiple", [None, 8])
def test_collate_pairs_layout(padding_free, multiple):
    pairs = make_pairs([(3, 2, 4), (1, 5, 1), (6, 1, 2)])
    batch = B.collate_pairs(pairs, pad_token_id=PAD, padding_free=padding_free,
                            pad_to_multiple_of=multiple, indices=[7, 3, 5])
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs]
    check_layout(batch, sequences)
    assert (batch.num_pairs, batch.num_sequences, batch.packed) == (3, 6, padding_free)
    assert batch.indices.tolist() == [7, 3, 5]
    lengths = [len(p) + len(c) for p, c in sequences]
    if multiple:
        assert batch.input_ids.shape[1] % multiple == 0
    if padding_free:
        assert batch.input_ids.shape[0] == 1 and batch.attention_mask is None
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        if batch.input_ids.shape[1] > bounds[-1]:
            bounds.append(batch.input_ids.shape[1])
        assert batch.cu_seqlens.tolist() == bounds and batch.cu_seqlens.dtype == torch.int32
        assert batch.max_seqlen == max(b - a for a, b in itertools.pairwise(bounds))
        # segment attention: one causal piece per sequence, in order, then the tail padding
        pieces = batch.attention_plan.rows[0]
        assert [(p.kind, p.length) for p in pieces] == [(CAUSAL, n) for n in lengths] + (
            [(PAD_PIECE, batch.input_ids.shape[1] - sum(lengths))] if len(bounds) > 7 else [])
        assert (batch.sequence_ids[0] >= 0).sum() == sum(lengths)
    else:
        assert batch.input_ids.shape[0] == 6 and batch.attention_plan is None
        assert torch.equal(batch.attention_mask, (batch.sequence_ids >= 0).long())
        assert batch.attention_mask.sum(1).tolist() == lengths


def test_collate_unpaired_kl_sequences():
    examples = [TokenizedExample([1, 2], [3, 4], True), TokenizedExample([5], [6, 7, 8], False),
                TokenizedExample([9, 10, 11], [12], True)]
    batch = B.collate_unpaired(examples, pad_token_id=PAD)
    kl = [[6, 7, 8], [12], [3, 4]]  # next example's completion
    sequences = [(e.prompt_ids, e.completion_ids) for e in examples] + [
        (e.prompt_ids, k) for e, k in zip(examples, kl)]
    check_layout(batch, sequences)
    assert (batch.num_examples, batch.num_kl_sequences, batch.num_pairs) == (3, 3, 0)
    assert batch.desirable.tolist() == [True, False, True]
    plain = B.collate_unpaired(examples, pad_token_id=PAD, with_kl=False, padding_free=True)
    assert plain.num_sequences == 3 and plain.num_kl_sequences == 0

    dataset = dataset_of(examples)
    by_index = B.collate_batch(dataset, [2, 0], pad_token_id=PAD)
    assert by_index.kl_from_dataset and by_index.indices.tolist() == [2, 0]
    # dataset-level partners: the completion of the next example in the dataset
    check_layout(by_index, [([9, 10, 11], [12]), ([1, 2], [3, 4]),
                            ([9, 10, 11], [3, 4]), ([1, 2], [6, 7, 8])])


def test_collate_errors():
    pairs = make_pairs([(2, 2, 2)])
    with pytest.raises(TypeError, match="non-empty list of TokenizedPair"):
        B.collate_pairs([], pad_token_id=PAD)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        B.collate_pairs(pairs, pad_token_id=None)
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        B.collate_pairs([TokenizedPair([], [1], [2])], pad_token_id=PAD)
    with pytest.raises(ValueError, match="sequence 1 has an empty completion"):
        B.collate_pairs([TokenizedPair([1], [1], [])], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        B.collate_pairs(pairs, pad_token_id=PAD, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="2 indices for 1 items"):
        B.collate_pairs(pairs, pad_token_id=PAD, indices=[0, 1])
    with pytest.raises(IndexError, match="index 4 out of range for a dataset of 1"):
        B.collate_batch(dataset_of(pairs), [4], pad_token_id=PAD)


def test_batch_to_device():
    batch = B.collate_pairs(make_pairs([(2, 2, 3)]), pad_token_id=PAD, padding_free=True)
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.cu_seqlens.device.type == "meta"
    assert moved.target_index.device.type == "meta" and batch.input_ids.device.type == "cpu"
    assert (moved.num_pairs, moved.packed, moved.num_tokens) == (1, True, batch.num_tokens)
    assert moved.target_tail.device.type == "meta" and moved.attention_plan is batch.attention_plan


def test_batch_is_built_whole_and_frozen():
    """Every field is set by the collate function that builds the batch; nothing patches it."""
    pairs = B.collate_pairs(make_pairs([(2, 2, 3), (1, 1, 1)]), pad_token_id=PAD)
    assert pairs.num_pairs == 2 and pairs.target_tail.tolist() == [False, False, False,
                                                                    False, False, True, False]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pairs.num_pairs = 3
    examples = [TokenizedExample([1], [2], True), TokenizedExample([3], [4, 5], False)]
    in_batch = B.collate_unpaired(examples, pad_token_id=PAD)
    assert not in_batch.kl_from_dataset and in_batch.target_tail is None
    assert B.collate_batch(dataset_of(examples), [0, 1], pad_token_id=PAD).kl_from_dataset
    assert not B.collate_batch(dataset_of(examples), [0, 1], pad_token_id=PAD,
                               with_kl=False).kl_from_dataset


def test_sdpa_mask_is_block_diagonal_for_packed_position_ids(tiny_config):
    """transformers builds the packed mask from position_ids: causal within each sequence and
    nothing across sequences (pad tail included), exactly when no attention_mask is given."""
    from transformers.masking_utils import create_causal_mask

    batch = B.collate_pairs(make_pairs([(3, 2, 4), (2, 1, 3)]), pad_token_id=PAD,
                            padding_free=True, pad_to_multiple_of=16)
    width = batch.input_ids.shape[1]
    embeds = torch.zeros(1, width, tiny_config.hidden_size)
    mask = create_causal_mask(config=tiny_config, inputs_embeds=embeds, attention_mask=None,
                              past_key_values=None, position_ids=batch.position_ids)
    assert mask is not None and mask.dtype == torch.bool
    segment = torch.zeros(width, dtype=torch.long)
    for k, (a, b) in enumerate(zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])):
        segment[a:b] = k
    q, kv = torch.arange(width)[:, None], torch.arange(width)[None, :]
    expected = (segment[:, None] == segment[None, :]) & (kv <= q)
    assert torch.equal(mask[0, 0], expected)


def test_plan_batches_pairs_and_tokens():
    lengths = [(5 + i % 7, 1 + i % 4, 2 + i % 3) for i in range(23)]
    dataset = dataset_of(make_pairs(lengths))
    everything = list(range(23))

    by_pairs = B.plan_batches(dataset, pairs_per_batch=4, seed=1)
    assert [len(b) for b in by_pairs] == [4] * 5 + [3]
    assert sorted(i for b in by_pairs for i in b) == everything
    assert by_pairs == B.plan_batches(dataset, pairs_per_batch=4, seed=1)
    assert by_pairs != B.plan_batches(dataset, pairs_per_batch=4, seed=1, epoch=1)
    assert B.plan_batches(dataset, pairs_per_batch=4, shuffle=False)[0] == [0, 1, 2, 3]
    assert [len(b) for b in B.plan_batches(dataset, pairs_per_batch=4, drop_last=True)] == [4] * 5

    for padding_free in (True, False):
        budget = 60
        batches = B.plan_batches(dataset, max_tokens_per_batch=budget, seed=2,
                                 padding_free=padding_free)
        assert sorted(i for b in batches for i in b) == everything
        for b in batches:
            collated = B.collate_batch(dataset, b, pad_token_id=PAD, padding_free=padding_free)
            cost = collated.input_ids.numel()  # real tokens when packed, rows × width padded
            assert cost <= budget or len(b) == 1
        # greedy: merging a batch with the first item of the next would exceed the budget
        for b, nxt in itertools.pairwise(batches):
            merged = B.collate_batch(dataset, [*b, nxt[0]], pad_token_id=PAD,
                                     padding_free=padding_free)
            assert merged.input_ids.numel() > budget
    both = B.plan_batches(dataset, pairs_per_batch=2, max_tokens_per_batch=10_000)
    assert all(len(b) <= 2 for b in both)


def test_oversized_item_alone_and_argument_errors(caplog):
    dataset = dataset_of(make_pairs([(2, 1, 1), (40, 5, 5), (2, 1, 1)]))
    batches = B.plan_batches(dataset, max_tokens_per_batch=20, shuffle=False, padding_free=True)
    assert batches == [[0], [1], [2]]
    assert "exceed max_tokens_per_batch=20" in caplog.text
    with pytest.raises(ValueError, match="give pairs_per_batch, max_tokens_per_batch or both"):
        B.plan_batches(dataset)
    with pytest.raises(ValueError, match="pairs_per_batch must be a positive int"):
        B.plan_batches(dataset, pairs_per_batch=0)
    with pytest.raises(ValueError, match="shard_index 2 must be in"):
        B.plan_batches(dataset, pairs_per_batch=1, num_shards=2, shard_index=2)


def test_plan_is_deterministic_in_seed_and_epoch_and_shards():
    """A resumed epoch re-plans it from (seed, epoch) and skips the batches already run: the
    plan must come out the same every time, and another epoch must give another order."""
    dataset = dataset_of(make_pairs([(3, 2, 2)] * 11))
    full = B.plan_batches(dataset, pairs_per_batch=2, seed=5, epoch=3)
    assert full == B.plan_batches(dataset, pairs_per_batch=2, seed=5, epoch=3)
    assert full != B.plan_batches(dataset, pairs_per_batch=2, seed=5, epoch=4)
    assert sorted(i for b in full for i in b) == list(range(11))
    shards = [B.plan_batches(dataset, pairs_per_batch=2, seed=5, epoch=3, num_shards=2,
                             shard_index=k) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # 6 batches, cut to a multiple of 2
    assert shards[0] == full[0:6:2] and shards[1] == full[1:6:2]
