"""The trainer's side of a checkpoint: what it writes into the atomic folder, and resuming.

A checkpoint holds the backend's model and optimizer state (``backend.save``), the reference
when it follows the policy (``reference.safetensors``), each rank's generator states
(``rng/``), each rank's batch-source state (``source/``, online training's pending pairs and
sampling generator) and ``trainer_state.json``: the step, the batch source's position, the
evaluation bookkeeping and the number of ranks (the data order depends on it). The folder is
sealed by :class:`~.checkpoint.CheckpointManager` (hashes, then an atomic rename).

Before each checkpoint rank 0 checks that it fits (:func:`~.storage.checkpoint_room`: the last
checkpoint's size, or an estimate before the first) and all ranks agree on the answer; a write
that fails anyway (disk full, I/O error, read-only or vanished folder) removes its ``.tmp-*``
folder and stops with a :class:`~.storage.StorageError` that names the folder, the error and the
checkpoint ``--resume`` will continue from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .checkpoint import LATEST, STATE_FILE, load_rng, resume_point, save_rng
from .storage import (
    StorageError,
    checkpoint_room,
    estimate_checkpoint_bytes,
    folder_bytes,
    remove_partial,
    storage_failure,
)

logger = logging.getLogger(__name__)


def trainer_state(trainer: Any) -> dict[str, Any]:
    """``trainer_state.json``: JSON values only (loading it runs no code)."""
    return {"step": trainer.pos.step, **trainer.source.state_dict(),
            "eval_before": trainer.eval_before, "best_eval": trainer.best_eval,
            "bad_evals": trainer.bad_evals, "ref_version": trainer.ref_version,
            "world_size": trainer.rt.world_size, "total_steps": trainer.total_steps}


def _reference_follows(trainer: Any) -> bool:
    return trainer.cfg.reference.sync_steps > 0 or trainer.cfg.reference.rounds > 1


def checkpoint_size(trainer: Any) -> int:
    """The bytes the next checkpoint will take: the newest one's, or an estimate before it."""
    found = trainer.ckpt.checkpoints()
    if found:
        return folder_bytes(found[-1][1])
    follows = _reference_follows(trainer)
    mixed = trainer.cfg.optimization.precision != "fp32" and trainer.rt.deepspeed
    reference = trainer.reference.state_dict() if follows else {}
    return estimate_checkpoint_bytes(
        trainer.backend.module, include_frozen=follows and trainer.cfg.model.lora.enabled,
        fp32_master=mixed) + sum(t.numel() * t.element_size() for t in reference.values())


def check_checkpoint_room(trainer: Any, *, first: bool = False) -> None:
    """Rank 0 checks that the next checkpoint fits (at ``first``, before training, also warns
    when ``keep_last`` + 1 do not; only for a job with ``every_steps``); every rank stops when it
    does not."""
    ckpt = trainer.ckpt
    if first and not trainer.cfg.checkpoint.every_steps:
        return

    def check() -> None:
        checkpoint_room(ckpt.root, checkpoint_size(trainer), step=trainer.pos.step,
                        existing=len(ckpt.checkpoints()),
                        keep_last=ckpt.keep_last, first_check=first)

    trainer.guard.rank0_check(check)


def _resume_hint(trainer: Any) -> str:
    pointer = trainer.ckpt.root / LATEST
    try:
        latest = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        return "no complete checkpoint yet: --resume starts over"
    return (f"the complete checkpoints are kept (latest: {latest}); free space or fix the "
            "folder, then run again with --resume")


def save_trainer_checkpoint(trainer: Any) -> Path:
    """Write the checkpoint of the current step (every rank calls it) and return its folder; a
    failed write removes its partial folder and raises a :class:`StorageError` (see above)."""
    step, rt = trainer.pos.step, trainer.rt
    check_checkpoint_room(trainer)
    tmp: Path | None = None
    try:
        tmp = trainer.ckpt.begin(step)
        return _write(trainer, tmp, step)
    except BaseException as exc:
        error = storage_failure(exc, folder=trainer.ckpt.root,  # (the free space before
                                what=f"the checkpoint of step {step}")  # the clean-up)
        if rt.is_main and tmp is not None:
            remove_partial(tmp)  # also when a rank was lost or the job interrupted
        if error is None:
            raise
        raise StorageError(f"{error}; {_resume_hint(trainer)}") from None


def _write(trainer: Any, tmp: Path, step: int) -> Path:
    rt = trainer.rt
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
