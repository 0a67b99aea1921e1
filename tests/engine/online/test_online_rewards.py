"""The built-in verifiable rewards: each formula on hand-checked cases, and bad arguments."""

from __future__ import annotations

from decimal import Decimal

import pytest

from fastpo.engine.errors import InputError
from fastpo.engine.online.prompts import PromptRecord
from fastpo.engine.online.rewards import (
    exact_match,
    exact_match_reward,
    format_match,
    last_number,
    length_penalty,
    length_penalty_reward,
    normalize_text,
)


def test_normalize_and_last_number():
    assert normalize_text("  The  Answer:\n Paris. ") == "the answer: paris"
    assert last_number("3 apples, then 1,250.5 pears") == Decimal("1250.5")
    assert last_number("it is -7") == Decimal("-7")
    assert last_number("x = .5") == Decimal(".5")
    assert last_number("no digits") is None


@pytest.mark.parametrize("completion, answer, reward", [
    (" 4", "4", 1.0),
    ("2 + 2 = 4.", "4", 1.0),
    ("so the total is 42.0", "42", 1.0),
    ("1,000 exactly", "1000", 1.0),
    ("4, no wait, 5", "4", 0.0),        # the last number counts
    ("four", "4", 0.0),
    ("-3", "3", 0.0),
    ("  PARIS ", "Paris", 1.0),
    ("Paris is the capital", "Paris", 0.0),
])
def test_exact_match_reward(completion, answer, reward):
    assert exact_match_reward(completion, answer) == reward


def test_batch_forms():
    prompts = [PromptRecord("2+2=", "4", 0, "p line 1"), PromptRecord("1+1=", "2", 1, "p line 2")]
    assert exact_match(prompts, [" 4", " 3"]) == [1.0, 0.0]
    with pytest.raises(InputError, match=r"prompt row 5 \(p line 6\) has none"):
        exact_match([PromptRecord("q", None, 5, "p line 6")], ["x"])
    assert format_match(prompts, ["Answer: 4", "4"], pattern=r"Answer: \d+") == [1.0, 0.0]
    with pytest.raises(InputError, match="not a valid regular expression"):
        format_match(prompts, ["a", "b"], pattern="(")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        exact_match(prompts, ["4"])


def test_length_penalty(tokenizer):
    assert length_penalty_reward(3, 4) == 0.0
    assert length_penalty_reward(6, 4) == -0.5
    assert length_penalty_reward(8, 4) == -1.0
    prompts = [PromptRecord("q", None, 0, "p")] * 3
    texts = ["one two", "one two three four five six", "abcdefgh"]
    assert length_penalty(prompts, texts, limit=4) == [0.0, -0.5, 0.0]
    assert length_penalty(prompts, texts, limit=4, unit="characters") == [
        -max(0, len(t) - 4) / 4 for t in texts]
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert length_penalty(prompts, texts, limit=2, unit="tokens", tokenizer=tokenizer) == [
        -max(0, n - 2) / 2 for n in tokens]
    with pytest.raises(InputError, match="unit 'tokens' needs a tokenizer"):
        length_penalty(prompts, texts, limit=2, unit="tokens")
    with pytest.raises(InputError, match="unit must be one of"):
        length_penalty(prompts, texts, limit=2, unit="lines")
    with pytest.raises(InputError, match="limit must be a positive int"):
        length_penalty(prompts, texts, limit=0)
