"""The trainer's side of a checkpoint: what it writes into the atomic folder, and resuming.

A checkpoint holds the backend's model and optimizer state (``backend.save``), the reference
when it follows the policy (``reference.safetensors``), each rank's generator states
(``rng/``), each rank's batch-source state (``source/``, online training's pending pairs and
sampling generator) and ``trainer_state.json``: the step, the batch source's position, the
evaluation bookkeeping and the number of ranks (the data order depends on it). The folder is
sealed by :class:`~.checkpoint.CheckpointManager` (hashes, then an atomic rename).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .checkpoint import STATE_FILE, load_rng, resume_point, save_rng

logger = logging.getLogger(__name__)


def trainer_state(trainer: Any) -> dict[str, Any]:
    """``trainer_state.json``: JSON values only (loading it runs no code)."""
    return {"step": trainer.pos.step, **trainer.source.state_dict(),
            "eval_before": trainer.eval_before, "best_eval": trainer.best_eval,
            "bad_evals": trainer.bad_evals, "ref_version": trainer.ref_version,
            "world_size": trainer.rt.world_size, "total_steps": trainer.total_steps}


def _reference_follows(trainer: Any) -> bool:
    return trainer.cfg.reference.sync_steps > 0 or trainer.cfg.reference.rounds > 1


def save_trainer_checkpoint(trainer: Any) -> Path:
    """Write the checkpoint of the current step (every rank calls it) and return its folder."""
    step, rt = trainer.pos.step, trainer.rt
    tmp = trainer.ckpt.begin(step)
    follows = _reference_follows(trainer)
    trainer.backend.save(tmp, rank=rt.rank,
                         include_frozen=follows and trainer.cfg.model.lora.enabled)
    state = trainer.reference.state_dict() if follows else {}
    if state and rt.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()},
                  str(tmp / "reference.safetensors"))
    save_rng(tmp, rt.rank)
    trainer.source.save_rank_state(tmp, rt.rank)
    if rt.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state(trainer), indent=1),
                                      encoding="utf-8")
    return trainer.ckpt.commit(tmp, step)


def resume_trainer(trainer: Any) -> bool:
    """Continue from the checkpoint ``checkpoint.resume`` names, if any (True when resumed)."""
    found = resume_point(trainer.ckpt, trainer.cfg.checkpoint.resume,
                         world_size=trainer.rt.world_size)
    if found is None:
        return False
    folder, state = found
    trainer.backend.load(folder)
    reference_file = folder / "reference.safetensors"
    if reference_file.is_file():
        from .safe_load import load_safetensors

        trainer.reference.load_state_dict(load_safetensors(reference_file),
                                          source=str(reference_file))
    trainer.pos.step = state["step"]
    trainer.source.load_state_dict(state)
    trainer.source.load_rank_state(folder, trainer.rt.rank)
    trainer.eval_before = state.get("eval_before")
    trainer.best_eval = state.get("best_eval")
    trainer.bad_evals = state.get("bad_evals", 0)
    trainer.ref_version = state.get("ref_version", 0)
    load_rng(folder, trainer.rt.rank)
    logger.info("resumed from %s at step %d", folder, trainer.pos.step)
    return True
