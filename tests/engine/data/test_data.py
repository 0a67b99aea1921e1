"""Preference data: formats, exact prompt/completion boundary, truncation, bad data, split."""

from __future__ import annotations

import json
import logging

import pytest

from fastpo.engine.data import dataset as data
from fastpo.engine.data.formats import DataFormatError

SYSTEM = "You answer in one word."
TURNS = [("What colour is the sky?", "Blue."), ("And grass?", None)]
CHOSEN, REJECTED = "Green, mostly.", "Purple!"


def conversational_pair() -> dict:
    prompt = [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": TURNS[0][0]},
              {"role": "assistant", "content": TURNS[0][1]},
              {"role": "user", "content": TURNS[1][0]}]
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}]}


def sharegpt_pair() -> dict:
    return {"conversations": [{"from": "system", "value": SYSTEM},
                              {"from": "human", "value": TURNS[0][0]},
                              {"from": "gpt", "value": TURNS[0][1]},
                              {"from": "human", "value": TURNS[1][0]}],
            "chosen": {"from": "gpt", "value": CHOSEN},
            "rejected": {"from": "gpt", "value": REJECTED}}


def implicit_pair() -> dict:
    pair = conversational_pair()
    return {"chosen": pair["prompt"] + pair["chosen"],
            "rejected": pair["prompt"] + pair["rejected"]}


def tokens_of(dataset: data.TokenizedDataset) -> list[tuple]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dataset.pairs]


def write_all_formats(rows: list[dict], tmp_path) -> list:
    """The same rows as JSON array, JSON Lines, Parquet, save_to_disk folder, Dataset, list."""
    import datasets

    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2))
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = datasets.Dataset.from_list(rows)
    parquet = tmp_path / "rows.parquet"
    table.to_parquet(str(parquet))
    folder = tmp_path / "rows_ds"
    table.save_to_disk(str(folder))
    return [array, lines, parquet, folder, table, datasets.DatasetDict({"train": table}), rows]


# ---------------------------------------------------------------------------------- formats
def test_all_formats_give_the_same_tokens(tokenizer, tmp_path):
    expected = data.tokenize_pairs([conversational_pair()], tokenizer)
    assert len(expected) == 1
    for style, row in (("conversational", conversational_pair()), ("sharegpt", sharegpt_pair()),
                       ("implicit", implicit_pair())):
        folder = tmp_path / style
        folder.mkdir()
        for source in write_all_formats([row, row], folder):
            records = data.load_preference_records(source)
            got = data.tokenize_pairs(records, tokenizer)
            assert tokens_of(got) == tokens_of(expected) * 2, (style, source)


def test_standard_and_implicit_strings_agree(tokenizer):
    explicit = {"prompt": "Q: The sky is", "chosen": " blue today.", "rejected": " green today."}
    implicit = {"chosen": "Q: The sky is blue today.", "rejected": "Q: The sky is green today."}
    records = data.load_preference_records([explicit, implicit, dict(explicit, label=1, id=7)])
    assert records[1] == explicit  # the shared prompt stops before the differing word
    assert records[2] == explicit  # extra fields (even a "label") do not change the format
    inside_word = data.load_preference_records([{"chosen": "The cat sat", "rejected": "The car"}])
    assert inside_word[0] == {"prompt": "The", "chosen": " cat sat", "rejected": " car"}
    got = data.tokenize_pairs(records, tokenizer)
    assert got.pairs[0] == got.pairs[1]
    pair = got.pairs[0]
    assert pair.prompt_ids == tokenizer("Q: The sky is")["input_ids"]
    assert pair.chosen_ids == tokenizer(" blue today.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


def test_unpaired_formats_agree(tokenizer):
    pair = conversational_pair()
    messages = {"messages": pair["prompt"] + pair["chosen"], "label": True}
    explicit = {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}
    unpaired = data.tokenize_pairs(data.load_preference_records([messages, explicit]), tokenizer)
    from_pairs = data.tokenize_pairs(data.load_preference_records([pair]), tokenizer,
                                     unpaired=True)
    paired = data.tokenize_pairs([pair], tokenizer)
    assert not unpaired.paired and unpaired.pairs == []
    assert unpaired.examples == from_pairs.examples
    p = paired.pairs[0]
    assert unpaired.examples == [data.TokenizedExample(p.prompt_ids, p.chosen_ids, True),
                                 data.TokenizedExample(p.prompt_ids, p.rejected_ids, False)]


def test_demo_sets_load(tokenizer, demo_pairs_path):
    raw = json.loads(demo_pairs_path.read_text())
    records = data.load_preference_records(demo_pairs_path)
    assert len(records) == len(raw) == 300
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for row, record in zip(raw[:20], records[:20]):
        assert record["prompt"] == [{"role": roles[t["from"]], "content": t["value"]}
                                    for t in row["conversations"]]
        assert record["chosen"] == [{"role": "assistant", "content": row["chosen"]["value"]}]
    kto = data.load_preference_records(demo_pairs_path.with_name("kto_en_demo.json"))
    assert {r["label"] for r in kto} == {True, False}
    assert all(r["completion"][0]["role"] == "assistant" for r in kto)


# --------------------------------------------------------------------------------- boundary
def test_boundary_matches_whole_conversation(tokenizer, demo_pairs_path):
    """prompt_ids + completion_ids is the tokenization of the whole rendered conversation, up to
    the template's newline after the final <|im_end|> (not scored: it is not the model's)."""
    records = [*data.load_preference_records(demo_pairs_path)[:25], conversational_pair()]
    dataset = data.tokenize_pairs(records, tokenizer, max_length=None, max_prompt_length=None)
    assert len(dataset) == len(records)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for record, pair in zip(records, dataset.pairs):
        for key, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            text = tokenizer.apply_chat_template(record["prompt"] + record[key], tokenize=False)
            whole = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert pair.prompt_ids + ids + newline == whole
            assert ids[-1] == tokenizer.eos_token_id
            content = record[key][-1]["content"]
            assert tokenizer.decode(ids) == content + tokenizer.eos_token
        assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------- truncation
def long_record(n_prompt_words: int, n_completion_words: int) -> dict:
    return {"prompt": " ".join(f"p{i}" for i in range(n_prompt_words)),
            "chosen": " " + " ".join(f"c{i}" for i in range(n_completion_words)),
            "rejected": " " + " ".join(f"r{i}" for i in range(n_completion_words))}


def test_truncation_modes(tokenizer):
    record = long_record(40, 40)
    full = data.tokenize_pairs([record], tokenizer, max_length=None, max_prompt_length=None)
    p = full.pairs[0]
    assert len(p.prompt_ids) > 30 and len(p.chosen_ids) > 30

    end = data.tokenize_pairs([record], tokenizer, max_length=40, max_prompt_length=16)
    q = end.pairs[0]
    assert q.prompt_ids == p.prompt_ids[-16:]
    assert q.chosen_ids == p.chosen_ids[:24] and q.rejected_ids == p.rejected_ids[:24]
    assert (end.stats.truncated_prompt, end.stats.truncated_completion) == (1, 1)

    start = data.tokenize_pairs([record], tokenizer, max_length=40, max_prompt_length=16,
                                truncation_mode="keep_start")
    assert start.pairs[0].prompt_ids == p.prompt_ids[:16]

    dropped = data.tokenize_pairs([record, long_record(2, 2)], tokenizer, max_length=40,
                                  max_prompt_length=16, truncation_mode="drop")
    assert len(dropped) == 1 and dropped.stats.dropped["too_long"] == 1
    assert dropped.pairs[0] == data.tokenize_pairs([long_record(2, 2)], tokenizer).pairs[0]

    # no room left for any completion token: dropped and counted
    no_room = data.tokenize_pairs([record, long_record(2, 2)], tokenizer, max_length=16,
                                  max_prompt_length=16)
    assert len(no_room) == 1 and no_room.stats.dropped["too_long"] == 1
    with pytest.raises(ValueError, match=r"no usable preference rows .* 1 dropped: cannot fit"):
        data.tokenize_pairs([record], tokenizer, max_length=16, max_prompt_length=16)


def test_identical_after_truncation_is_dropped(tokenizer):
    record = {"prompt": "Say", "chosen": " same words then A", "rejected": " same words then B"}
    got = data.tokenize_pairs([record, long_record(1, 1)], tokenizer, max_length=4,
                              max_prompt_length=2)
    assert len(got) == 1 and got.stats.dropped["identical_after_truncation"] == 1


# --------------------------------------------------------------------------------- bad data
def test_malformed_json_names_file_and_line(tmp_path):
    array = tmp_path / "bad.json"
    array.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a",,}\n]')
    with pytest.raises(DataFormatError, match=r"bad\.json line 3 column"):
        data.load_preference_records(array)
    lines = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    lines.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl line 4 column 2: malformed JSON"):
        data.load_preference_records(lines)


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a", "chosen": "b"}, r"rows\.jsonl line 2: missing field 'rejected'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, r"line 2: field 'chosen' must be a list"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "b", "rejected": "c"},
     r"line 2: fields chosen, rejected are strings but prompt are message lists"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [], "rejected": []},
     r"line 2: field 'prompt\[0\]\.role' has unknown role 'wizard'"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []},
     r"line 2: field 'prompt\[0\]' has no 'content'"),
    ({"prompt": [{"role": "user", "content": 5}], "chosen": [], "rejected": []},
     r"line 2: field 'prompt\[0\]\.content' must be a string"),
    ({"conversations": [{"from": "robot", "value": "x"}], "chosen": {"from": "gpt", "value": "y"},
      "rejected": {"from": "gpt", "value": "z"}},
     r"line 2: field 'conversations\[0\]\.from' has unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "gpt", "value": "y"}},
     r"line 2: missing field 'rejected' \(sharegpt format\)"),
    ({"prompt": [{"role": "user", "content": "x"}],
      "chosen": [{"role": "user", "content": "y"}],
      "rejected": [{"role": "assistant", "content": "z"}]},
     r"line 2: field 'chosen' must start with an assistant message"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, r"line 2: field 'label' must be true or"),
    ({"prompt": "a", "completion": "b"}, r"line 2: missing field 'label' \(unpaired format\)"),
    ({"messages": [{"role": "user", "content": "x"}], "label": True},
     r"line 2: field 'messages' must end with an assistant message"),
    ({"question": "a", "answer": "b"}, r"line 2: unrecognised record \(fields: answer, question\)"),
    ({"prompt": "a", "completion": "b", "label": True},
     r"line 2: unpaired record in data whose first record .*line 1.* is paired"),
])
def test_bad_rows_name_row_and_field(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=message):
        data.load_preference_records(path)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        data.load_preference_records(tmp_path / "nope.json")
    (tmp_path / "rows.txt").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        data.load_preference_records(tmp_path / "rows.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with"):
        data.load_preference_records(tmp_path / "folder")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="holds no records"):
        data.load_preference_records(tmp_path / "empty.jsonl")
    with pytest.raises(TypeError, match="got int"):
        data.load_preference_records(3)
    with pytest.raises(DataFormatError, match=r"records\[1\]: a record must be an object"):
        data.load_preference_records([{"prompt": "a", "chosen": "b", "rejected": "c"}, "row"])


def test_counted_drops_and_summary_logged_once(tokenizer, caplog):
    pair = conversational_pair()
    empty = dict(pair, chosen=[{"role": "assistant", "content": "  "}])
    same = dict(pair, rejected=pair["chosen"])
    rows = [pair, empty, same, {"prompt": "q", "chosen": "", "rejected": "x"},
            {"chosen": "same text", "rejected": "same text"}]
    got = data.tokenize_pairs(data.load_preference_records(rows), tokenizer)
    assert len(got) == 1 and got.stats.rows == 5 and got.stats.kept == 1
    assert got.stats.dropped == {"empty_completion": 2, "identical": 2}
    with caplog.at_level(logging.INFO, logger="fastpo.engine.data.dataset"):
        got.stats.log()
        got.stats.log()
    summaries = [r.message for r in caplog.records if "preference data" in r.message]
    assert summaries == ["preference data: 5 rows, 1 kept (0 with truncated prompt, 0 with "
                         "truncated completions), 4 dropped: empty completion 2, chosen identical "
                         "to rejected 2"]


def test_bad_tokenize_arguments(tokenizer):
    rows = [conversational_pair()]
    with pytest.raises(ValueError, match=r"max_prompt_length \(600\) must not exceed max_length"):
        data.tokenize_pairs(rows, tokenizer, max_length=500, max_prompt_length=600)
    with pytest.raises(ValueError, match="truncation_mode must be one of keep_end"):
        data.tokenize_pairs(rows, tokenizer, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        data.tokenize_pairs(rows, tokenizer, max_length=0)


# ------------------------------------------------------------------------------------ split
def test_split_train_eval(tokenizer):
    rows = [long_record(2 + i % 5, 1 + i % 3) | {"chosen": f" yes {i}"} for i in range(20)]
    dataset = data.tokenize_pairs(rows, tokenizer)
    train, held_out = data.split_train_eval(dataset, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5)
    assert sorted(map(str, train.pairs + held_out.pairs)) == sorted(map(str, dataset.pairs))
    again = data.split_train_eval(dataset, 0.25, seed=3)[1]
    other = data.split_train_eval(dataset, 0.25, seed=4)[1]
    assert again.pairs == held_out.pairs and other.pairs != held_out.pairs
    assert len(data.split_train_eval(dataset, 0.0)[1]) == 0
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        data.split_train_eval(dataset, 1.0)
    assert dataset.fingerprint() != train.fingerprint()


def test_records_remember_file_and_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    records = data.load_preference_records(path)
    assert records == [row, row] and records.source == str(path)
    assert records.origins == [f"{path} line 1", f"{path} line 3"]
    assert data.load_preference_records([row]).origins == ["records[0]"]
