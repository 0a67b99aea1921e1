"""Ranked items: K ≥ 2 completions of one prompt with a score each, trained on without expanding.

    item = TokenizedRanked(prompt_ids, [c1, c2, c3, c4], scores=[0.9, 0.1, 0.5, 0.5])
    batch = collate_ranked([item], pad_token_id=0, share_prompt=True, pairs="all")  # .batch

The K completions of an item are K sequences (item-major numbering). With ``share_prompt`` an
item is one K-way row ``[prompt | c₁ | … | c_K]`` (:mod:`.kway`): the prompt runs once, each
completion once; without it each completion is its own ``prompt + c_k`` sequence (padded or
packed rows). Either way a completion's log-probs are computed once, however many pairs it is
in: the pair rule (``pairs``) only picks indices into the per-sequence results
(:class:`~.preference_batch.RankedGroups`), so no row is ever expanded into pairs.

Pair rules (a pair ``(i, j)`` needs ``score_i − score_j > margin``):

- ``best_worst``: the best against the worst completion (ties: the first of each in the data,
  as online DPO's ``best_worst``);
- ``all``: every such ordered pair;
- ``adjacent``: neighbours in the ranking (sorted by score, ties in data order).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .preference_batch import RankedGroups

PairRule = Literal["best_worst", "all", "adjacent"]
PAIR_RULES: tuple[str, ...] = ("best_worst", "all", "adjacent")


@dataclass(frozen=True)
class TokenizedRanked:
    """Token ids of one ranked item: a prompt, its K ≥ 2 completions (each ending with EOS
    unless truncated) and their scores (higher is better)."""

    prompt_ids: list[int]
    completions: list[list[int]]
    scores: list[float]


def ranking(scores: Sequence[float]) -> list[int]:
    """Completion indices from best to worst score (ties in data order)."""
    return sorted(range(len(scores)), key=lambda k: (-scores[k], k))


def ranked_pairs(scores: Sequence[float], *, rule: str = "all", margin: float = 0.0
                 ) -> list[tuple[int, int]]:
    """The ``(better, worse)`` completion indices of an item's pairs under ``rule``."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    order = ranking(scores)
    if rule == "best_worst":  # ties: the first best and the first worst in the data
        candidates = [(order[0], min(range(len(scores)), key=lambda k: (scores[k], k)))]
    elif rule == "adjacent":
        candidates = list(itertools.pairwise(order))
    else:
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
    return [(i, j) for i, j in candidates if scores[i] - scores[j] > margin]


def ranked_groups(items: Sequence[TokenizedRanked], *, pairs: str = "all", margin: float = 0.0,
                  indices: Sequence[int] | None = None) -> RankedGroups:
    """The index tensors of a batch of the items (completions numbered item-major): the pairs
    of ``pairs``/``margin``, each item's ranking and its strictly ordered pairs. Raises when the
    batch has no pair at all (nothing to train on)."""
    counts, offsets = [], [0]
    for i, it in enumerate(items):
        if len(it.completions) < 2 or len(it.scores) != len(it.completions):
            raise ValueError(f"item {i}: {len(it.completions)} completions and "
                             f"{len(it.scores)} scores (need K ≥ 2, one score each)")
        counts.append(len(it.completions))
        offsets.append(offsets[-1] + counts[-1])
    chosen, rejected, pair_item = [], [], []
    strict: list[tuple[int, int, int]] = []
    order = torch.full((len(items), max(counts)), -1, dtype=torch.long)
    for i, it in enumerate(items):
        base = offsets[i]
        for a, b in ranked_pairs(it.scores, rule=pairs, margin=margin):
            chosen.append(base + a)
            rejected.append(base + b)
            pair_item.append(i)
        strict += [(base + a, base + b, i) for a, b in ranked_pairs(it.scores, rule="all")]
        order[i, : counts[i]] = torch.tensor(ranking(it.scores)) + base
    if not chosen:
        raise ValueError(f"no pair in this batch of {len(items)} ranked items: every score gap "
                         f"is ≤ the margin {margin} (filter such items with has_pairs)")
    better, worse, strict_item = (list(t) for t in zip(*strict)) if strict else ([], [], [])
    return RankedGroups(
        pair_chosen=torch.tensor(chosen), pair_rejected=torch.tensor(rejected),
        pair_item=torch.tensor(pair_item), order=order,
        strict_better=torch.tensor(better, dtype=torch.long),
        strict_worse=torch.tensor(worse, dtype=torch.long),
        strict_item=torch.tensor(strict_item, dtype=torch.long),
        scores=torch.tensor([s for it in items for s in it.scores], dtype=torch.float64),
        num_items=len(items), counts=tuple(counts),
        dataset_indices=None if indices is None else tuple(int(i) for i in indices))


def has_pairs(item: TokenizedRanked, *, rule: str, margin: float) -> bool:
    """Whether the item gives at least one pair under ``rule`` and ``margin``."""
    return bool(ranked_pairs(item.scores, rule=rule, margin=margin))


def expand_pairs(items: Sequence[TokenizedRanked], *, rule: str = "all", margin: float = 0.0
                 ) -> list[tuple[list[int], list[int], list[int]]]:
    """The ``(prompt, chosen, rejected)`` token ids of every pair of the items, item by item:
    what a pair dataset built from ranked data holds (the baseline K-way rows replace)."""
    return [(it.prompt_ids, it.completions[a], it.completions[b]) for it in items
            for a, b in ranked_pairs(it.scores, rule=rule, margin=margin)]
