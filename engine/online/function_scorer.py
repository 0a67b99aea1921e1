"""A Python function as the scorer: verifiable rewards (math answers, formats, lengths).

Contract::

    scorer = FunctionScorer("my_rewards:exact", kwargs={"strict": True})
    scores = scorer.score(prompts, completions)          # [P, K]

The function is named ``"module:function"`` (imported with ``importlib``, as a config names a
function of the user's own code; nothing is downloaded) or passed as a callable. It is called
once per scoring with two flat, aligned lists of ``P·K`` entries, prompt-major::

    function(prompts, completions, **kwargs) -> list[float]
    prompts[n]      the PromptRecord of prompt n // K (its .prompt, .answer, .row, .source)
    completions[n]  the text of sample n % K of that prompt

and returns ``P·K`` real numbers (bool, int, float, numpy or one-element tensor), in the same
order. A wrong count, a non-number or a non-finite value raises :class:`ScoringError` naming the
function (and the prompt row and sample of a bad value); a module that cannot be imported, a
missing attribute or a non-callable raises it naming the module path. Built-ins are in
:mod:`fastpo.engine.online.rewards` (``"fastpo.engine.online.rewards:exact_match"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .prompts import PromptRecord
from .scoring import Scorer, ScoringError, check_score_matrix

__all__ = ["FunctionScorer", "resolve_function"]

RewardFunction = Callable[..., Sequence[Any]]


def resolve_function(spec: str) -> RewardFunction:
    """The callable named by ``"module:function"`` (``function`` may be dotted:
    ``"module:Class.method"``), or a :class:`ScoringError` naming what is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ScoringError(f"reward function {spec!r}: expected 'module:function', e.g. "
                           "'fastpo.engine.online.rewards:exact_match'")
    module_name, attribute = spec.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScoringError(f"reward function {spec!r}: cannot import module {module_name!r} "
                           f"({exc}); is it installed or on PYTHONPATH?") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ScoringError(f"reward function {spec!r}: module {module_name!r} has no "
                               f"attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ScoringError(f"reward function {spec!r} is a {type(target).__name__}, not a "
                           "function")
    return target


class FunctionScorer(Scorer):
    """Scores with ``function(prompts, completions, **kwargs)`` (flat lists; module docstring)."""

    def __init__(self, function: str | RewardFunction, *,
                 kwargs: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        super().__init__()
        if isinstance(function, str):
            self.function = resolve_function(function)
            label = function
        elif callable(function):
            self.function = function
            label = f"{getattr(function, '__module__', '?')}:" \
                    f"{getattr(function, '__qualname__', type(function).__name__)}"
        else:
            raise ScoringError(f"reward function must be 'module:function' or a callable, got "
                               f"{type(function).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ScoringError(f"reward function {label}: kwargs must be a mapping, got "
                               f"{type(kwargs).__name__}")
        self.kwargs = dict(kwargs or {})
        self.name = name or f"function {label}"

    def compute(self, prompts: list[PromptRecord], completions: list[list[str]]
                ) -> list[list[float]]:
        samples = len(completions[0])
        flat_prompts = [prompt for prompt in prompts for _ in range(samples)]
        flat = [text for row in completions for text in row]
        values = self.function(flat_prompts, flat, **self.kwargs)
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().reshape(-1).tolist() if values.dim() <= 1 else values
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise ScoringError(f"{self.name} returned {type(values).__name__}; it must return a "
                               f"list of {len(flat)} numbers (one per prompt and sample)")
        if isinstance(values, torch.Tensor) or len(values) != len(flat):
            count = tuple(values.shape) if isinstance(values, torch.Tensor) else len(values)
            raise ScoringError(f"{self.name} returned {count} values for {len(prompts)} "
                               f"prompts × {samples} samples; it must return {len(flat)} "
                               "numbers, one per prompt and sample, prompt-major")
        values = list(values)
        rows = [values[p * samples: (p + 1) * samples] for p in range(len(prompts))]
        return check_score_matrix(self.name, rows, prompts, samples)
