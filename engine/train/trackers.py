"""Experiment trackers (``logging.report_to``): TensorBoard, Weights & Biases, MLflow, Trackio.

    trackers = open_trackers(cfg)        # rank 0 only; the run config is logged once, here
    for tracker in trackers:
        tracker.log(tracker_metrics(record, "train"), step=record["step"])

Every tracker gets what ``metrics.jsonl`` gets, under the same names prefixed by the record's
kind: the JSON line ``{"kind": "train", "step": 3, "loss": ..., "rewards/accuracies": ...}`` is
``train/loss``, ``train/rewards/accuracies`` at step 3 (``eval/...`` for evaluations,
``summary/...`` at the last step); numbers and flags (as 0/1), not text. The project (W&B and
Trackio project, MLflow experiment) and the run name come from ``logging.project`` and
``logging.run_name`` (default: the output folder's name). W&B writes under the output folder
(``WANDB_MODE=offline`` keeps it local); MLflow uses ``logging.mlflow_tracking_uri``, else
``MLFLOW_TRACKING_URI``, else its default; Trackio its local store (``TRACKIO_DIR``).

A tracker that fails while the job runs (at start, on a log, at the end) is reported once, as a
warning, and dropped: training never stops for it. A tracker that is not installed is a
configuration error before anything loads (:func:`check_trackers`), naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import JsonValue

from .config import LoggingConfig, TrainConfig
from .config_base import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
           "trackio": "trackio"}
NOT_METRICS = ("kind", "step", "time")
MLFLOW_BATCH = 100  # MLflow's limit of params per log_batch call


def tracker_metrics(record: Mapping[str, JsonValue], kind: str) -> dict[str, float]:
    """The numbers of a JSONL record under the trackers' names (``<kind>/<key>``)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_METRICS:
            continue
        if isinstance(value, bool):
            out[f"{kind}/{key}"] = float(value)
        elif isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = float(value)
    return out


def wanted(log: LoggingConfig) -> list[str]:
    """The trackers this job reports to: ``report_to``, plus TensorBoard when
    ``logging.tensorboard`` is true (or auto and installed)."""
    names = list(dict.fromkeys(log.report_to))
    tensorboard = log.tensorboard is True or (
        log.tensorboard == "auto" and importlib.util.find_spec("tensorboard") is not None)
    if tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def check_trackers(cfg: TrainConfig) -> None:
    """Raise a ConfigError naming the tracker and its extra when one is not installed."""
    for name in wanted(cfg.logging):
        if importlib.util.find_spec(MODULES[name]) is None:
            key = "logging.tensorboard" if name == "tensorboard" and \
                name not in cfg.logging.report_to else "logging.report_to"
            raise ConfigError(f"{key}: {name} is not installed (pip install 'fastpo[{name}]' "
                              f"or pip install {name})")


class Tracker(ABC):
    """One experiment tracker's run."""

    name: str

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, config: dict[str, JsonValue]) -> None:
        import json

        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, folder: Path, config: dict[str, JsonValue], *, project: str,
                 run_name: str) -> None:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(folder), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _flat(config: Mapping[str, JsonValue], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class MlflowTracker(Tracker):
    """Through ``MlflowClient`` (no global active run, so a caller's own run is left alone)."""

    name = "mlflow"

    def __init__(self, config: dict[str, JsonValue], *, project: str, run_name: str,
                 tracking_uri: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment is not None \
            else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v) for k, v in _flat(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_BATCH])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, config: dict[str, JsonValue], *, project: str, run_name: str) -> None:
        import trackio

        self.run = trackio.init(project=project, name=run_name, config=config,
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: TrainConfig) -> list[Tracker]:
    """The job's trackers, each started with the run config; one that fails to start is
    reported (once) and left out."""
    log = cfg.logging
    out_dir = Path(log.output_dir)
    config = cfg.dump()
    run_name = log.run_name or out_dir.resolve().name
    makers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorBoardTracker(out_dir / "tensorboard", config),
        "wandb": lambda: WandbTracker(out_dir, config, project=log.project, run_name=run_name),
        "mlflow": lambda: MlflowTracker(config, project=log.project, run_name=run_name,
                                        tracking_uri=log.mlflow_tracking_uri),
        "trackio": lambda: TrackioTracker(config, project=log.project, run_name=run_name),
    }
    trackers = []
    for name in wanted(log):
        try:
            trackers.append(makers[name]())
        except Exception as exc:  # a tracker never stops training
            tracker_failed(name, "start", exc)
    return trackers


def tracker_failed(name: str, what: str, exc: BaseException) -> None:
    """The one warning for a tracker that failed (it is dropped by the caller)."""
    logger.warning("logging.report_to %s failed to %s (%s: %s); training goes on without it",
                   name, what, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
