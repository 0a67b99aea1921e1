"""The host-side metrics of online training: scores of the pairs, skipped prompts, generation.

All of them are computed from host data (the scorer's scores and the sampled token ids come back
to the host anyway), so they add no synchronization to the training steps. Per step, of the
pairs the step trains on (:func:`score_stats`):

- ``online/chosen_score_{mean,min,max}``, ``online/rejected_score_{mean,min,max}``;
- ``online/score_margin``: the mean chosen − rejected score gap; ``online/pairs``.

Per generation round, repeated on each step trained on it (:func:`round_metrics`):

- ``online/score_{mean,min,max}``: the scores of every sample of the round (the reward of fresh
  samples as training goes);
- ``online/prompts``; ``online/tie_fraction`` (prompts whose samples all scored the same) and
  ``online/skipped_fraction`` (prompts that gave no pair: ties, gaps within the margin, or only
  identical completions);
- ``online/round_pairs`` and ``online/pairs_unused`` (over the micro-batch cap);
- ``online/completion_length_{mean,min,max}`` (tokens) and ``online/completion_ended_fraction``
  (ended with EOS rather than cut at ``max_new_tokens``);
- ``online/generation_tokens_per_s``: sampled tokens per second of ``generate``;
- the scorer's counters (``Scorer.last_stats``) summed over the round's scoring calls, as
  ``online/scorer_<counter>`` (:func:`scorer_counts`, :func:`scorer_metrics`): a judge gives
  ``online/scorer_comparisons`` (questions asked) and ``online/scorer_no_decisions`` (answers
  that were neither "1" nor "2"), and with both ``online/scorer_no_decision_fraction``; a
  scorer without counters (a reward model, a function) adds none.

- ``online/saturated_fraction``: samples that scored the round's best score (a scorer the
  policy has learned to max out: most samples at the top, most prompts tied);
  ``online/generation_attempts`` (generation calls the round made) and ``online/short_round``
  (1 when it trained on fewer pairs than micro-batches after ``online.max_generation_attempts``).

The step that generates a round also gets ``online/generation_seconds`` (generation and
scoring), which the trainer keeps out of its training ``tokens_per_s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..online.pairs import PairSelection


def _summary(name: str, values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"{name}_mean": sum(values) / len(values), f"{name}_min": float(min(values)),
            f"{name}_max": float(max(values))}


def score_stats(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """Score statistics of the pairs of one step (``chosen[i]``, ``rejected[i]`` a pair)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen scores but {len(rejected)} rejected scores")
    out = {"online/pairs": float(len(chosen))}
    out.update(_summary("online/chosen_score", chosen))
    out.update(_summary("online/rejected_score", rejected))
    if chosen:
        out["online/score_margin"] = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    return out


def scorer_counts(stats: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """The scorer's counters (its ``last_stats`` after each scoring call) summed by name."""
    totals: dict[str, int] = {}
    for counts in stats:
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


def scorer_metrics(totals: Mapping[str, int]) -> dict[str, float]:
    """``online/scorer_<counter>`` for each summed counter, and the no-decision fraction when
    the counters have ``comparisons`` and ``no_decisions`` (a judge)."""
    out = {f"online/scorer_{key}": float(value) for key, value in totals.items()}
    if "comparisons" in totals and "no_decisions" in totals:
        out["online/scorer_no_decision_fraction"] = \
            totals["no_decisions"] / max(totals["comparisons"], 1)
    return out


def round_metrics(selections: Sequence[PairSelection], completions: Sequence[Sequence[int]],
                  scores: Sequence[float], *, eos_token_id: int | None,
                  generate_seconds: float, pairs: int, unused: int,
                  scorer_stats: Sequence[Mapping[str, int]] = ()) -> dict[str, float]:
    """Metrics of one generation round: its pair selections (one per generation call), every
    sampled completion and its score (aligned), and the scorer's counters of each call."""
    prompts = sum(s.num_prompts for s in selections)
    lengths = [len(c) for c in completions]
    tokens = sum(lengths)
    out = {"online/prompts": float(prompts),
           "online/tie_fraction": sum(s.tied for s in selections) / max(prompts, 1),
           "online/skipped_fraction": sum(s.num_skipped for s in selections) / max(prompts, 1),
           "online/round_pairs": float(pairs), "online/pairs_unused": float(unused),
           "online/completion_ended_fraction": sum(
               1 for c in completions if c and c[-1] == eos_token_id) / max(len(completions), 1),
           "online/generation_tokens_per_s": tokens / max(generate_seconds, 1e-9)}
    out.update(_summary("online/score", scores))
    out.update(_summary("online/completion_length", [float(n) for n in lengths]))
    out.update(scorer_metrics(scorer_counts(scorer_stats)))
    return out


def saturation_metrics(scores: Sequence[float], *, attempts: int, short: bool
                       ) -> dict[str, float]:
    """How saturated a round's scores are (see the module docstring)."""
    top = max(scores) if scores else 0.0
    return {"online/saturated_fraction": sum(1 for s in scores if s == top) / max(len(scores), 1),
            "online/generation_attempts": float(attempts), "online/short_round": float(short)}
