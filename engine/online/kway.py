"""A generation round as K-way items: each prompt's K samples, scored once, in one row.

    items, pair_item = ranked_items(selection, scores, prompt_ids, completion_ids)
    data = ranked_round_dataset(items, rule="best_worst", margin=0.0, tokenizer=tokenizer)
    batch = collate_batch(data, range(len(data)), pad_token_id=..., share_prompt=True)

With ``samples_per_prompt`` K > 2 a round's pairs share their completions: ``all_above_margin``
forms up to C(K, 2) pairs per prompt from K samples. As pair rows each pair runs its prompt and
both completions through the policy and the reference; as one K-way row
``[prompt | s₁ | … | s_K]`` per prompt (:mod:`fastpo.engine.data.kway`) the prompt runs once and
each sample once, and the pairs are picked by index (:mod:`fastpo.engine.data.ranked`) — the same
pairs and the same loss (each pair weighted equally).

An item keeps every sample of a prompt that gave at least one pair, with its score. Samples that
are the same tokens get the score of the first of them (the pair path never pairs identical
completions; here they tie, so no pair forms between them). The pair rules map onto the ranked
ones: ``best_worst`` → ``best_worst``, ``all_above_margin`` → ``all``, with the margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..data.dataset import DataStats, TokenizedDataset
from ..data.ranked import TokenizedRanked, ranked_pairs
from .pairs import PairSelection

RANKED_RULES = {"best_worst": "best_worst", "all_above_margin": "all"}


def ranked_items(selection: PairSelection, scores: Tensor, prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[Sequence[int]]], *, rule: str, margin: float
                 ) -> tuple[list[TokenizedRanked], list[tuple[float, float, int]]]:
    """The K-way items of the prompts of ``selection`` that gave a pair, and each item's pairs
    as ``(chosen score, rejected score, item)`` (what the step's score metrics read)."""
    rows = scores.detach().double().cpu().tolist()
    skipped = set(selection.skipped_prompts)
    items: list[TokenizedRanked] = []
    pairs: list[tuple[float, float, int]] = []
    for p, row in enumerate(rows):
        if p in skipped:
            continue
        samples = [list(c) for c in completion_ids[p]]
        first: dict[tuple[int, ...], float] = {}
        tied = [first.setdefault(tuple(c), s) for c, s in zip(samples, row)]
        found = ranked_pairs(tied, rule=RANKED_RULES[rule], margin=margin)
        if not found:
            continue
        pairs += [(tied[i], tied[j], len(items)) for i, j in found]
        items.append(TokenizedRanked(list(prompt_ids[p]), samples, tied))
    return items, pairs


def ranked_round_dataset(items: Sequence[TokenizedRanked], *, rule: str, margin: float,
                         tokenizer: Any | None = None) -> TokenizedDataset:
    """A ``TokenizedDataset`` of a round's K-way items with the round's pair rule, for
    ``collate_batch`` (recorded like :func:`~.pairs.pairs_dataset`)."""
    if not items:
        raise ValueError("no K-way items: every prompt of this generation batch was skipped")
    info: dict[str, Any] = {"paired": True, "ranked": True, "online": True,
                            "pairs": RANKED_RULES[rule], "pair_margin": float(margin)}
    if tokenizer is not None:
        info.update(tokenizer=getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
                    vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return TokenizedDataset([], [], DataStats(rows=len(items), kept=len(items)), info,
                            list(items))
