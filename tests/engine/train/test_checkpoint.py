"""Choosing the checkpoint a run resumes from (``resume_point``), content hashes, the trainer
state and RNG files, without a model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fastpo.engine.train.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    load_rng,
    resume_point,
    save_rng,
    sha256_file,
    validate_checkpoint,
    write_hashed,
)


def write_checkpoint(manager: CheckpointManager, step: int, world_size: int, *,
                     payload: bytes = b""):
    tmp = manager.begin(step)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "epoch": 0, "step_in_epoch": step,
                                              "world_size": world_size}))
    if payload:
        (tmp / "sub").mkdir()
        with write_hashed(tmp / "sub" / "weights.bin") as f:
            f.write(payload)
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


# ---------------------------------------------------------------------------- content hashes
def test_manifest_records_the_sha256_hashed_while_writing(tmp_path):
    manager = CheckpointManager(tmp_path)
    payload = bytes(range(256)) * 1000
    folder = write_checkpoint(manager, 1, world_size=1, payload=payload)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["files"] == {STATE_FILE: (folder / STATE_FILE).stat().st_size,
                                 "sub/weights.bin": len(payload)}
    # the hash noted while writing is the file's, and the notes are gone from the checkpoint
    assert manifest["sha256"]["sub/weights.bin"] == sha256_file(folder / "sub" / "weights.bin")
    assert manifest["sha256"][STATE_FILE] == sha256_file(folder / STATE_FILE)
    assert not list(folder.rglob(".*.sha256"))
    assert validate_checkpoint(folder) is None


def test_same_size_corruption_falls_back_with_a_warning_naming_the_file(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    older = write_checkpoint(manager, 1, world_size=1, payload=b"a" * 4096)
    newest = write_checkpoint(manager, 2, world_size=1, payload=b"a" * 4096)
    with open(newest / "sub" / "weights.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"b")  # one byte, same size
    assert validate_checkpoint(newest) == ("file sub/weights.bin does not match its sha256 in "
                                           "manifest.json (corrupted or modified after it was "
                                           "written)")
    with caplog.at_level("WARNING"):
        folder, state = resume_point(manager, True, world_size=1)
    assert folder == older and state["step"] == 1
    assert "step-00000002" in caplog.text and "sub/weights.bin does not match" in caplog.text
    # an added file is refused too; with no valid checkpoint left, resume is an error
    (older / "extra.pt").write_bytes(b"x")
    assert validate_checkpoint(older) == ("file extra.pt is not listed in manifest.json (added "
                                          "after it was written)")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint under .*step-00000002: file "
                                              r"sub/weights.bin .*step-00000001: file extra.pt"):
        resume_point(manager, True, world_size=1)


def test_manifest_and_latest_pointer_are_checked(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    older = write_checkpoint(manager, 1, world_size=1)
    newest = write_checkpoint(manager, 2, world_size=1)
    manifest = json.loads((newest / MANIFEST).read_text())
    for broken, reason in (
            ({**manifest, "files": {"../../etc/passwd": 3, **manifest["files"]}},
             "lists '../../etc/passwd', which is not a file inside the checkpoint"),
            ({**manifest, "sha256": {}}, "'sha256' table does not list the same files"),
            ({**manifest, "files": [1]}, "no valid 'files' table")):
        (newest / MANIFEST).write_text(json.dumps(broken))
        assert reason in validate_checkpoint(newest)
    (newest / MANIFEST).write_bytes(b"\x80\x04garbage")
    assert validate_checkpoint(newest).startswith("unreadable manifest.json")
    # a manifest of an older fastpo (sizes only) is still accepted, with a warning
    legacy = {k: v for k, v in manifest.items() if k != "sha256"}
    (newest / MANIFEST).write_text(json.dumps(legacy))
    with caplog.at_level("WARNING"):
        assert validate_checkpoint(newest) is None
    assert "no content hashes" in caplog.text
    # a garbled ``latest`` is ignored: the newest valid checkpoint is taken
    (tmp_path / "latest").write_bytes(b"\xff\xfe../../x")
    assert manager.latest_valid() == newest
    (tmp_path / "latest").write_text("../step-00000001")
    assert manager.latest_valid() == newest
    del older


@pytest.mark.parametrize("content, message", [
    (b"", "unreadable trainer state"),
    (b'{"step": 2, "epoch": 0', "unreadable trainer state"),
    (b"\xff\xfe", "unreadable trainer state"),
    (b"[1, 2]", "the trainer state is not a JSON object"),
    (b'{"step": -1, "epoch": 0, "step_in_epoch": 0, "world_size": 1}',
     "field 'step' is -1, expected an integer >= 0"),
    (b'{"step": 1, "epoch": 0, "step_in_epoch": 0}', "field 'world_size' is None"),
])
def test_a_bad_trainer_state_names_the_file(tmp_path, content, message):
    manager = CheckpointManager(tmp_path)
    tmp = manager.begin(2)
    (tmp / STATE_FILE).write_bytes(content)
    folder = manager.commit(tmp, 2)  # consistent manifest: the file itself is bad
    with pytest.raises(CheckpointError, match=rf"{folder / STATE_FILE}: .*{message}"):
        resume_point(manager, True, world_size=1)


# ------------------------------------------------------------------------------------- RNG
def _draw():
    return (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_exactly_as_json(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator
    np.random.standard_normal()  # and one in NumPy's
    save_rng(tmp_path, 0)
    path = tmp_path / "rng" / "rank00000.json"
    data = json.loads(path.read_text())
    assert data["python"]["gauss_next"] is not None and data["numpy"]["has_gauss"] == 1
    expected = _draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_rng(tmp_path, 0)
    assert _draw() == expected


def test_rng_state_of_an_older_checkpoint_loads_with_weights_only(tmp_path):
    from fastpo.engine.train.checkpoint import rng_state

    torch.manual_seed(5)
    (tmp_path / "rng").mkdir()
    torch.save(rng_state(), tmp_path / "rng" / "rank00000.pt")  # what older fastpo wrote
    expected = _draw()
    torch.manual_seed(6)
    load_rng(tmp_path, 0)
    assert _draw() == expected


@pytest.mark.parametrize("edit", ["truncated", "not_json", "wrong_key_count", "bad_base64",
                                  "torch_state_size"])
def test_a_bad_rng_file_names_the_file(tmp_path, edit):
    save_rng(tmp_path, 0)
    path = tmp_path / "rng" / "rank00000.json"
    data = json.loads(path.read_text())
    if edit == "truncated":
        path.write_text(path.read_text()[:100])
    elif edit == "not_json":
        path.write_bytes(b"\x80\x04\x95garbage")
    elif edit == "wrong_key_count":
        data["numpy"]["keys"] = data["numpy"]["keys"][:10]
        path.write_text(json.dumps(data))
    elif edit == "bad_base64":
        data["torch"] = "***"
        path.write_text(json.dumps(data))
    else:
        data["torch"] = data["torch"][:40]
        path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{path}: (unreadable|not a valid) RNG state"):
        load_rng(tmp_path, 0)
    with pytest.raises(CheckpointError, match=r"has no RNG state for rank 1"):
        load_rng(tmp_path, 1)
