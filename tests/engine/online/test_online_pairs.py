"""Pair formation from a [P, K] score matrix: best/worst, all pairs above a margin, ties,
identical completions, and the items the offline path collates."""

from __future__ import annotations

import math

import pytest
import torch

from fastpo.engine.data.dataset import TokenizedPair
from fastpo.engine.online.pairs import form_pairs, pairs_dataset, pairs_to_items


def test_best_worst_picks_max_and_min_and_skips_ties():
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.3],
                           [2.0, 2.0, 2.0, 2.0],     # all equal: a tie
                           [1.0, 3.0, 3.0, 1.0]])    # equal max and min: lowest index wins
    selection = form_pairs(scores, rule="best_worst")
    assert selection.pairs == [(0, 1, 2), (2, 1, 0)]
    assert selection.chosen_scores == pytest.approx([0.9, 3.0])
    assert selection.rejected_scores == pytest.approx([-0.5, 1.0])
    assert (selection.tied, selection.below_margin, selection.identical) == (1, 0, 0)
    assert selection.skipped_prompts == [1]
    assert selection.tie_fraction == pytest.approx(1 / 3)
    assert len(selection) == 2


def test_best_worst_margin_is_strict():
    scores = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.0, 0.25]])
    selection = form_pairs(scores, rule="best_worst", margin=0.5)
    assert selection.pairs == [(0, 1, 0)]  # a gap of exactly the margin does not pair
    assert (selection.tied, selection.below_margin) == (0, 2)
    assert selection.skipped_prompts == [1, 2]


def test_all_above_margin_orders_by_gap_then_index():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 0.2], [4.0, 4.0, 4.0]])
    selection = form_pairs(scores, rule="all_above_margin", margin=0.25)
    assert selection.pairs == [(0, 2, 0), (0, 1, 0), (0, 2, 1), (1, 1, 0), (1, 1, 2)]
    assert selection.tied == 1 and selection.skipped_prompts == [2]
    capped = form_pairs(scores, rule="all_above_margin", margin=0.25, max_pairs_per_prompt=1)
    assert capped.pairs == [(0, 2, 0), (1, 1, 0)]
    # margin 0: every strictly ordered pair, K(K-1)/2 of them for distinct scores
    every = form_pairs(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), rule="all_above_margin")
    assert len(every) == 6
    assert all(scores_i > scores_j for scores_i, scores_j in
               zip(every.chosen_scores, every.rejected_scores))


def test_identical_completions_do_not_pair():
    scores = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 0.5]])
    completions = [[[5, 6, 2], [5, 6, 2], [7, 2]],     # best and worst are the same tokens
                   [[5, 6, 2], [8, 2], [5, 6, 2]]]
    best = form_pairs(scores, rule="best_worst", completion_ids=completions)
    assert best.pairs == [(1, 0, 1)]
    assert best.identical == 1 and best.skipped_prompts == [0]
    every = form_pairs(scores, rule="all_above_margin", completion_ids=completions)
    assert every.pairs == [(0, 0, 2), (0, 2, 1), (1, 0, 1), (1, 2, 1)]
    assert every.identical == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused(bad):
    with pytest.raises(ValueError, match="prompt 1 sample 0"):
        form_pairs(torch.tensor([[0.0, 1.0], [bad, 1.0]]))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="pair rule"):
        form_pairs(torch.zeros(2, 2), rule="best")
    with pytest.raises(ValueError, match="margin"):
        form_pairs(torch.zeros(2, 2), margin=-1.0)
    with pytest.raises(ValueError, match="margin"):
        form_pairs(torch.zeros(2, 2), margin=math.nan)
    with pytest.raises(ValueError, match="samples >= 2"):
        form_pairs(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="samples >= 2"):
        form_pairs(torch.zeros(4))
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        form_pairs(torch.zeros(2, 2), max_pairs_per_prompt=0)
    with pytest.raises(ValueError, match="shape"):
        form_pairs(torch.zeros(2, 2), completion_ids=[[[1], [2]]])


def test_pairs_to_items_are_the_offline_items():
    scores = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    prompt_ids = [[10, 11, 12], [13]]
    completions = [[[20, 2], [21, 22, 2], [23]], [[24, 2], [25, 2], [26, 2]]]
    selection = form_pairs(scores)
    items = pairs_to_items(selection, prompt_ids, completions)
    assert items == [TokenizedPair([10, 11, 12], [21, 22, 2], [20, 2])]
    data = pairs_dataset(items, settings={"eos_token_id": 2})
    assert data.paired and len(data) == 1 and data[0] is items[0]
    assert data.settings["eos_token_id"] == 2
    with pytest.raises(ValueError, match="covers 2 prompts"):
        pairs_to_items(selection, prompt_ids[:1], completions)
    with pytest.raises(ValueError, match="no pairs"):
        pairs_dataset([])
    empty = [[[20, 2], [], [23]], completions[1]]
    with pytest.raises(ValueError, match="completion 1 of prompt 0"):
        pairs_to_items(selection, prompt_ids, empty)
