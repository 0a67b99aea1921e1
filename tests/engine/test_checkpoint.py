"""Choosing the checkpoint a run resumes from (``resume_point``), without a model."""

from __future__ import annotations

import json

import pytest

from fastpo.engine.checkpoint import STATE_FILE, CheckpointManager, resume_point


def write_checkpoint(manager: CheckpointManager, step: int, world_size: int):
    tmp = manager.begin(step)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world_size}))
    return manager.commit(tmp, step)


def test_resume_false_or_nothing_saved_starts_fresh(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    assert resume_point(manager, False, world_size=1) is None
    assert resume_point(manager, True, world_size=1) is None
    write_checkpoint(manager, 3, world_size=1)
    assert resume_point(manager, False, world_size=1) is None


def test_resume_true_takes_the_newest_valid_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    write_checkpoint(manager, 2, world_size=1)
    newest = write_checkpoint(manager, 4, world_size=1)
    folder, state = resume_point(manager, True, world_size=1)
    assert folder == newest and state["step"] == 4
    (newest / STATE_FILE).write_text("{}")  # size no longer matches the manifest
    folder, state = resume_point(manager, True, world_size=1)
    assert folder.name == "step-00000002" and state["step"] == 2


def test_resume_refuses_another_world_size_and_a_broken_path(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    folder = write_checkpoint(manager, 5, world_size=2)
    with pytest.raises(ValueError, match=r"written by 2 ranks; this run has 1"):
        resume_point(manager, True, world_size=1)
    with pytest.raises(ValueError, match=r"written by 2 ranks; this run has 1"):
        resume_point(manager, str(folder), world_size=1)
    with pytest.raises(ValueError, match=r"checkpoint.resume .*missing: not a usable checkpoint "
                                         r"\(not a folder\)"):
        resume_point(manager, tmp_path / "missing", world_size=1)
    assert resume_point(manager, folder, world_size=2)[1]["step"] == 5
