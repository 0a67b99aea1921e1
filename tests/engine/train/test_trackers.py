"""logging.report_to: a real run of ``fastpo-train`` (its main(), in a child process with the
trackers' local stores) reports every JSONL metric, under the JSONL's names, to a local MLflow
file store, W&B in offline mode, Trackio's local store and TensorBoard; the run config once;
project and run name from the config. A tracker that fails warns once and training goes on."""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict

import pytest
from trainer_helpers import job, run

from fastpo.engine.train.config_base import ConfigError
from fastpo.engine.train.metrics_log import read_jsonl
from fastpo.engine.train.trackers import tracker_metrics

TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]
for _name in TRACKERS:  # dev extra: every tracker is installed; a missing one is a failure
    __import__(_name)

CHILD = """
import json, sys
from fastpo.engine.train import cli
sys.exit(cli.main(["--config", sys.argv[1]]))
"""


def expected_metrics(out) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of every JSONL record, as the trackers should hold them."""
    want: dict[str, dict[int, float]] = defaultdict(dict)
    for record in read_jsonl(out / "metrics.jsonl"):
        step = int(record.get("step", record.get("steps", 0)))
        for key, value in tracker_metrics(record, record["kind"]).items():
            want[key][step] = value
    return want


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


def wandb_history(run_dir) -> dict[str, dict[int, float]]:
    """The history rows of an offline W&B run, read from its ``.wandb`` log (records in 32 KiB
    blocks, each with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_dir.glob("*.wandb")).read_bytes()
    block, pos, part, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, size, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and size == 0:
            pos += room - 7
            continue
        part, pos = part + raw[pos:pos + size], pos + size
        if kind in (1, 4):  # a whole record, or its last piece
            records.append(part)
            part = b""
    history: dict[str, dict[int, float]] = defaultdict(dict)
    config = {}
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in record.history.item}
            step = int(items["_step"])
            for key, value in items.items():
                if not key.startswith("_"):
                    history[key][step] = float(value) if value is not None else math.nan
        elif record.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            config["_run"] = (record.run.project, record.run.display_name)
    return history, config


def test_every_tracker_holds_every_jsonl_metric(tiny_dir, pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    data = job(tiny_dir, pairs_file, out,
               data={"eval_fraction": 0.25},
               optimization={"max_steps": 3},
               logging={"report_to": TRACKERS, "tensorboard": "auto", "eval_before": True,
                        "eval_every": 2, "project": "proj", "run_name": "first-run",
                        "mlflow_tracking_uri": f"file://{tmp_path / 'mlruns'}"})
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(data))  # JSON is YAML
    env = {**os.environ, "WANDB_MODE": "offline", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed to" not in proc.stderr, proc.stderr[-3000:]
    want = expected_metrics(out)
    kinds = {name.split("/")[0] for name in want}
    assert kinds == {"train", "eval", "summary"} and "train/rewards/accuracies" in want
    assert sorted(want["train/loss"]) == [1, 2, 3] and sorted(want["eval/loss"]) == [0, 2, 3]

    def check(name: str, got: dict[str, dict[int, float]]) -> None:
        for key, steps in want.items():
            assert key in got, f"{name} lacks {key}"
            for step, value in steps.items():
                assert step in got[key] and same(got[key][step], value), (name, key, step)

    # MLflow: the file store, experiment = project, the run's name, params and config.json
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("proj")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "first-run"
    check("mlflow", {key: {m.step: m.value for m in client.get_metric_history(found.info.run_id,
                                                                             key)}
                     for key in want})
    assert found.data.params["loss.beta"] == str(data.get("loss", {}).get("beta", 0.1))
    assert found.data.params["optimization.max_steps"] == "3"

    # W&B offline: the run's log under the output folder
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history, wandb_config = wandb_history(run_dir)
    check("wandb", history)
    assert wandb_config["_run"] == ("proj", "first-run")
    section = wandb_config["optimization"]
    assert section.get("value", section)["max_steps"] == 3

    # Trackio: its local SQLite store
    db = sqlite3.connect(tmp_path / "trackio" / "proj.db")
    rows = db.execute("select run_name, step, metrics from metrics").fetchall()
    trackio: dict[str, dict[int, float]] = defaultdict(dict)
    for run_name, step, metrics in rows:
        assert run_name == "first-run"
        for key, value in json.loads(metrics).items():
            trackio[key][step] = math.nan if value is None else float(value)
    check("trackio", trackio)
    (config_row,) = db.execute("select config from configs").fetchall()
    assert json.loads(config_row[0])["optimization"]["max_steps"] == 3

    # TensorBoard: the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    check("tensorboard", {key: {e.step: e.value for e in events.Scalars(key)}
                          for key in events.Tags()["scalars"]})


def test_a_failing_tracker_warns_once_and_training_goes_on(tiny_dir, pairs_file, tmp_path,
                                                          monkeypatch, caplog):
    import wandb

    from fastpo.engine.train import trackers

    calls = []

    def broken_log(self, metrics, step):
        calls.append(step)
        raise OSError("the tracking server went away")

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(trackers.MlflowTracker, "log", broken_log)
    monkeypatch.setattr(wandb, "init", broken_init)
    caplog.set_level(logging.WARNING, logger="fastpo")
    result = run(job(tiny_dir, pairs_file, tmp_path / "run", optimization={"max_steps": 3},
                     logging={"report_to": ["mlflow", "wandb"],
                              "mlflow_tracking_uri": f"file://{tmp_path / 'mlruns'}"}))
    assert result.steps == 3 and len(read_jsonl(tmp_path / "run" / "metrics.jsonl",
                                                "train")) == 3
    assert calls == [1]  # dropped after its first failure
    failures = [r.getMessage() for r in caplog.records if "failed to" in r.getMessage()]
    assert failures == [
        "logging.report_to wandb failed to start (RuntimeError: no network); training goes on "
        "without it",
        "logging.report_to mlflow failed to log (OSError: the tracking server went away); "
        "training goes on without it"]


def test_a_tracker_that_is_not_installed_is_named_before_anything_loads(monkeypatch,
                                                                       tiny_dir, pairs_file,
                                                                       tmp_path):
    import importlib.util

    from fastpo.engine.train import trackers
    from fastpo.engine.train.config_loading import check_paths, config_from_dict

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "trackio" else real(name, *a))
    cfg = config_from_dict(job(tiny_dir, pairs_file, tmp_path,
                               logging={"report_to": "trackio"}))
    assert cfg.logging.report_to == ["trackio"]
    with pytest.raises(ConfigError, match=r"logging.report_to: trackio is not installed "
                                          r"\(pip install 'fastpo\[trackio\]'"):
        check_paths(cfg)
    with pytest.raises(ValueError, match=r"report_to lists tensorboard but logging\.tensorboard"):
        config_from_dict(job(tiny_dir, pairs_file, tmp_path,
                             logging={"report_to": ["tensorboard"], "tensorboard": False}))
