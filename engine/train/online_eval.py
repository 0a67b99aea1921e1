"""Held-out evaluation of online training: the mean score of fresh samples on held-out prompts.

Each evaluation samples ``online.eval_samples_per_prompt`` completions of every prompt of
``online.eval_prompts`` with the policy (the training's sampling settings), scores them with the
training's scorer and reports their mean, min and max score and completion lengths. The samples
come from a generator seeded afresh from the run's seed at every evaluation, so the evaluations
before and after training differ by the policy, not by the draw. Ranks take every
``world_size``-th prompt and their sums are reduced (the model is gathered once per rank under
ZeRO-3).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..online.generation import SamplingOptions
from ..online.prompts import PromptRecord, render_prompt_ids

SCORE = "online/eval_score_mean"


class OnlineEvaluation:
    """The mean score of fresh samples on ``prompts`` (see the module docstring)."""

    primary = SCORE  # early stopping follows it (higher is better)

    def __init__(self, prompts: list[PromptRecord], source: Any) -> None:
        self.prompts, self.source = prompts, source
        on = source.online
        self.options = SamplingOptions(temperature=on.temperature, top_p=on.top_p,
                                       max_new_tokens=on.max_new_tokens,
                                       samples_per_prompt=on.eval_samples_per_prompt)
        self.prompt_ids: list[list[int]] = []

    @torch.no_grad()
    def run(self, trainer: Any) -> dict[str, float] | None:
        if not self.prompts:
            return None
        from .online_source import sampling_generator

        rt, source = trainer.rt, self.source
        if not self.prompt_ids:
            self.prompt_ids = [render_prompt_ids(r, source.tokenizer,
                                                 trainer.cfg.data.max_prompt_length,
                                                 trainer.cfg.data.chat_template_kwargs)
                               for r in self.prompts]
        rows = list(range(rt.rank, len(self.prompts), rt.world_size))
        generator = sampling_generator(trainer.cfg.seed, rt.rank, "eval")
        scores: list[float] = []
        lengths: list[int] = []
        ended = 0
        eos = source.tokenizer.eos_token_id
        step = source.online.prompts_per_generation
        share = math.ceil(len(self.prompts) / rt.world_size)  # the same calls on every rank
        for start in range(0, share, step):
            chunk = rows[start:start + step]
            completions, values, _ = source.sample([self.prompts[r] for r in chunk],
                                                   [self.prompt_ids[r] for r in chunk],
                                                   self.options, generator)
            scores.extend(values.reshape(-1).tolist())  # host scores: no device sync
            flat = [c for samples in completions for c in samples]
            lengths.extend(len(c) for c in flat)
            ended += sum(1 for c in flat if c and c[-1] == eos)
        # sums and extremes of every rank (an empty share adds nothing)
        sums = torch.tensor([sum(scores), len(scores), sum(lengths), ended],
                            dtype=torch.float64, device=rt.device)
        extremes = torch.tensor([max(scores, default=-math.inf), -min(scores, default=math.inf)],
                                dtype=torch.float64, device=rt.device)
        rt.all_reduce_(sums)
        rt.all_reduce_(extremes, op="max")
        total, count, length, ends = sums.tolist()
        high, low = extremes.tolist()
        count = max(count, 1.0)
        return {SCORE: total / count, "online/eval_score_max": high, "online/eval_score_min": -low,
                "online/eval_completion_length": length / count,
                "online/eval_completion_ended_fraction": ends / count,
                "online/eval_samples": count, "items": float(len(self.prompts))}

    @staticmethod
    def text(when: str, step: int, result: dict[str, float]) -> str:
        return (f"[{when} step {step}] held-out prompts ({result['items']:.0f}, "
                f"{result['online/eval_samples']:.0f} samples): mean score {result[SCORE]:.4f} "
                f"(min {result['online/eval_score_min']:.4f}, max "
                f"{result['online/eval_score_max']:.4f}), completion length "
                f"{result['online/eval_completion_length']:.1f} tokens")

    @staticmethod
    def closing(summary: dict[str, Any], before: dict[str, float] | None,
                after: dict[str, float] | None) -> str | None:
        """Add the scores before/after to the summary record; the closing line."""
        summary["score_before"] = before.get(SCORE) if before else None
        summary["score_after"] = after.get(SCORE) if after else None
        if summary["score_before"] is None or summary["score_after"] is None:
            return None
        return (f"held-out mean score of fresh samples {summary['score_before']:.4f} → "
                f"{summary['score_after']:.4f}")
