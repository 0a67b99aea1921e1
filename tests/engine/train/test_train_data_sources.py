"""Every data form through ``fastpo-train`` (its main(), a tiny model, 1-2 steps): file lists,
CSV / Parquet / Arrow / JSONL / save_to_disk folders with column mappings, a weighted mixture
that resumes exactly, errors naming file, row and column, and the shared tokenization cache."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml
from trainer_helpers import job, losses, merge, run, run_killed, write_forms

from fastpo.engine.train import cli
from fastpo.engine.train.metrics_log import read_jsonl

WORDS = ["red", "green", "blue", "cold", "warm", "tall", "short", "quick", "slow", "bright"]


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Name a word like {WORDS[(i + offset) % 10]} (case {i + offset}).",
             "good": f" {WORDS[(i + offset + 1) % 10]} is a fine answer.",
             "bad": f" No {i}.", "extra": i} for i in range(n)]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forms")
    return {"a": write_forms(folder / "a", rows(10)), "b": write_forms(folder / "b", rows(8, 3))}


MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def write_config(path, tiny_dir, out, data: dict) -> str:
    config = {"model": {"name_or_path": str(tiny_dir)},
              "data": {"max_length": 48, "max_prompt_length": 24, "eval_fraction": 0.0,
                       "cache_dir": str(out / "cache"), **data},
              "optimization": {"micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": 1},
              "logging": {"output_dir": str(out), "progress": "none", "tensorboard": False,
                          "eval_before": False},
              "checkpoint": {"export": "none"}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_every_data_form_trains_through_the_cli(forms, tiny_dir, tmp_path, capsys):
    a, b = forms["a"], forms["b"]
    mixture = [{"path": str(a["csv"]), "weight": 2.0},
               {"path": [str(a["parquet"]), str(a["arrow"])], "weight": 1.0},
               {"path": str(b["folder"]), "weight": 1.0},
               {"path": str(b["jsonl"]), "weight": 1.0,
                "columns": {"prompt": "question", "chosen": "bad", "rejected": "good"}}]
    config = write_config(tmp_path / "mix.yaml", tiny_dir, tmp_path / "mix",
                          {"columns": MAPPING, "mixture": mixture, "mixture_size": 20,
                           "eval": [str(b["json"]), str(a["folder"])]})
    assert cli.main(["--config", config]) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "mix"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl", "train")] == [1]
    after = read_jsonl(out / "metrics.jsonl", "eval")[-1]
    assert after["when"] == "after" and after["items"] == 18  # 8 + 10 held-out rows

    # a list of files (CSV + a save_to_disk folder) as data.train, from the command line
    config = write_config(tmp_path / "list.yaml", tiny_dir, tmp_path / "list",
                          {"columns": MAPPING})
    status = cli.main(["--config", config, "--data.train", f"[{a['csv']}, {b['folder']}]",
                       "--data.eval_fraction", "0.2", "--optimization.max_steps", "2"])
    assert status == 0, capsys.readouterr().err[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "list" / "metrics.jsonl", "train")] == [1, 2]


def test_a_data_mistake_is_one_line_naming_file_row_and_column(forms, tiny_dir, tmp_path,
                                                              capsys):
    bad = tmp_path / "bad.jsonl"
    lines = rows(6)
    del lines[4]["good"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = write_config(tmp_path / "bad.yaml", tiny_dir, tmp_path / "bad",
                          {"mixture": [{"path": str(forms["a"]["csv"]), "weight": 1.0,
                                        "columns": MAPPING},
                                       {"path": str(bad), "weight": 1.0, "columns": MAPPING}]})
    capsys.readouterr()
    assert cli.main(["--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"fastpo-train: error: {bad} line 5: column 'good' (mapped to 'chosen' by "
                   "data.mixture[1].columns) is missing; the row's columns: bad, extra, "
                   "question")
    assert cli.main(["--config", config, "--data.columns", "{answer: good}"]) == 2
    assert "data.columns: unknown field 'answer'" in capsys.readouterr().err
    assert cli.main(["--config", config, "--data.train", str(bad)]) == 2
    assert "give data.train or data.mixture, not both" in capsys.readouterr().err
    missing = tmp_path / "nope.parquet"
    assert cli.main(["--config", config, "--data.mixture",
                     f"[{{path: {missing}, weight: 1}}]"]) == 2
    assert f"data.mixture[0].path: preference data {missing} does not exist" \
        in capsys.readouterr().err


def test_a_killed_run_resumes_mid_mixture_exactly(forms, tiny_dir, pairs_file, tmp_path):
    a, b = forms["a"], forms["b"]
    sections = dict(
        data={"columns": MAPPING, "train": None, "mixture_size": 16,
              "cache_dir": str(tmp_path / "cache"),
              "mixture": [{"path": str(a["parquet"]), "weight": 3.0},
                          {"path": str(b["csv"]), "weight": 1.0}]},
        optimization={"max_steps": 4},
        checkpoint={"every_steps": 2, "keep_last": 2})
    killed = job(tiny_dir, pairs_file, tmp_path / "killed", **sections)
    proc = run_killed(killed, 3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    first = read_jsonl(tmp_path / "killed" / "metrics.jsonl", "train")
    resumed = run(merge(killed, {"checkpoint": {"resume": True}}))
    assert [r["step"] for r in resumed.history] == [3, 4]
    straight = run(job(tiny_dir, pairs_file, tmp_path / "straight", **sections))
    expected = losses(straight.history)
    assert losses(first) == pytest.approx(expected[:3], rel=1e-6, abs=1e-7)
    assert losses(resumed.history) == pytest.approx(expected[2:], rel=1e-6, abs=1e-7)
    assert [r["tokens"] for r in resumed.history] == [r["tokens"] for r in straight.history[2:]]


def test_local_rank_0_builds_the_cache_and_the_others_read_it(forms, tokenizer, tmp_path,
                                                             monkeypatch):
    from fastpo.engine.train import job as job_module
    from fastpo.engine.train.config_loading import config_from_dict
    from fastpo.engine.train.runtime import Runtime

    cfg = config_from_dict({"data": {"train": str(forms["a"]["arrow"]), "columns": MAPPING,
                                     "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.25,
                                     "max_length": 48, "max_prompt_length": 24}})
    events = []

    class Node(Runtime):
        def barrier(self) -> None:
            events.append(("barrier", self.local_rank,
                           len(list((tmp_path / "cache").glob("*/.complete")))))

    cpu = torch.device("cpu")
    train0, held0 = job_module.load_datasets(cfg, tokenizer,
                                             runtime=Node(0, 2, 0, cpu, deepspeed=False))
    # rank 0 had written the entry when it reached the barrier
    assert events == [("barrier", 0, 1)]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("local rank 1 tokenized instead of reading the cache")

    monkeypatch.setattr(job_module, "tokenize_pairs", no_tokenizing)
    train1, held1 = job_module.load_datasets(cfg, tokenizer,
                                             runtime=Node(1, 2, 1, cpu, deepspeed=False))
    assert events[1] == ("barrier", 1, 1)
    assert train1.fingerprint() == train0.fingerprint()
    assert held1.fingerprint() == held0.fingerprint()
    # a failure on rank 0 still lets it reach the barrier, then raises
    broken = config_from_dict({"data": {"train": str(forms["a"]["arrow"]),
                                        "columns": {"prompt": "nope"},
                                        "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(ValueError, match="column 'nope'"):
        job_module.load_datasets(broken, tokenizer, runtime=Node(0, 2, 0, cpu, deepspeed=False))
    assert events[-1][0:2] == ("barrier", 0)


def test_the_readme_recipes_are_valid_configs():
    """README's mixture and tracking recipes validate as they are written."""
    import re
    from pathlib import Path

    from fastpo.engine.train.config_loading import config_from_dict

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    recipes = dict(re.findall(r"^<!-- recipe: ([\w-]+) -->\n```yaml\n(.*?)^```$", readme,
                              re.M | re.S))
    assert sorted(recipes) == ["mixture", "tracking"]
    mixture = config_from_dict(yaml.safe_load(recipes["mixture"])).data
    assert [e.weight for e in mixture.mixture] == [0.6, 0.3, 0.1]
    assert mixture.mixture[2].columns["tools"] == "tools"
    assert mixture.columns["prompt"] == "question"
    assert mixture.train_paths()[1:3] == ["helpsteer_a.jsonl", "helpsteer_b.jsonl"]
    assert mixture.chat_template_kwargs == {"enable_thinking": False}
    tracking = config_from_dict(yaml.safe_load(recipes["tracking"])).logging
    assert tracking.report_to == ["wandb", "mlflow"] and tracking.project == "dpo-experiments"


def test_a_configured_mixture_of_10k_items_follows_its_weights(forms, tokenizer, tmp_path):
    from fastpo.engine.train.config_loading import config_from_dict
    from fastpo.engine.train.job import load_datasets

    data = {"columns": MAPPING, "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.2,
            "max_length": 48, "max_prompt_length": 24, "mixture_size": 10_000,
            "mixture": [{"path": str(forms["a"]["parquet"]), "weight": 7},
                        {"path": str(forms["b"]["csv"]), "weight": 3}]}
    train, held_out = load_datasets(config_from_dict({"data": data}), tokenizer)
    alone = [load_datasets(config_from_dict({"data": {**data, "mixture": [entry],
                                                      "mixture_size": None}}), tokenizer)
             for entry in data["mixture"]]

    def key(pair):
        return tuple(pair.prompt_ids), tuple(pair.rejected_ids)

    a_items = {key(p) for p in alone[0][0].pairs}
    b_items = {key(p) for p in alone[1][0].pairs}
    assert not a_items & b_items and len(a_items) == 8 and len(b_items) == 6  # 20 % held out
    from_a = sum(key(p) in a_items for p in train.pairs)
    assert sum(key(p) in b_items for p in train.pairs) == 10_000 - from_a
    assert abs(from_a / 10_000 - 0.7) < 0.02
    # held-out items come from each source's own split and never enter training
    held = {key(p) for p in held_out.pairs}
    assert len(held) == 4 and not held & {key(p) for p in train.pairs}
    again, _ = load_datasets(config_from_dict({"data": data}), tokenizer)
    assert again.fingerprint() == train.fingerprint()  # the same mixture every time


def test_mapping_keys_are_overridable_from_the_command_line():
    from fastpo.engine.train.config_base import ConfigError
    from fastpo.engine.train.config_loading import load_config

    cfg = load_config(None, overrides=["--data.columns.prompt", "question",
                                       "--data.columns.chosen=good",
                                       "--data.chat_template_kwargs.enable_thinking", "false",
                                       "--logging.report_to", "wandb"])
    assert cfg.data.columns == {"prompt": "question", "chosen": "good"}
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.logging.report_to == ["wandb"]
    with pytest.raises(ConfigError, match=r"data\.columns: unknown field 'answer'"):
        load_config(None, overrides=["--data.columns.answer", "x"])
    with pytest.raises(ConfigError, match=r"'data\.columns' is a value, not a section"):
        load_config(None, overrides=["--data.columns.prompt.x", "x"])
