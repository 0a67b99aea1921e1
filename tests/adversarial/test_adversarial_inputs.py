"""Adversarial inputs to the config, the data files and the losses: each mistake a user can make
gets the exact outcome, an exception of the right type whose message names the file / line /
row / field / key, or from ``fastpo-train`` exit status 2 with one line and no traceback."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from fastpo.engine.data import dataset as data
from fastpo.engine.data.formats import DataFormatError
from fastpo.engine.errors import InputError
from fastpo.engine.losses import kto_loss, preference_loss
from fastpo.engine.train import cli
from fastpo.engine.train.config import ConfigError
from fastpo.engine.train.config_loading import load_config

PAIR = {"prompt": "Q: the sky is", "chosen": " blue.", "rejected": " green."}


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastpo-train: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("argv, words", [
    (["--optimization.learning_rate", ".inf"],
     ["optimization.learning_rate", "finite number", "got inf", "--optimization.learning_rate"]),
    (["--optimization.learning_rate=-.inf"], ["optimization.learning_rate", "finite number"]),
    (["--loss.beta", "nan"], ["loss.beta", "finite number"]),
    (["--optimization.adam_epsilon", "1e999"], ["optimization.adam_epsilon", "finite number"]),
    (["--optimization.max_grad_norm", ".nan"], ["optimization.max_grad_norm", "finite number"]),
    (["--loss.loss_type", "[sigmoid, sft]", "--loss.loss_weights", "[1.0, .nan]"],
     ["loss.loss_weights.1", "finite number"]),
    (["--model.lora.alpha", ".inf"], ["model.lora.alpha", "finite number"]),
    (["--loss.f_alpha_divergence_coef", "2"], ["loss.f_alpha_divergence_coef", "less than"]),
    (["--loss.method", "kto", "--loss.loss_type", "sigmoid"],
     ["loss.loss_type", "unknown loss_type 'sigmoid'", "kto"]),
])
def test_bad_config_values_exit_2_naming_the_key(capsys, argv, words):
    code, _, err = run_cli(capsys, ["--print-config", *argv])
    assert_one_line_error(code, err, "invalid configuration", *words)


def test_non_finite_float_in_a_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("loss:\n  beta: 0.1\noptimization:\n  learning_rate: .nan\n")
    where = re.escape(str(path))
    with pytest.raises(ConfigError, match=rf"optimization\.learning_rate: Input should be a "
                                          rf"finite number \(got nan\) \({where}:4\)"):
        load_config(path)


@pytest.mark.parametrize("method, loss_type", [
    ("kto", "kto"), ("cpo", "sigmoid"), ("simpo", "simpo"), ("orpo", "orpo"), ("dpo", "sigmoid")])
def test_choosing_a_method_brings_its_default_loss_type(capsys, method, loss_type):
    code, out, err = run_cli(capsys, ["--print-config", "--loss.method", method])
    assert code == 0, err
    printed = yaml.safe_load(out)
    cfg = load_config(overrides=["--loss.method", method])
    assert printed["loss"]["method"] == method and cfg.loss.resolved_loss_types() == [loss_type]
    # the default job's layout is auto for every method (auto never gives kto shared-prompt rows)
    assert printed["data"]["layout"] == "auto" and printed["data"]["share_prompt"] is None


def test_config_path_that_is_a_folder_or_not_utf8(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["--config", str(tmp_path), "--print-config"])
    assert_one_line_error(code, err, f"config file {tmp_path} is a folder")
    bad = tmp_path / "job.yaml"
    raw = b"loss:\n  beta: 0.1 # caf\xe9\n"
    bad.write_bytes(raw)
    code, _, err = run_cli(capsys, ["--config", str(bad), "--print-config"])
    assert raw.index(b"\xe9") == 23
    assert_one_line_error(code, err, str(bad), "not UTF-8", "byte offset 23", "line 2")


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("FASTPO_TRACEBACK", "1")
    with pytest.raises(ConfigError, match=r"optimization\.learning_rate"):
        cli.main(["--print-config", "--optimization.learning_rate", ".inf"])


def test_exit_status_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "fastpo.engine.train.cli", "--print-config",
         "--optimization.learning_rate", ".inf"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FASTPO_TRACEBACK": "0"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "optimization.learning_rate")


# ------------------------------------------------------------------------------------- paths
def test_output_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    code, _, err = run_cli(capsys, ["--logging.output_dir", str(target)])
    assert_one_line_error(code, err, "logging.output_dir", str(target), "is a file")
    code, _, err = run_cli(capsys, ["--logging.output_dir", str(target / "run")])
    assert_one_line_error(code, err, "logging.output_dir", f"is under {target}, a file")


def test_model_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, ["--model.name_or_path", str(missing)])
    assert_one_line_error(code, err, "model.name_or_path", f"model path {missing} does not exist")
    code, _, err = run_cli(capsys, ["--model.tokenizer", str(missing)])
    assert_one_line_error(code, err, "model.tokenizer", f"tokenizer path {missing} does not")


def test_folder_without_a_model_or_tokenizer(capsys, tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    code, _, err = run_cli(capsys, ["--model.name_or_path", str(empty)])
    assert_one_line_error(code, err, "model.name_or_path", f"{empty} holds no model",
                          "config.json", "*.safetensors", "found notes.txt")
    code, _, err = run_cli(capsys, ["--model.name_or_path", str(tiny_dir),
                                    "--model.tokenizer", str(empty)])
    assert_one_line_error(code, err, "model.tokenizer", f"{empty} holds no tokenizer",
                          "tokenizer.json")


def test_data_file_that_does_not_exist(capsys, tmp_path, tiny_dir):
    missing = tmp_path / "pairs.jsonl"
    code, _, err = run_cli(capsys, ["--model.name_or_path", str(tiny_dir),
                                    "--data.train", str(missing)])
    assert_one_line_error(code, err, "data.train", f"preference data {missing} does not exist")


# -------------------------------------------------------------------------------------- data
def test_data_file_not_utf8_names_file_offset_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    first = (json.dumps(PAIR) + "\n").encode()
    path.write_bytes(first + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    offset = len(first) + len('{"prompt": "caf')
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"preference data {where} is not UTF-8 text: byte "
                                              rf"0xe9 at byte offset {offset} \(line 2\)"):
        data.load_preference_records(path)


@pytest.mark.parametrize("content, got", [
    (json.dumps({"data": [PAIR]}, indent=2), r"got one JSON object \(keys: data\)"),
    ('"just a string"', "got a JSON str"),
    ("42\n", "got a JSON int"),
])
def test_json_that_is_not_a_list_of_records(tmp_path, content, got):
    path = tmp_path / "pairs.json"
    path.write_text(content)
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"{where}: expected a list of records .*{got}"):
        data.load_preference_records(path)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"preference data {where}: not a readable Parquet"):
        data.load_preference_records(path)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_text_the_tokenizer_rejects_names_row_and_field(tmp_path, tokenizer, field):
    path = tmp_path / "pairs.jsonl"
    bad = dict(PAIR, **{field: PAIR[field] + "\ud800"})  # a lone surrogate: valid JSON escape
    path.write_text(json.dumps(PAIR) + "\n\n" + json.dumps(bad) + "\n")
    records = data.load_preference_records(path)
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"{where} line 3: field '{field}' holds a "
                                              r"character that is not valid Unicode"):
        data.tokenize_pairs(records, tokenizer)


def test_rejected_text_named_in_kto_split_of_pairs(tmp_path, tokenizer):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR, dict(PAIR, rejected=" x\ud800")]))
    records = data.load_preference_records(path)
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"{where} row 1: field 'rejected'"):
        data.tokenize_pairs(records, tokenizer, unpaired=True)


@pytest.mark.parametrize("labels, counts, missing", [
    ([True, True, True], "3 desirable and 0 undesirable", "undesirable"),
    ([False, False], "0 desirable and 2 undesirable", "desirable"),
])
def test_kto_data_with_one_kind_only_is_refused(tmp_path, tokenizer, labels, counts, missing):
    path = tmp_path / "kto.jsonl"
    write_rows(path, [{"prompt": f"Q{i}:", "completion": f" answer {i}.", "label": label}
                      for i, label in enumerate(labels)])
    records = data.load_preference_records(path)
    where = re.escape(str(path))
    with pytest.raises(DataFormatError, match=rf"{where}: KTO needs both desirable and undesirable "
                                              rf"examples; got {counts}.*add {missing}"):
        data.tokenize_pairs(records, tokenizer)


def test_kto_side_emptied_by_dropping_is_refused(tmp_path, tokenizer):
    path = tmp_path / "kto.jsonl"
    write_rows(path, [{"prompt": "Q:", "completion": " yes.", "label": True},
                      {"prompt": "Q:", "completion": "   ", "label": False}])
    with pytest.raises(DataFormatError, match=r"got 1 desirable and 0 undesirable after "
                                              r"tokenization \(.*empty completion 1"):
        data.tokenize_pairs(data.load_preference_records(path), tokenizer)


def test_kto_split_without_undesirable_training_example(tokenizer):
    rows = [{"prompt": f"Q{i}:", "completion": f" a{i}.", "label": i > 0} for i in range(4)]
    dataset = data.tokenize_pairs(data.load_preference_records(rows), tokenizer)
    undesirable = next(i for i, e in enumerate(dataset.examples) if not e.label)
    seed = next(s for s in range(100) if undesirable in
                __import__("random").Random(s).sample(range(4), 1))
    with pytest.raises(DataFormatError, match=r"training split \(eval_fraction 0\.25\): KTO "
                                              r"needs both .* got 3 desirable and 0 undesirable"):
        data.split_train_eval(dataset, 0.25, seed=seed)


# ------------------------------------------------------------------------------------ losses
def logps(n: int = 3, **kw) -> torch.Tensor:
    return -torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 10


@pytest.mark.parametrize("kwargs, error, message", [
    ({"beta": -0.1}, ValueError, r"beta must be a finite number > 0, got -0\.1"),
    ({"beta": math.nan}, ValueError, r"beta must be a finite number > 0, got nan"),
    ({"beta": math.inf}, ValueError, r"beta must be a finite number > 0, got inf"),
    ({"beta": "0.1"}, TypeError, r"beta must be a float, got str"),
    ({"label_smoothing": 0.5}, ValueError, r"label_smoothing must lie in \[0, 0\.5\), got 0\.5"),
    ({"label_smoothing": math.nan}, ValueError, r"label_smoothing must lie in \[0, 0\.5\)"),
    ({"loss_type": "sigmoidd"}, ValueError, r"unknown loss_type 'sigmoidd'; valid loss types"),
    ({"loss_type": None}, TypeError, r"loss_type must be a name or a list of names"),
    ({"loss_type": []}, ValueError, r"loss_type is empty"),
    ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, ValueError,
     r"loss_weights has 1 entries but loss_type has 2"),
    ({"loss_weights": [math.inf]}, ValueError, r"loss_weights\[0\] must be a finite float"),
    ({"loss_weights": 1.0}, TypeError, r"loss_weights must be a list of floats, got float"),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.nan}, ValueError,
     r"f_alpha_divergence_coef must lie in \[0, 1\]"),
    ({"f_divergence_type": "tv"}, ValueError, r"unknown f_divergence_type 'tv'"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, r"discopop_tau must be a finite"),
    ({"ld_alpha": 1.5}, ValueError, r"ld_alpha must lie in \[0, 1\]"),
    ({"loss_type": "ipo"}, ValueError, r"need chosen_num_tokens and rejected_num_tokens"),
])
def test_preference_loss_bad_arguments(kwargs, error, message):
    x = logps()
    with pytest.raises(error, match=message):
        preference_loss(x, x + 1, x - 1, x, **kwargs)


@pytest.mark.parametrize("tensors, error, message", [
    ((logps(3), logps(4), logps(3), logps(3)), ValueError,
     r"policy_rejected_logps has shape \(4,\) but the policy log-probs have shape \(3,\)"),
    ((logps(3), logps(3), logps(3)[:, None], logps(3)), ValueError,
     r"ref_chosen_logps has shape \(3, 1\)"),
    ((logps(6).view(3, 2), logps(6).view(3, 2), None, None), ValueError,
     r"policy_chosen_logps must have shape \[B\], got \(3, 2\)"),
    ((logps(3).long(), logps(3), logps(3), logps(3)), TypeError,
     r"policy_chosen_logps must be a floating tensor, got torch\.int64"),
    ((logps(3), logps(3), None, logps(3)), ValueError,
     r"need reference log-probs; \['ref_chosen_logps'\] not given"),
    ((torch.zeros(0, dtype=torch.float64),) * 4, ValueError, r"policy_chosen_logps is empty"),
    (([-1.0, -2.0], logps(2), logps(2), logps(2)), TypeError,
     r"policy_chosen_logps must be a tensor, got list"),
])
def test_preference_loss_bad_tensors(tensors, error, message):
    with pytest.raises(error, match=message):
        preference_loss(*tensors)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"desirable_weight": -1.0}, ValueError, r"desirable_weight must be a finite number > 0"),
    ({"undesirable_weight": math.nan}, ValueError, r"undesirable_weight must be a finite"),
    ({"loss_type": "sigmoid"}, ValueError, r"unknown loss_type 'sigmoid'; valid .*'kto'"),
    ({"kl": None}, ValueError, r"loss_type 'kto' needs the KL reference point"),
    ({"kl": torch.zeros(2)}, ValueError, r"kl must be a 0-d tensor"),
    ({"desirable": torch.tensor([1, 0, 1])}, TypeError, r"desirable must be a bool tensor"),
])
def test_kto_loss_bad_arguments(kwargs, error, message):
    x = logps()
    args = {"desirable": torch.tensor([True, False, True]), "kl": torch.tensor(0.1), **kwargs}
    desirable = args.pop("desirable")
    with pytest.raises(error, match=message):
        kto_loss(x, x - 1, desirable, **args)


def test_kto_batch_without_undesirable_example_has_a_finite_loss():
    x = logps(4)
    out = kto_loss(x, x - 1, torch.ones(4, dtype=torch.bool), kl=torch.tensor(0.2))
    expected = torch.sigmoid(-0.1 * (torch.ones(4, dtype=torch.float64) - 0.2)).mean()
    torch.testing.assert_close(out.loss, expected)
    assert torch.isfinite(out.metrics["rewards/chosen"])


def test_input_errors_are_value_errors():
    # every user-input error is one type the CLI answers with exit status 2
    assert issubclass(ConfigError, InputError) and issubclass(DataFormatError, InputError)
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("chosen_items, rejected_items", [(3, 0), (0, 2)])
def test_kto_held_out_with_one_kind_reports_no_nan(chosen_items, rejected_items):
    """A held-out KTO split with one kind only: that side's keys are left out, never NaN."""
    from fastpo.engine.train.objective import EVAL_KEYS, summarize_eval
    from fastpo.engine.train.reports import eval_text

    values = dict.fromkeys(EVAL_KEYS, 0.0)
    values.update(items=chosen_items + rejected_items, loss=1.5, correct=1.0,
                  chosen_reward=0.3 * chosen_items, rejected_reward=-0.2 * rejected_items,
                  chosen_items=chosen_items, rejected_items=rejected_items)
    out = summarize_eval(torch.tensor([values[k] for k in EVAL_KEYS]), paired=False)
    assert all(math.isfinite(v) for v in out.values())
    assert "rewards/margins" not in out
    assert out["count/chosen"] == chosen_items and out["count/rejected"] == rejected_items
    assert ("rewards/chosen" in out) == bool(chosen_items)
    assert ("rewards/rejected" in out) == bool(rejected_items)
    assert "margin n/a (one kind only)" in eval_text("eval", 1, out)
