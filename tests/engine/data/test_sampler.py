"""Length-aware batching: similar lengths share a micro-batch, seeded, resumable, sharded."""

from __future__ import annotations

import random

import pytest

from fastpo.engine.data import batch as B
from fastpo.engine.data.dataset import DataStats, TokenizedDataset, TokenizedPair
from fastpo.engine.data.sampler import length_grouped_order, padding_fraction, shuffle_batches
from fastpo.engine.train.config import TrainConfig


def ragged(n: int = 240, seed: int = 5) -> TokenizedDataset:
    rng = random.Random(seed)
    pairs = [TokenizedPair([1] * rng.randint(1, 60), [2] * rng.randint(1, 200),
                           [3] * rng.randint(1, 200)) for _ in range(n)]
    return TokenizedDataset(pairs, [], DataStats(), {})


def test_windows_are_sorted_longest_first_and_nothing_is_lost():
    order = [5, 3, 9, 0, 7, 1, 8]
    length = {5: 1, 3: 4, 9: 4, 0: 2, 7: 9, 1: 0, 8: 3}.__getitem__
    # windows of 3: [5, 3, 9] → 3, 9 (tie: shuffled order kept), 5; [0, 7, 1] → 7, 0, 1; [8]
    assert length_grouped_order(order, length, window=3) == [3, 9, 5, 7, 0, 1, 8]
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        length_grouped_order(order, length, window=0)
    batches = [[1], [2], [3], [4]]
    assert shuffle_batches(batches, seed=1, epoch=0) == shuffle_batches(batches, seed=1, epoch=0)
    assert sorted(shuffle_batches(batches, seed=1, epoch=0)) == batches


@pytest.mark.parametrize("share_prompt", [False, True])
def test_grouping_cuts_padding_and_is_deterministic_and_resumable(share_prompt):
    data = ragged()
    kw = dict(pairs_per_batch=4, seed=3, share_prompt=share_prompt)
    plain = B.plan_batches(data, epoch=0, **kw)
    grouped = B.plan_batches(data, epoch=0, group_by_length=10, **kw)
    shapes = B._item_shapes(data, True, share_prompt)
    # every item once, in batches of 4
    assert sorted(i for b in grouped for i in b) == list(range(len(data)))
    assert all(len(b) == 4 for b in grouped)
    before, after = padding_fraction(plain, shapes), padding_fraction(grouped, shapes)
    assert after < 0.7 * before, (before, after)  # chosen and rejected rows of a pair still differ
    # seeded: the same plan again, another one next epoch; long batches are not all first
    assert grouped == B.plan_batches(data, epoch=0, group_by_length=10, **kw)
    assert grouped != B.plan_batches(data, epoch=1, group_by_length=10, **kw)
    longest = [max(shapes[i][1] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)
    # a resumed run re-plans its epoch (the same plan, above) and continues at its saved index
    # data-parallel shards share the items out, each once (the global batches: the test below)
    shards = [B.plan_batches(data, epoch=0, group_by_length=10, num_shards=2, shard_index=k,
                             **kw) for k in (0, 1)]
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(data)))


def test_grouping_under_a_token_budget_and_in_order():
    data = ragged(120)
    grouped = B.plan_batches(data, max_tokens_per_batch=2000, seed=0, group_by_length=5)
    assert sorted(i for b in grouped for i in b) == list(range(len(data)))
    plain = B.plan_batches(data, max_tokens_per_batch=2000, seed=0)
    assert len(grouped) < len(plain)  # similar lengths fill the budget with less padding
    # without shuffling, the order is sorted windows of the dataset order, batches in order
    ordered = B.plan_batches(data, pairs_per_batch=4, shuffle=False, group_by_length=2)
    shapes = B._item_shapes(data, True)
    first = [i for b in ordered[:2] for i in b]
    assert first == sorted(range(8), key=lambda i: shapes[i][1], reverse=True)


def test_config_turns_grouping_on_for_padded_rows_only():
    def data(**kw):
        cfg = TrainConfig.model_validate({"data": kw}).data
        return cfg

    padded = data(layout="padded", padding_free=False)
    assert padded.length_grouping() == 50
    assert data(padding_free=True).length_grouping() is None
    assert data(padding_free=True, group_by_length=True, length_window=7).length_grouping() == 7
    assert data(padding_free=False, group_by_length=False).length_grouping() is None
    with pytest.raises(ValueError, match="length_window"):
        data(length_window=0)


@pytest.mark.parametrize("group_by_length", [None, 10])
def test_every_world_size_draws_the_same_global_batches(group_by_length):
    """One process with micro-batches of 4 and 2 ranks with 2 each (or 4 ranks with 1): the same
    items in each global step, in the same order, grouped by length or not."""
    data = ragged(n=96)
    kw = dict(seed=3, epoch=1, group_by_length=group_by_length)
    single = B.plan_batches(data, pairs_per_batch=4, **kw)
    for world in (2, 4):
        shards = [B.plan_batches(data, pairs_per_batch=4 // world, num_shards=world,
                                 shard_index=k, **kw) for k in range(world)]
        steps = [sorted(i for shard in shards for i in shard[j]) for j in range(len(shards[0]))]
        assert steps == [sorted(b) for b in single], world
