"""Data as users have it: every file form with a column mapping, system and tools columns,
chat_template_kwargs, weighted mixtures, and the tokenization cache."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from trainer_helpers import write_forms

from fastpo.engine.data.dataset import tokenize_pairs
from fastpo.engine.data.formats import DataFormatError, normalize_record
from fastpo.engine.data.sources import (
    DataSource,
    default_mixture_size,
    load_source,
    mixture_picks,
    take_mixture,
)
from fastpo.engine.data.token_cache import (
    cached_tokenization,
    load_tokenized,
    tokenization_key,
)

ROWS = [{"question": f"What is {i} plus {i}?", "good": f" It is {2 * i}.",
         "bad": f" It is {2 * i + 1}.", "note": "x"} for i in range(6)]
MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_every_file_form_loads_with_a_column_mapping(tmp_path):
    paths = write_forms(tmp_path, ROWS)
    expected = [{"prompt": r["question"], "chosen": r["good"], "rejected": r["bad"]}
                for r in ROWS]
    for form, path in paths.items():
        records = load_source(DataSource(paths=(str(path),), columns=MAPPING))
        assert list(records) == expected, form
        assert records.origins[2].endswith(("row 2", "line 3")), (form, records.origins[2])
    # a list of files is their concatenation, in order
    both = load_source(DataSource(paths=(str(paths["csv"]), str(paths["folder"])),
                                  columns=MAPPING))
    assert list(both) == expected + expected
    assert both.origins[6] == f"{paths['folder']} row 0"


def test_a_missing_mapped_column_names_file_row_and_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[3]["bad"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = DataSource(paths=(str(path),), columns=MAPPING, setting="data.mixture[1]")
    with pytest.raises(DataFormatError, match=rf"{path} line 4: column 'bad' \(mapped to "
                                              r"'rejected' by data.mixture\[1\].columns\) is "
                                              r"missing; the row's columns: good, note, question"):
        load_source(source)
    rows[3]["bad"] = 7  # a wrongly typed value names the field and the user's column
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=rf"{path} line 4: field 'rejected' must be a list "
                                              r".* \(field 'rejected' is your column 'bad': "
                                              r"data.mixture\[1\].columns\)"):
        load_source(source)
    with pytest.raises(DataFormatError, match="unknown field 'answer'"):
        DataSource(paths=(str(path),), columns={"answer": "good"})
    with pytest.raises(DataFormatError, match="'good' is mapped to both"):
        DataSource(paths=(str(path),), columns={"chosen": "good", "rejected": "good"})


def test_system_and_tools_columns_make_a_conversation():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief.",
           "tools": json.dumps(tools)}
    record = normalize_record(row, "row 0")
    assert record == {"prompt": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "2+2?"}],
                      "chosen": [{"role": "assistant", "content": "4"}],
                      "rejected": [{"role": "assistant", "content": "5"}], "tools": tools}
    assert normalize_record(record, "row 0") == record  # canonical records are stable
    messages = {"messages": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}
    assert normalize_record(messages, "r")["prompt"] == messages["messages"]
    with pytest.raises(DataFormatError, match="row 5: field 'tools' is a string but not JSON"):
        normalize_record({**row, "tools": "{nope"}, "row 5")
    with pytest.raises(DataFormatError, match="row 5: field 'system' must be a string"):
        normalize_record({**row, "system": 3}, "row 5")


# a chat template that reads enable_thinking and renders the tools
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% set quiet = enable_thinking is defined and not enable_thinking %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and quiet %}<think></think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if quiet %}<think></think>{% endif %}{% endif %}")


@pytest.fixture
def thinking_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_chat_template_kwargs_and_tools_reach_the_template(thinking_tokenizer):
    tools = [{"type": "function", "function": {"name": "lookup_weather", "parameters": {}}}]
    rows = [{"prompt": [{"role": "user", "content": "Weather in Oslo?"}],
             "chosen": [{"role": "assistant", "content": "Cold."}],
             "rejected": [{"role": "assistant", "content": "Hot."}], "tools": tools}]
    plain = tokenize_pairs(rows, thinking_tokenizer, max_length=None, max_prompt_length=None)
    off = tokenize_pairs(rows, thinking_tokenizer, max_length=None, max_prompt_length=None,
                         chat_template_kwargs={"enable_thinking": False})
    decode = thinking_tokenizer.decode
    assert "TOOLS: lookup_weather" in decode(plain.pairs[0].prompt_ids)
    assert "<think></think>" not in decode(plain.pairs[0].prompt_ids)
    assert decode(off.pairs[0].prompt_ids).endswith("<|im_start|>assistant\n<think></think>")
    assert "TOOLS: lookup_weather" in decode(off.pairs[0].prompt_ids)
    assert decode(off.pairs[0].chosen_ids) == decode(plain.pairs[0].chosen_ids)
    assert off.settings["chat_template_kwargs"] == {"enable_thinking": False}
    assert off.fingerprint() != plain.fingerprint()


# ------------------------------------------------------------------------------ mixtures
def test_mixture_proportions_match_the_weights_over_10k_items():
    sizes, weights = [37, 2000, 5], [0.5, 0.3, 0.2]
    picks = mixture_picks(sizes, weights, size=10_000, seed=3)
    assert len(picks) == 10_000
    counts = Counter(source for source, _ in picks)
    for source, weight in enumerate(weights):
        assert abs(counts[source] / 10_000 - weight) < 0.02, counts
    # within a source, oversampling uses every item before repeating any
    for source, n in enumerate(sizes):
        uses = Counter(item for s, item in picks if s == source)
        assert max(uses.values()) - min(uses.values()) <= 1 and len(uses) == min(n, counts[source])
    # the first 1000 picks are mixed too (not one source after another)
    head = Counter(source for source, _ in picks[:1000])
    assert all(abs(head[s] / 1000 - w) < 0.05 for s, w in enumerate(weights)), head
    # seeded: the same arguments give the same list, another seed another order
    assert mixture_picks(sizes, weights, size=10_000, seed=3) == picks
    assert mixture_picks(sizes, weights, size=10_000, seed=4) != picks
    # default size: no item of any source used twice
    assert default_mixture_size([100, 10], [0.5, 0.5]) == 20
    assert default_mixture_size([100, 10], [0.9, 0.1]) == 100


def test_take_mixture_keeps_the_picked_items(tokenizer):
    a = tokenize_pairs([{"prompt": "a", "chosen": " x", "rejected": " y"}], tokenizer)
    b = tokenize_pairs([{"prompt": "b", "chosen": " x", "rejected": " z"},
                        {"prompt": "c", "chosen": " x", "rejected": " w"}], tokenizer)
    mixed = take_mixture([a, b], [(1, 1), (0, 0), (1, 0), (1, 1)])
    assert mixed.pairs == [b.pairs[1], a.pairs[0], b.pairs[0], b.pairs[1]]
    assert mixed.stats.rows == 3 and mixed.stats.kept == 4
    unpaired = tokenize_pairs([{"prompt": "q", "completion": " x", "label": True},
                               {"prompt": "q", "completion": " y", "label": False}], tokenizer)
    with pytest.raises(DataFormatError, match="paired and unpaired"):
        take_mixture([a, unpaired], [(0, 0)])


# ----------------------------------------------------------------------- tokenization cache
def test_the_tokenization_cache_is_keyed_and_safe_to_load(tmp_path, tokenizer):
    paths = write_forms(tmp_path / "data", ROWS)
    source = DataSource(paths=(str(paths["parquet"]),), columns=MAPPING)
    calls = []

    def build():
        calls.append(1)
        return tokenize_pairs(load_source(source), tokenizer, max_length=32,
                              max_prompt_length=16, unpaired=True)

    settings = {"max_length": 32, "kto": True}
    key = tokenization_key(source.content_hash(), tokenizer, settings)
    first = cached_tokenization(tmp_path / "cache" / key, build)
    again = cached_tokenization(tmp_path / "cache" / key, build)
    assert len(calls) == 1  # the second call read the entry
    assert again.examples == first.examples and again.fingerprint() == first.fingerprint()
    assert again.stats.summary() == first.stats.summary()
    assert sorted(p.name for p in (tmp_path / "cache" / key).iterdir()) == [
        ".complete", "meta.json", "tokens.safetensors"]  # no pickle anywhere
    # the key follows the data's bytes, the mapping, the tokenizer and the settings
    other_rows = [dict(r, good=r["good"] + "!") for r in ROWS]
    changed = write_forms(tmp_path / "changed", other_rows)["parquet"]
    assert tokenization_key(DataSource(paths=(str(changed),), columns=MAPPING).content_hash(),
                            tokenizer, settings) != key
    remapped = DataSource(paths=(str(paths["parquet"]),), columns={**MAPPING, "chosen": "bad",
                                                                   "rejected": "good"})
    assert tokenization_key(remapped.content_hash(), tokenizer, settings) != key
    assert tokenization_key(source.content_hash(), tokenizer, {**settings, "max_length": 33}) \
        != key
    import copy

    other_tok = copy.deepcopy(tokenizer)
    other_tok.chat_template = TEMPLATE
    assert tokenization_key(source.content_hash(), other_tok, settings) != key
    from fastpo.engine.data import token_cache

    code = token_cache._code_hash
    token_cache._code_hash = lambda: "another fastpo"
    try:  # another version of the tokenizing code never reads this entry
        assert tokenization_key(source.content_hash(), tokenizer, settings) != key
    finally:
        token_cache._code_hash = code
    # an entry damaged on disk is named, and rebuilt by cached_tokenization
    (tmp_path / "cache" / key / "tokens.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"tokenization cache .* unreadable"):
        load_tokenized(tmp_path / "cache" / key)
    rebuilt = cached_tokenization(tmp_path / "cache" / key, build)
    assert len(calls) == 2 and rebuilt.fingerprint() == first.fingerprint()


def test_online_prompts_get_the_chat_template_kwargs_too(thinking_tokenizer):
    from fastpo.engine.online.prompts import PromptRecord, render_prompt_ids

    record = PromptRecord([{"role": "user", "content": "Hi"}], None, 0, "prompts.jsonl line 1")
    quiet = render_prompt_ids(record, thinking_tokenizer, None, {"enable_thinking": False})
    plain = render_prompt_ids(record, thinking_tokenizer, None)
    assert thinking_tokenizer.decode(quiet).endswith("assistant\n<think></think>")
    assert not thinking_tokenizer.decode(plain).endswith("</think>")


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    (tmp_path / "a_file").write_text("")
    entry = tmp_path / "a_file" / "cache" / "key"  # a folder under a file: cannot be made
    rows = [{"prompt": "a", "chosen": " x", "rejected": " y"}]
    dataset = cached_tokenization(entry, lambda: tokenize_pairs(rows, tokenizer))
    assert len(dataset) == 1
    assert "tokenization cache" in caplog.text and "the data stays in memory" in caplog.text

    def broken():
        raise FileNotFoundError(2, "No such file", str(tmp_path / "data.jsonl"))

    with pytest.raises(FileNotFoundError, match=r"data\.jsonl"):  # the data's error, not a warning
        cached_tokenization(tmp_path / "cache" / "key", broken)
