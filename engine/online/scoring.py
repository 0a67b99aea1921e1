"""The scorer contract: ``K`` completions of each of ``P`` prompts in, a ``[P, K]`` score out.

Contract::

    scores = scorer.score(prompts, completions)   # prompts: list[PromptRecord] (P)
                                                  # completions: list[list[str]] ([P][K])
    scores                # torch.float32 [P, K] on the CPU, every value finite
    scorer.last_stats     # counts of the last call, e.g. {"no_decisions": 3, "comparisons": 12}

Higher is better; only the order of a prompt's scores matters to pair formation
(:mod:`fastpo.engine.online.pairs`). A scorer never returns NaN: a non-finite score raises
:class:`ScoringError` naming the scorer, the prompt (its row and source) and the sample. "No
decision" is not a missing value: a scorer that cannot rank two samples gives them equal scores,
so a prompt with no decision at all is a tie, skipped and counted by pair formation (the judge
counts its undecided comparisons in ``last_stats``).

Implementations subclass :class:`Scorer` and implement :meth:`Scorer.compute`; the public
:meth:`Scorer.score` checks the inputs and the output.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .prompts import PromptRecord

__all__ = ["Scorer", "ScoringError", "check_score_matrix", "torch_dtype", "where"]


class ScoringError(InputError):
    """A scorer that cannot load or gave an unusable score; the message names the scorer and,
    for a score, the prompt row and the sample."""


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A floating-point torch dtype from its name (``"bfloat16"``), or None for None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ScoringError(f"dtype {name!r} is not a floating-point torch dtype "
                           "(float32, bfloat16, float16)")
    return value


def where(prompt: PromptRecord, sample: int) -> str:
    """``"prompt row 3 (prompts.jsonl line 4), sample 1"``: the place a message names."""
    return f"prompt row {prompt.row} ({prompt.source}), sample {sample}"


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bool, int, float, a numpy scalar, a
    one-element tensor), else None."""
    if isinstance(value, Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_score_matrix(name: str, values: Any, prompts: Sequence[PromptRecord],
                       samples: int) -> Tensor:
    """``values`` ([P][K] nested numbers, or a tensor) as a finite float32 CPU ``[P, K]``
    tensor, or a :class:`ScoringError` naming scorer ``name`` and the place at fault."""
    if isinstance(values, Tensor):
        if tuple(values.shape) != (len(prompts), samples):
            raise ScoringError(f"scorer {name} returned scores of shape {tuple(values.shape)} "
                               f"for {len(prompts)} prompts × {samples} samples")
        rows = values.detach().to("cpu", torch.float64).tolist()
    else:
        rows = values
        if len(rows) != len(prompts) or any(len(r) != samples for r in rows):
            raise ScoringError(f"scorer {name} returned {len(rows)} rows of scores for "
                               f"{len(prompts)} prompts × {samples} samples")
    out = []
    for prompt, row in zip(prompts, rows):
        numbers_row = []
        for k, value in enumerate(row):
            number = _number(value)
            if number is None:
                raise ScoringError(f"scorer {name} returned {type(value).__name__} "
                                   f"{value!r:.60} for {where(prompt, k)}; a score is a number")
            if not math.isfinite(number):
                raise ScoringError(f"scorer {name} returned {number} for {where(prompt, k)}; "
                                   "scores must be finite numbers")
            numbers_row.append(number)
        out.append(numbers_row)
    return torch.tensor(out, dtype=torch.float32).reshape(len(prompts), samples)


class Scorer(ABC):
    """Scores completions; subclasses set ``name`` and implement :meth:`compute`."""

    name: str = "scorer"

    def __init__(self) -> None:
        self.last_stats: dict[str, int] = {}

    @abstractmethod
    def compute(self, prompts: list[PromptRecord], completions: list[list[str]]
                ) -> Tensor | list[list[float]]:
        """Raw ``[P][K]`` scores (checked by :meth:`score`)."""

    def score(self, prompts: list[PromptRecord], completions: list[list[str]]) -> Tensor:
        """Finite float32 ``[P, K]`` scores of ``completions[p][k]`` for ``prompts[p]``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
        if not prompts:
            raise ValueError("nothing to score: no prompts")
        samples = len(completions[0])
        for p, row in enumerate(completions):
            if len(row) != samples:
                raise ValueError(f"prompt {p} has {len(row)} completions, prompt 0 has "
                                 f"{samples}: every prompt needs the same number")
            for k, text in enumerate(row):
                if not isinstance(text, str):
                    raise TypeError(f"completion {k} of prompt {p} must be a string, got "
                                    f"{type(text).__name__}")
        self.last_stats = {}
        return check_score_matrix(self.name, self.compute(list(prompts), completions), prompts,
                                  samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
