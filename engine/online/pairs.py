"""From scored samples to preference pairs, and from pairs to the offline path's items.

Contract::

    selection = form_pairs(scores, rule="best_worst", margin=0.0)   # scores: [P, K] float
    selection.pairs          # [(prompt p, chosen sample i, rejected sample j), ...]
    items = pairs_to_items(selection, prompt_ids, completion_ids)   # list[TokenizedPair]
    data = pairs_dataset(items, tokenizer=tokenizer)                # TokenizedDataset
    batch = collate_batch(data, range(len(data)), pad_token_id=..., share_prompt=True)

Rules (``s`` the scores of one prompt, ``m`` ≥ 0 the margin):

- ``best_worst``: one pair ``(argmax s, argmin s)`` when ``max s − min s > m``. Ties in the
  arg-max or arg-min go to the lowest sample index.
- ``all_above_margin``: every pair ``(i, j)`` with ``s_i − s_j > m``, in decreasing order of
  ``s_i − s_j``, equal gaps by ``i`` then ``j`` (at most ``K(K−1)/2`` per prompt; the first
  ``max_pairs_per_prompt`` of them when that is given).

A prompt that gives no pair is skipped and counted: ``tied`` when all its scores are equal
(``max s = min s``), ``below_margin`` when they differ by at most ``m``. With
``completion_ids`` given, a pair whose two completions are the same tokens (two equal samples
scored differently, e.g. by batch-dependent float noise) is not formed and counted in
``identical``; a prompt left with no pair by this counts there too.

Items: a pair is ``TokenizedPair(prompt_ids[p], completion_ids[p][i], completion_ids[p][j])``
— the sampled tokens exactly as generated (EOS-terminated or cut at ``max_new_tokens``). The
prompt is shared by construction, so ``collate_batch(..., share_prompt=True)`` runs it once;
the items feed the same collate, forward and loss as pairs read from a preference file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..data.dataset import DataStats, TokenizedDataset, TokenizedPair

__all__ = ["PAIR_RULES", "PairSelection", "form_pairs", "pairs_dataset", "pairs_to_items"]

PAIR_RULES = ("best_worst", "all_above_margin")
PairRule = Literal["best_worst", "all_above_margin"]


@dataclass(frozen=True)
class PairSelection:
    """The pairs chosen from a ``[P, K]`` score matrix and what was skipped."""

    pairs: list[tuple[int, int, int]]
    chosen_scores: list[float]
    rejected_scores: list[float]
    num_prompts: int
    samples_per_prompt: int
    tied: int = 0
    below_margin: int = 0
    identical: int = 0
    skipped_prompts: list[int] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Prompts that gave no pair (tied + below margin + identical)."""
        return len(self.skipped_prompts)

    @property
    def tie_fraction(self) -> float:
        """Fraction of the prompts skipped because all their scores were equal."""
        return self.tied / self.num_prompts if self.num_prompts else 0.0

    def __len__(self) -> int:
        return len(self.pairs)


def _check_scores(scores: Tensor) -> list[list[float]]:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a tensor [prompts, samples], got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape [prompts, samples >= 2], "
                         f"got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.double()
    rows = scores.detach().to("cpu", torch.float64).tolist()
    for p, row in enumerate(rows):
        for k, value in enumerate(row):
            if not math.isfinite(value):
                raise ValueError(f"score of prompt {p} sample {k} is {value}; scores must be "
                                 "finite")
    return rows


def _candidates(row: list[float], rule: str, margin: float) -> list[tuple[int, int]]:
    if rule == "best_worst":
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        worst = min(range(len(row)), key=lambda i: (row[i], i))
        return [(best, worst)] if row[best] - row[worst] > margin else []
    found = [(row[i] - row[j], i, j) for i in range(len(row)) for j in range(len(row))
             if row[i] - row[j] > margin]
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(i, j) for _, i, j in found]


def form_pairs(scores: Tensor, *, rule: PairRule = "best_worst", margin: float = 0.0,
               completion_ids: Sequence[Sequence[Sequence[int]]] | None = None,
               max_pairs_per_prompt: int | None = None) -> PairSelection:
    """Choose chosen/rejected samples of each prompt from its scores (module docstring);
    ``max_pairs_per_prompt`` keeps each prompt's first pairs (the widest gaps)."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
            or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if max_pairs_per_prompt is not None and (isinstance(max_pairs_per_prompt, bool) or not
                                             isinstance(max_pairs_per_prompt, int)
                                             or max_pairs_per_prompt < 1):
        raise ValueError(f"max_pairs_per_prompt must be a positive int or None, "
                         f"got {max_pairs_per_prompt!r}")
    rows = _check_scores(scores)
    if completion_ids is not None and (len(completion_ids) != len(rows) or any(
            len(c) != len(r) for c, r in zip(completion_ids, rows))):
        raise ValueError(f"completion_ids must have the scores' shape {tuple(scores.shape)} "
                         "([prompt][sample])")
    pairs: list[tuple[int, int, int]] = []
    chosen, rejected, skipped = [], [], []
    tied = below = identical = 0
    for p, row in enumerate(rows):
        found = _candidates(row, rule, float(margin))
        if not found:
            skipped.append(p)
            if max(row) == min(row):
                tied += 1
            else:
                below += 1
            continue
        if completion_ids is not None:
            found = [(i, j) for i, j in found
                     if list(completion_ids[p][i]) != list(completion_ids[p][j])]
            if not found:
                skipped.append(p)
                identical += 1
                continue
        for i, j in found[:max_pairs_per_prompt]:
            pairs.append((p, i, j))
            chosen.append(row[i])
            rejected.append(row[j])
    return PairSelection(pairs, chosen, rejected, len(rows), len(rows[0]) if rows else 0,
                         tied=tied, below_margin=below, identical=identical,
                         skipped_prompts=skipped)


def pairs_to_items(selection: PairSelection, prompt_ids: Sequence[Sequence[int]],
                   completion_ids: Sequence[Sequence[Sequence[int]]]) -> list[TokenizedPair]:
    """The selected pairs as the offline path's ``TokenizedPair`` items, in selection order."""
    if len(prompt_ids) != selection.num_prompts or len(completion_ids) != selection.num_prompts:
        raise ValueError(f"the selection covers {selection.num_prompts} prompts, got "
                         f"{len(prompt_ids)} prompts and {len(completion_ids)} completion lists")
    items = []
    for p, i, j in selection.pairs:
        if not prompt_ids[p]:
            raise ValueError(f"prompt {p} has no tokens")
        for k in (i, j):
            if not completion_ids[p][k]:
                raise ValueError(f"completion {k} of prompt {p} has no tokens")
        items.append(TokenizedPair(list(prompt_ids[p]), list(completion_ids[p][i]),
                                   list(completion_ids[p][j])))
    return items


def pairs_dataset(items: Sequence[TokenizedPair], *, tokenizer: Any | None = None,
                  settings: dict[str, Any] | None = None) -> TokenizedDataset:
    """A ``TokenizedDataset`` of generated pairs, for ``collate_batch`` / ``plan_batches``;
    ``settings`` (or the tokenizer's name, vocabulary and EOS) are recorded like the offline
    path's."""
    if not items:
        raise ValueError("no pairs: every prompt of this generation batch was skipped")
    info: dict[str, Any] = {"paired": True, "online": True}
    if tokenizer is not None:
        info.update(tokenizer=getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
                    vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    info.update(settings or {})
    stats = DataStats(rows=len(items), kept=len(items))
    return TokenizedDataset(list(items), [], stats, info)
