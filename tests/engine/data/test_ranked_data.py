"""Ranked data: the accepted row forms (scores or ranks, strings, message lists, OpenAI message
objects, per-completion objects), bad rows named by row and field, tokenization (ties dropped,
each completion tokenized like a pair's), and the pair rules."""

from __future__ import annotations

import json

import pytest

from fastpo.engine.data.dataset import load_preference_records, tokenize_pairs
from fastpo.engine.data.formats import DataFormatError, normalize_record
from fastpo.engine.data.ranked import ranked_pairs, ranking

USER = [{"role": "user", "content": "Name a colour."}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("row", [
    {"prompt": "Q", "completions": ["a", "b", "c"], "scores": [1, 3.5, 2]},
    {"prompt": "Q", "completions": ["a", "b", "c"], "ranks": [3, 1, 2]},
    {"prompt": "Q", "completions": [{"text": "a", "score": 1}, {"content": "b", "score": 3.5},
                                    {"completion": "c", "score": 2}]},
], ids=["scores", "ranks", "objects"])
def test_standard_ranked_forms(row):
    record = normalize_record(row, "r")
    assert record["prompt"] == "Q" and record["completions"] == ["a", "b", "c"]
    assert ranking(record["scores"]) == [1, 2, 0]


def test_conversational_ranked_forms():
    trl = normalize_record({"prompt": USER, "completions": [answer("red"), answer("blue")],
                            "scores": [0.2, 0.7]}, "r")
    openai = normalize_record({"messages": USER, "completions": [
        {"role": "assistant", "content": "red"}, {"role": "assistant", "content": "blue"}],
        "ranks": [2, 1]}, "r")
    objects = normalize_record({"messages": USER, "completions": [
        {"messages": answer("red"), "rank": 2}, {"messages": answer("blue"), "rank": 1}]}, "r")
    for record in (trl, openai, objects):
        assert record["prompt"] == USER
        assert record["completions"] == [answer("red"), answer("blue")]
        assert ranking(record["scores"]) == [1, 0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completions": ["a"], "scores": [1]}, "at least 2 completions, got 1"),
    ({"prompt": "Q", "completions": "ab", "scores": [1]}, "'completions' must be a list"),
    ({"prompt": "Q", "completions": ["a", "b"]}, "every completion needs a score or a rank"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1]}, "'scores' must be a list of 2"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, "x"]},
     r"'scores\[1\]' must be a finite number, got str"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, float("nan")]},
     r"'scores\[1\]' must be a finite number"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, True]},
     r"'scores\[1\]' must be a finite number, got bool"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, 2], "ranks": [1, 2]},
     "not both"),
    ({"completions": ["a", "b"], "scores": [1, 2]}, "missing field 'prompt'"),
    ({"prompt": "Q", "completions": [{"text": "a"}, {"text": "b", "score": 1}]},
     r"'completions\[0\]' needs exactly one of 'score' or 'rank'"),
    ({"prompt": "Q", "completions": [{"body": "a", "score": 1}, "b"]},
     r"'completions\[0\]' has none of text"),
    ({"prompt": USER, "completions": ["a", answer("b")], "scores": [1, 2]},
     "are strings but .* are message lists"),
    ({"prompt": USER, "completions": [[{"role": "user", "content": "x"}], answer("b")],
      "scores": [1, 2]}, r"'completions\[0\]' must start with an assistant message"),
])
def test_bad_ranked_rows_are_named(row, message):
    with pytest.raises(DataFormatError, match=message):
        normalize_record(row, "data.jsonl line 3")


def test_mixing_ranked_and_pair_rows_is_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completions": ["a", "b"], "scores": [1, 2]})
                    + "\n" + json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}))
    with pytest.raises(DataFormatError, match="line 2: paired record in data whose first "
                                              r"record .*line 1.* is ranked"):
        load_preference_records(path)


def test_tokenized_like_pairs_ties_dropped_and_the_pair_rule(tokenizer):
    rows = [{"prompt": USER, "completions": [answer("red"), answer("blue"), answer("green")],
             "scores": [1.0, 3.0, 2.0]},
            {"prompt": USER, "completions": [answer("red"), answer("blue")], "scores": [2, 2]},
            {"prompt": "Say hi.", "completions": [" hi", " hello"], "scores": [0.0, 0.3]}]
    data = tokenize_pairs(load_preference_records(rows), tokenizer, max_length=256,
                          max_prompt_length=128)
    assert data.is_ranked and data.paired and len(data) == 2
    assert data.stats.dropped["tied"] == 1
    pairs = tokenize_pairs(load_preference_records([
        {"prompt": USER, "chosen": answer("blue"), "rejected": answer("red")}]), tokenizer)
    item = data.ranked[0]
    # each completion is tokenized exactly as the same completion of a pair row
    assert item.prompt_ids == pairs.pairs[0].prompt_ids
    assert item.completions[1] == pairs.pairs[0].chosen_ids
    assert item.completions[0] == pairs.pairs[0].rejected_ids
    assert data.fingerprint() != data.subset([1, 0]).fingerprint()
    strict = data.with_pair_rule("all", margin=0.5)
    assert len(strict) == 1 and strict.stats.dropped["no_pairs"] == 1
    assert strict.settings["pairs"] == "all" and strict.settings["pair_margin"] == 0.5


def test_pair_rules():
    scores = [0.9, 0.1, 0.5, 0.5, 0.3]  # ranking 0 > 2 = 3 > 4 > 1 (ties in data order)
    assert ranking(scores) == [0, 2, 3, 4, 1]
    assert ranked_pairs(scores, rule="best_worst") == [(0, 1)]
    assert ranked_pairs(scores, rule="adjacent") == [(0, 2), (3, 4), (4, 1)]
    all_pairs = ranked_pairs(scores, rule="all")
    assert len(all_pairs) == 9 and (2, 3) not in all_pairs and (3, 2) not in all_pairs
    assert ranked_pairs(scores, rule="all", margin=0.45) == [(0, 4), (0, 1)]
    assert ranked_pairs([1.0, 1.0], rule="best_worst") == []
    # ties: the first best against the first worst (as online DPO's best_worst)
    assert ranked_pairs([0.0, 2.0, 0.0, 2.0], rule="best_worst") == [(1, 0)]
    with pytest.raises(ValueError, match="pairs must be one of best_worst, all, adjacent"):
        ranked_pairs(scores, rule="every")
