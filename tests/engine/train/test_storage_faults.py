"""Storage faults through the real ``fastpo-train``: a disk too small for the next checkpoint, a
write that fails (no space, an I/O error, a read-only folder), an export or a reference cache
that does not fit. Each ends with one line naming the folder (exit status 3, no traceback),
keeps every complete checkpoint, leaves no partial ``.tmp-*`` folder, and ``--resume`` (once
the disk is fixed) continues with the losses of an uninterrupted run, bit for bit.

Disks are size- or inode-limited tmpfs mounts (the tests run as root in the CI sandbox); where
mounting is not allowed those tests are skipped, and the injected-``OSError`` test covers a
failing write.
"""

from __future__ import annotations

import json

import pytest
from trainer_helpers import (
    can_mount_tmpfs,
    fastpo_train,
    job,
    losses,
    one_error_line,
    remount,
    run,
    tmpfs,
)

from fastpo.engine.train.checkpoint import LATEST, validate_checkpoint
from fastpo.engine.train.metrics_log import read_jsonl
from fastpo.engine.train.storage import StorageError, storage_failure

# the whole tiny model trained (no LoRA): a checkpoint is ~73 MiB (weights + AdamW's moments)
SECTIONS = dict(optimization={"max_steps": 4},
                checkpoint={"every_steps": 2, "keep_last": 1, "export": "none"})


@pytest.fixture(scope="module")
def mountable(tmp_path_factory):
    if not can_mount_tmpfs(tmp_path_factory.mktemp("probe")):
        pytest.skip("mounting a size-limited tmpfs needs root (the injected-error test covers "
                    "a failing write)")


@pytest.fixture(scope="module")
def straight(tiny_dir, pairs_file, tmp_path_factory):
    """The per-step losses of the uninterrupted run."""
    return losses(run(job(tiny_dir, pairs_file, tmp_path_factory.mktemp("straight"),
                          **SECTIONS)).history)


def step_losses(out) -> list[float]:
    """Each step's loss, the last record of a step redone after a resume."""
    by_step = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl", "train")}
    assert list(by_step) == list(range(1, len(by_step) + 1))
    return list(by_step.values())


def fault(data: dict, where, *args: str):
    """Run ``fastpo-train`` expecting a fault: exit status 3 and one error line (returned, with
    the whole stderr)."""
    proc = fastpo_train(data, where, *args)
    assert proc.returncode == 3, proc.stderr[-4000:]
    return one_error_line(proc), proc.stderr


def complete_checkpoints(ckpts) -> list[str]:
    names = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names  # no partial folder left
    steps = [n for n in names if n.startswith("step-")]
    assert all(validate_checkpoint(ckpts / n) is None for n in steps)
    return steps


def test_a_disk_too_small_for_the_next_checkpoint(mountable, tiny_dir, pairs_file, tmp_path,
                                                  straight):
    with tmpfs(tmp_path / "disk", size="100m") as disk:  # one checkpoint fits, not two
        out = disk / "run"
        data = job(tiny_dir, pairs_file, out, **SECTIONS)
        line, stderr = fault(data, tmp_path)
        assert line.startswith(f"fastpo-train: error: the checkpoint of step 4 "
                               f"(checkpoint.dir): {out / 'checkpoints'} has ")
        assert " free, the write needs about 7" in line and "MiB" in line
        assert "run again with --resume" in line
        # warned at start: keep_last + 1 checkpoints do not fit
        assert "checkpoint.keep_last 1 + 1 checkpoints of about" in stderr
        assert complete_checkpoints(out / "checkpoints") == ["step-00000002"]

        remount(disk, "ro")  # a read-only folder: refused before anything is written
        assert "Read-only file system" in fault(data, tmp_path, "--resume")[0]

        remount(disk, "rw", size="300m")
        proc = fastpo_train(data, tmp_path, "--resume")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert step_losses(out) == straight
        assert complete_checkpoints(out / "checkpoints") == ["step-00000004"]


def test_a_checkpoint_write_that_fails(mountable, tiny_dir, pairs_file, tmp_path, straight):
    # room enough, but too few inodes for a second checkpoint: the filesystem says ENOSPC
    with tmpfs(tmp_path / "disk", size="400m", nr_inodes=20) as disk:
        out = disk / "run"
        data = job(tiny_dir, pairs_file, out, **SECTIONS)
        line = fault(data, tmp_path)[0]
        assert line.startswith(f"fastpo-train: error: the checkpoint of step 4 could not be "
                               f"written to {out / 'checkpoints'}: [Errno 28] No space left on "
                               "device")
        assert "no free inode" in line and "latest: step-00000002" in line
        assert complete_checkpoints(out / "checkpoints") == ["step-00000002"]

        remount(disk, nr_inodes=1000)
        proc = fastpo_train(data, tmp_path, "--resume")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "taking over the lock" not in proc.stderr  # the failed run released it
        assert step_losses(out) == straight


INJECTED = """
import errno, sys, torch
original, calls = torch.save, []
def save(obj, f, *args, **kwargs):  # the optimizer state of the 2nd checkpoint (step 4) fails
    calls.append(f)
    if len(calls) == 2:
        raise OSError(errno.EIO, "Input/output error")
    return original(obj, f, *args, **kwargs)
torch.save = save
from fastpo.engine.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_io_error_during_a_checkpoint_write(tiny_dir, pairs_file, tmp_path):
    import subprocess
    import sys

    import yaml

    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(tiny_dir, pairs_file, out, **SECTIONS)))
    proc = subprocess.run([sys.executable, "-c", INJECTED, "--config", str(config)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-4000:]
    line = one_error_line(proc)
    assert f"the checkpoint of step 4 could not be written to {out / 'checkpoints'}: " \
           "[Errno 5] Input/output error" in line
    assert complete_checkpoints(out / "checkpoints") == ["step-00000002"]
    assert (out / "checkpoints" / LATEST).read_text().strip() == "step-00000002"


def test_an_export_that_does_not_fit(mountable, tiny_dir, pairs_file, tmp_path):
    with tmpfs(tmp_path / "disk", size="10m") as disk:  # the full model is ~28 MiB
        out = tmp_path / "run"
        data = job(tiny_dir, pairs_file, out, optimization={"max_steps": 2},
                   checkpoint={"every_steps": 2, "export": "full",
                               "export_dir": str(disk / "final")})
        line = fault(data, tmp_path)[0]
        assert line.startswith(f"fastpo-train: error: checkpoint.export_dir: {disk / 'final'} "
                               "has ")
        assert "run again with --resume to export" in line
        assert list(disk.iterdir()) == []  # nothing partial
        assert complete_checkpoints(out / "checkpoints") == ["step-00000002"]

        remount(disk, size="100m")
        proc = fastpo_train(data, tmp_path, "--resume")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert sorted(p.name for p in disk.iterdir()) == ["final"]
        assert json.loads((disk / "final" / "config.json").read_text())["model_type"] == "llama"


def test_a_reference_cache_that_does_not_fit(mountable, tiny_dir, pairs_file, tmp_path):
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        (disk / "filler").write_bytes(b"\0" * (1 << 20))  # the disk is full
        data = job(tiny_dir, pairs_file, tmp_path / "run",
                   reference={"mode": "precomputed", "cache_dir": str(disk / "cache")})
        assert fault(data, tmp_path)[0].startswith(
            f"fastpo-train: error: reference.cache_dir: {disk / 'cache'} has 0 B free, the write "
            "needs about ")


def test_torch_save_on_a_full_disk_is_a_storage_failure(mountable, tmp_path):
    """``torch.save``'s zip writer reports a short write as a RuntimeError whose OSError is
    lost; it is still named as a storage failure of the folder."""
    import torch

    with tmpfs(tmp_path / "disk", size="64k") as disk:
        with pytest.raises((RuntimeError, OSError)) as info:
            torch.save(torch.zeros(1 << 16), disk / "big.pt")
        error = storage_failure(info.value, folder=disk, what="the test file")
        assert isinstance(error, StorageError)
        assert str(error).startswith(f"the test file could not be written to {disk}: ")
    assert storage_failure(ValueError("not storage"), folder=tmp_path, what="x") is None


def test_a_failed_export_write_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path):
    import errno

    from fastpo.engine.train.storage import atomic_folder

    final = tmp_path / "final"
    with atomic_folder(final, what="the full export") as tmp:
        (tmp / "model.safetensors").write_bytes(b"first")
    assert (final / "model.safetensors").read_bytes() == b"first"
    with pytest.raises(StorageError) as info:
        with atomic_folder(final, what="the full export") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert str(info.value).startswith(f"the full export could not be written to {tmp_path}: "
                                      "[Errno 28] No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .tmp-final-*
    assert (final / "model.safetensors").read_bytes() == b"first"
    with pytest.raises(KeyError):  # not a storage failure: raised as it is
        with atomic_folder(final, what="the full export"):
            raise KeyError("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
