"""Prompts files: plain and conversational prompts with answers, every error names file, line
and field, and prompts render to the same token ids as the offline path's."""

from __future__ import annotations

import json

import pytest

from fastpo.engine.data.dataset import tokenize_pairs
from fastpo.engine.data.files import load_preference_records
from fastpo.engine.data.formats import DataFormatError
from fastpo.engine.online.prompts import PromptRecord, load_prompts, render_prompt_ids

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 6 times 7?"}]


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_plain_and_conversational_prompts_with_answers(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "2 + 3 =", "answer": 5},
        "",
        {"prompt": CHAT, "answer": "42", "chosen": "ignored"},
        {"prompt": "Name a colour."},
    ])
    records = load_prompts(path)
    assert records == [
        PromptRecord("2 + 3 =", "5", 0, f"{path} line 1"),
        PromptRecord(CHAT, "42", 1, f"{path} line 3"),
        PromptRecord("Name a colour.", None, 2, f"{path} line 4"),
    ]
    assert [r.conversational for r in records] == [False, True, False]


def test_json_array_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "answer": "x"}]))
    records = load_prompts(path)
    assert [(r.prompt, r.answer, r.source) for r in records] == [
        ("a", None, f"{path} row 0"), ("b", "x", f"{path} row 1")]


@pytest.mark.parametrize("rows, message", [
    ([], "holds no prompts"),
    ([""], "holds no prompts"),
    ([{"prompt": "ok"}, {"question": "no prompt"}], r"line 2: missing field 'prompt'"),
    ([{"prompt": "  "}], r"line 1: field 'prompt' is empty"),
    ([{"prompt": []}], r"line 1: field 'prompt' is an empty message list"),
    ([{"prompt": 7}], r"line 1: field 'prompt' must be a list"),
    ([{"prompt": [{"role": "robot", "content": "x"}]}], r"field 'prompt\[0\].role'"),
    ([{"prompt": [{"role": "user"}]}], r"field 'prompt\[0\]' has no 'content'"),
    ([{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     r"line 1: field 'prompt' ends with an assistant message"),
    ([{"prompt": "q", "answer": ["a"]}], r"line 1: field 'answer' must be a string"),
    ([{"prompt": "q", "answer": True}], r"line 1: field 'answer' must be a string"),
    ([{"prompt": "ok"}, "{not json"], r"line 2 column \d+: malformed JSON"),
    (["[1, 2]"], r"row 0: a prompt record must be an object with a 'prompt' field, got int"),
    (["7"], "expected a list of records"),
])
def test_bad_prompts_files_name_the_line_and_field(tmp_path, rows, message):
    path = write_lines(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataFormatError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompts file .*nope\.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "prompts.txt").write_text("hello\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_prompts(tmp_path / "prompts.txt")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_prompts(tmp_path / "latin1.jsonl")


def test_render_matches_the_offline_prompt_ids(tmp_path, tokenizer):
    rows = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."},
            {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "42"}],
             "rejected": [{"role": "assistant", "content": "40"}]}]
    path = write_lines(tmp_path / "pairs.jsonl", rows)
    offline = tokenize_pairs(load_preference_records(path), tokenizer, max_length=None,
                             max_prompt_length=None)
    records = load_prompts(path)
    for record, pair in zip(records, offline.pairs, strict=True):
        assert render_prompt_ids(record, tokenizer, None) == pair.prompt_ids
    chat_ids = render_prompt_ids(records[1], tokenizer, None)
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")
    # keep_end, like the offline truncation
    cut = tokenize_pairs(load_preference_records(path), tokenizer, max_length=None,
                         max_prompt_length=5)
    assert render_prompt_ids(records[1], tokenizer, 5) == cut.pairs[1].prompt_ids
    assert render_prompt_ids(records[1], tokenizer, 5) == chat_ids[-5:]
    with pytest.raises(ValueError, match="max_prompt_length"):
        render_prompt_ids(records[0], tokenizer, 0)


def test_conversational_prompt_needs_a_chat_template(tokenizer):
    class NoTemplate:
        chat_template = None

    record = PromptRecord(CHAT, None, 4, "p.jsonl line 5")
    with pytest.raises(ValueError, match=r"p\.jsonl line 5: a conversational prompt needs"):
        render_prompt_ids(record, NoTemplate(), None)
