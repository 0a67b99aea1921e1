"""The scorers, and building one from a typed spec (a config section).

Contract::

    scorer = build_scorer(ScorerSpec(kind="function",
                                     function="fastpo.engine.online.rewards:exact_match"))
    scorer = build_scorer({"kind": "reward_model", "path": "rm/", "device": "cuda:1"})
    scores = scorer.score(prompts, completions)           # float32 [P, K], finite

Kinds (:data:`SCORER_KINDS`):

- ``reward_model``: :class:`~fastpo.engine.online.reward_model.RewardModelScorer` (``path``,
  ``device``, ``dtype``, ``batch_size``, ``max_length``, ``trust_remote_code``);
- ``judge``: :class:`~fastpo.engine.online.judge.JudgeScorer` (``path``, ``device``, ``dtype``,
  ``batch_size``, ``template``, ``max_new_tokens``, ``both_orders``, ``trust_remote_code``,
  ``decision``: ``"generate"``, its greedy answer, or ``"probability"``, its probabilities of
  "1" and "2");
- ``function``: :class:`~fastpo.engine.online.function_scorer.FunctionScorer` (``function``:
  ``"module:function"``, ``kwargs``).

``build_scorer`` takes a :class:`ScorerSpec`, a mapping of its fields, or any object with a
``model_dump()`` (a pydantic config section); a mapping may also name the kind by its key
(``{"function": "m:f"}``, ``{"reward_model": "rm/"}``, ``{"judge": "lm/"}``). A function without
a module is a built-in reward of :mod:`fastpo.engine.online.rewards` (``"exact_match"``).
The scorer contract (:class:`Scorer`, its checks, :class:`ScoringError`) is in
:mod:`fastpo.engine.online.scoring`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import rewards
from .function_scorer import FunctionScorer
from .judge import JUDGE_DECISIONS, JUDGE_TEMPLATE, JudgeScorer
from .reward_model import RewardModelScorer
from .rewards import BUILTIN_REWARDS
from .scoring import Scorer, ScoringError

__all__ = ["SCORER_KINDS", "FunctionScorer", "JudgeScorer", "RewardModelScorer", "Scorer",
           "ScorerSpec", "ScoringError", "build_scorer"]

SCORER_KINDS = ("reward_model", "judge", "function")
ScorerKind = Literal["reward_model", "judge", "function"]


@dataclass(frozen=True)
class ScorerSpec:
    """Which scorer, and its settings (fields of the other kinds are ignored)."""

    kind: ScorerKind
    path: str | None = None
    function: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 8
    max_length: int | None = None
    template: str = JUDGE_TEMPLATE
    max_new_tokens: int = 8
    both_orders: bool = True
    trust_remote_code: bool = False
    decision: str = "generate"

    def __post_init__(self) -> None:
        if self.kind not in SCORER_KINDS:
            raise ScoringError(f"scorer kind must be one of {', '.join(SCORER_KINDS)}, "
                               f"got {self.kind!r}")
        if self.decision not in JUDGE_DECISIONS:
            raise ScoringError(f"scorer spec: decision must be one of "
                               f"{', '.join(map(repr, JUDGE_DECISIONS))}, got {self.decision!r}")
        needed = {"reward_model": "path", "judge": "path", "function": "function"}[self.kind]
        if not getattr(self, needed):
            what = "a local model folder" if needed == "path" else "'module:function'"
            raise ScoringError(f"a {self.kind} scorer needs '{needed}' ({what})")


def _spec(spec: ScorerSpec | Mapping[str, Any] | Any) -> ScorerSpec:
    if isinstance(spec, ScorerSpec):
        return spec
    if hasattr(spec, "model_dump") and not isinstance(spec, Mapping):
        spec = spec.model_dump()
    if not isinstance(spec, Mapping):
        raise TypeError(f"a scorer spec is a ScorerSpec or a mapping, got {type(spec).__name__}")
    values = {str(k): v for k, v in spec.items() if v is not None}
    named = [kind for kind in SCORER_KINDS if kind in values]  # {"function": "m:f"} form
    if "kind" not in values and len(named) == 1:
        kind = named[0]
        target = values.pop(kind)
        values.update(kind=kind, **({"function": target} if kind == "function"
                                    else {"path": target}))
    names = {f.name for f in dataclasses.fields(ScorerSpec)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ScoringError(f"scorer spec: unknown key(s) {', '.join(unknown)}; valid: "
                           f"{', '.join(sorted(names))}")
    if "kind" not in values:
        raise ScoringError(f"scorer spec: give 'kind' (one of {', '.join(SCORER_KINDS)}) or "
                           "exactly one of the keys reward_model, judge, function")
    return ScorerSpec(**values)


def build_scorer(spec: ScorerSpec | Mapping[str, Any] | Any) -> Scorer:
    """The scorer a spec describes (loading its model or importing its function now)."""
    spec = _spec(spec)
    if spec.kind == "function":
        function = spec.function
        if ":" not in function:
            if function not in BUILTIN_REWARDS:
                raise ScoringError(f"reward function {function!r} is not a built-in reward "
                                   f"({', '.join(BUILTIN_REWARDS)}); name another function as "
                                   "'module:function'")
            function = f"{rewards.__name__}:{function}"
        return FunctionScorer(function, kwargs=spec.kwargs)
    common = dict(device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size,
                  trust_remote_code=spec.trust_remote_code)
    if spec.kind == "reward_model":
        return RewardModelScorer(spec.path, max_length=spec.max_length, **common)
    return JudgeScorer(spec.path, template=spec.template, max_new_tokens=spec.max_new_tokens,
                       both_orders=spec.both_orders, decision=spec.decision, **common)
