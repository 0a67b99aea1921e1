"""fastpo.engine.train: the training job (the ``train`` extra).

    config.py, config_loading.py   the typed config tree; YAML + ``--key value`` overrides
    default.yaml                   the default job
    deepspeed_config.py, runtime.py  DeepSpeed (or plain torch) set-up and its config
    optimization.py, torch_backend.py, deepspeed_backend.py   the two optimization backends
    model_loading.py               policy, reference model and tokenizer from the config; export
    job.py                         datasets and the reference strategy from the config
    layout.py                      ``data.layout: auto``: the cheapest batch layout for the job
    objective.py                   one batch's loss: forward, reference, loss function
    loop.py                        Trainer, train(), NonFiniteError
    checkpoint.py, integrity.py, rng_state.py, safe_load.py   checkpoints, hashed and loaded safely
    interrupts.py                  SIGINT / SIGTERM → a final checkpoint
    metrics_log.py, reports.py     step metrics, JSONL logs, the end-of-run report
    cli.py                         ``fastpo-train``

``from fastpo.engine.train import train, Trainer, TrainConfig`` are the documented entry points.
Importing this package loads the config (pydantic), so without the ``train`` extra it raises
``MissingExtraError``; the trainer itself (torch, transformers, DeepSpeed) loads on first use of
those names, so that ``fastpo-train --print-config`` stays quick.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig

_LOOP_NAMES = ("Callback", "NonFiniteError", "Trainer", "TrainResult", "train")

__all__ = ["TrainConfig", *_LOOP_NAMES]


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
