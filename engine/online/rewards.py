"""Built-in verifiable rewards, for :class:`~fastpo.engine.online.function_scorer.FunctionScorer`.

Each reward is a pure function of one completion (``*_reward``), and a batch form with the
scorer's signature ``(prompts, completions, **kwargs) -> list[float]`` (flat aligned lists),
named in a config as ``"fastpo.engine.online.rewards:<name>"``::

    exact_match      1 if the completion's answer equals the prompt's ``answer``, else 0
    format_match     1 if the completion (stripped) matches a regular expression, else 0
    length_penalty   0 within a length limit, falling linearly below it

``kwargs`` of a scorer spec reach the batch forms (``pattern``, ``limit``, ``unit``, ...).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import InputError
from .prompts import PromptRecord

__all__ = ["BUILTIN_REWARDS", "exact_match", "exact_match_reward", "format_match",
           "format_reward", "last_number", "length_penalty", "length_penalty_reward",
           "normalize_text"]

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_EDGE_PUNCTUATION = ".,;:!?\"'`*()[]"
LENGTH_UNITS = ("words", "characters", "tokens")
BUILTIN_REWARDS = ("exact_match", "format_match", "length_penalty")


def normalize_text(text: str) -> str:
    """``text`` lower-cased, runs of whitespace made one space, stripped, and punctuation at
    either end removed (``"  The  Answer: Paris. "`` → ``"the answer: paris"``)."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION + " ")


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (``"3 apples, then 1,250.5"`` → ``1250.5``:
    thousands commas dropped), as an exact decimal, or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches numbers
        return None


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None


def exact_match_reward(completion: str, answer: str) -> float:
    """``r = 1`` if the completion answers ``answer``, else ``0``.

    A numeric ``answer`` (``"42"``, ``"-3.5"``, ``"1,000"``) is compared with the last number
    of the completion, as numbers (``"... so 42.0"`` matches ``42``); any other answer with
    the whole completion, both through :func:`normalize_text`.
    """
    expected = _as_number(answer)
    if expected is not None:
        got = last_number(completion)
        return 1.0 if got is not None and got == expected else 0.0
    return 1.0 if normalize_text(completion) == normalize_text(answer) else 0.0


def format_reward(completion: str, pattern: str | re.Pattern[str]) -> float:
    """``r = 1`` if the stripped completion matches ``pattern`` as a whole (``re.fullmatch``,
    with ``re.DOTALL``), else ``0``."""
    compiled = pattern if isinstance(pattern, re.Pattern) else _compile(pattern)
    return 1.0 if compiled.fullmatch(completion.strip()) else 0.0


def length_penalty_reward(length: int, limit: int) -> float:
    """``r = −max(0, n − L) / L`` for a length ``n`` and limit ``L``: 0 up to the limit, −1 at
    twice the limit, linear in the excess."""
    return -max(0, length - limit) / limit


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise InputError(f"format_match: pattern {pattern!r} is not a valid regular expression "
                         f"({exc})") from None


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _check_lengths(prompts: Sequence[PromptRecord], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def exact_match(prompts: Sequence[PromptRecord], completions: Sequence[str]) -> list[float]:
    """:func:`exact_match_reward` of each completion against its prompt's ``answer`` (every
    prompt needs one: an error names the first prompt row without it)."""
    _check_lengths(prompts, completions)
    for prompt in prompts:
        if prompt.answer is None:
            raise InputError(f"exact_match needs an 'answer' for every prompt; prompt row "
                             f"{prompt.row} ({prompt.source}) has none")
    return [exact_match_reward(c, p.answer) for p, c in zip(prompts, completions)]


def format_match(prompts: Sequence[PromptRecord], completions: Sequence[str], *,
                 pattern: str) -> list[float]:
    """:func:`format_reward` of each completion against ``pattern``."""
    _check_lengths(prompts, completions)
    compiled = _compile(pattern)
    return [format_reward(c, compiled) for c in completions]


def length_penalty(prompts: Sequence[PromptRecord], completions: Sequence[str], *, limit: int,
                   unit: str = "words", tokenizer: str | Any | None = None) -> list[float]:
    """:func:`length_penalty_reward` of each completion's length in ``unit``: ``words``
    (whitespace-separated), ``characters`` or ``tokens`` (of ``tokenizer``: a loaded tokenizer
    or a local tokenizer folder)."""
    _check_lengths(prompts, completions)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"length_penalty: limit must be a positive int, got {limit!r}")
    if unit not in LENGTH_UNITS:
        raise InputError(f"length_penalty: unit must be one of {', '.join(LENGTH_UNITS)}, "
                         f"got {unit!r}")
    if unit == "words":
        lengths = [len(c.split()) for c in completions]
    elif unit == "characters":
        lengths = [len(c) for c in completions]
    else:
        if tokenizer is None:
            raise InputError("length_penalty: unit 'tokens' needs a tokenizer (a local folder)")
        if isinstance(tokenizer, str):
            tokenizer = _tokenizer(tokenizer)
        lengths = [len(ids) for ids in
                   tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    return [length_penalty_reward(n, limit) for n in lengths]
