"""Bad rows in a big file: ``data.on_bad_row: error | skip`` and ``data.max_bad_fraction``, on a
100k-row JSON Lines file with 0.5 % and 5 % bad rows (loading and validation only: no model), and
through the real ``fastpo-train`` on a small file."""

from __future__ import annotations

import json
import logging
import random

import pytest
from trainer_helpers import fastpo_train, job, one_error_line

from fastpo.engine.data.bad_rows import BadRowPolicy, reason_of
from fastpo.engine.data.files import load_preference_records
from fastpo.engine.data.formats import DataFormatError

ROWS = 100_000
# the kinds of bad row planted, as a line of the file, and the reason they are counted under
BAD = [
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', "malformed JSON"),
    ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}',
     "field 'chosen' must be a list of {role, content} messages"),
    ('{"question": "p", "answer": "c"}', "unrecognised record"),
    ('{"prompt": "p", "completion": "c", "label": true}',
     "unpaired record in data whose first record"),
]


def big_file(path, fraction: float, seed: int = 0) -> dict[int, str]:
    """A JSONL file of ROWS pairs, ``fraction`` of them bad (each kind in turn, at seeded
    random lines); returns {line number: reason} of the bad ones."""
    rng = random.Random(seed)
    bad_lines = sorted(rng.sample(range(2, ROWS + 1), int(ROWS * fraction)))  # line 1 is good
    planted, lines = {}, []
    bad_at = dict(zip(bad_lines, range(len(bad_lines))))
    for lineno in range(1, ROWS + 1):
        if lineno in bad_at:
            text, reason = BAD[bad_at[lineno] % len(BAD)]
            planted[lineno] = reason
            lines.append(text)
        else:
            lines.append(json.dumps({"prompt": f"question {lineno}", "chosen": "yes",
                                     "rejected": "no"}))
    path.write_text("\n".join(lines) + "\n")
    return planted


def test_skip_drops_and_counts_half_a_percent_of_bad_rows(tmp_path, caplog):
    path = tmp_path / "big.jsonl"
    planted = big_file(path, 0.005)
    assert len(planted) == 500
    with caplog.at_level(logging.WARNING):
        records = load_preference_records(path, bad_rows=BadRowPolicy(on_bad_row="skip"))
    assert len(records) == ROWS - 500
    kept = {int(o.rsplit(" ", 1)[1]) for o in records.origins}
    assert kept.isdisjoint(planted) and len(kept) == ROWS - 500  # exactly the bad ones dropped
    assert records[0] == {"prompt": "question 1", "chosen": "yes", "rejected": "no"}
    # the first few are logged with their line numbers, then one summary by reason
    first = sorted(planted)[:5]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 5
    for message, lineno in zip(skipped, first):
        assert message.startswith(f"skipping bad row: {path} line {lineno}")
    summary = caplog.records[-1].getMessage()
    assert summary.startswith(f"preference data {path}: skipped 500 of {ROWS} rows (0.50%) "
                              "are bad: ")
    for _, reason in BAD:
        assert f"100 {reason}" in summary


def test_more_bad_rows_than_max_bad_fraction_refuse_the_file(tmp_path):
    path = tmp_path / "big.jsonl"
    planted = big_file(path, 0.05)
    with pytest.raises(DataFormatError) as info:
        load_preference_records(path, bad_rows=BadRowPolicy(on_bad_row="skip"))
    message = str(info.value)
    assert message.startswith(f"preference data {path}: 5000 of {ROWS} rows (5.00%) are bad: "
                              "1000 ")
    assert "more than data.max_bad_fraction 0.01" in message
    assert f"The first: {path} line {min(planted)}" in message
    # a looser limit takes it
    records = load_preference_records(path, bad_rows=BadRowPolicy(on_bad_row="skip",
                                                                  max_bad_fraction=0.06))
    assert len(records) == ROWS - 5000
    # the default stops at the first bad row, naming the file, the line and the field
    with pytest.raises(DataFormatError, match=f"{path} line {min(planted)}"):
        load_preference_records(path)


def test_reasons_leave_out_the_values():
    where = "f.jsonl line 9"
    assert reason_of(f"{where}: missing field 'chosen'", where) == "missing field 'chosen'"
    assert reason_of(f"{where} column 4: malformed JSON (Expecting value)", where) == \
        "malformed JSON"
    assert reason_of(f"{where}: field 'label' must be true or false, got int 3", where) == \
        "field 'label' must be true or false"
    assert reason_of(f"{where}: unrecognised record (fields: a, b); expected one of: x", where) \
        == "unrecognised record"
    with pytest.raises(ValueError, match="on_bad_row must be 'error' or 'skip'"):
        BadRowPolicy(on_bad_row="drop")  # type: ignore[arg-type]


def test_the_cli_skips_a_few_bad_rows_and_refuses_many(tiny_dir, pairs_file, tmp_path):
    rows = json.loads(pairs_file.read_text())
    good = [json.dumps(r) for r in rows] * 13  # 208 rows
    lines = list(good)
    lines[100] = '{"conversations": [{"from": "human", "value": "hi"}], "chosen": '  # cut off
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = job(tiny_dir, pairs_file, tmp_path / "run", data={"train": str(path)},
               optimization={"max_steps": 1})
    proc = fastpo_train(data, tmp_path)  # default: error, naming the line
    assert proc.returncode == 2
    column = len(lines[100]) + 1  # the JSON ends where a value is expected
    assert one_error_line(proc) == (f"fastpo-train: error: {path} line 101 column {column}: "
                                    "malformed JSON (Expecting value)")
    proc = fastpo_train(data, tmp_path, "--data.on_bad_row", "skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"skipping bad row: {path} line 101 column {column}: malformed JSON" in proc.stderr
    assert f"skipped 1 of {len(lines)} rows (0.48%) are bad: 1 malformed JSON" in proc.stderr
    for i in range(0, 60, 4):  # 15 more bad rows: 16 of 208
        lines[i] = '{"prompt": "p"}'
    path.write_text("\n".join(lines) + "\n")
    proc = fastpo_train(data, tmp_path, "--data.on_bad_row", "skip")
    assert proc.returncode == 2
    assert one_error_line(proc).startswith(
        f"fastpo-train: error: preference data {path}: 16 of 208 rows (7.69%) are bad: 15 "
        "unrecognised record, 1 malformed JSON; more than data.max_bad_fraction 0.01")
