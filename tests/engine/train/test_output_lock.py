"""One writer per output folder: the lock file, and two real ``fastpo-train`` jobs on one folder
(the second refused naming the first; after the first is SIGKILLed, its lock taken over)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from trainer_helpers import fastpo_train, job, one_error_line

from fastpo.engine.errors import JobFault
from fastpo.engine.train.output_lock import LOCK_FILE, OutputLockedError, acquire_output_lock


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    lock = acquire_output_lock(tmp_path / "out")  # the folder is created
    holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert abs(holder["started"] - time.time()) < 60
    with pytest.raises(OutputLockedError, match=f"output folder {tmp_path / 'out'} is in use by "
                                                f"another fastpo job \\(pid {os.getpid()} on "
                                                f"host {socket.gethostname()}, started "):
        acquire_output_lock(tmp_path / "out")  # held, even by this very process
    assert isinstance(OutputLockedError("x"), JobFault)
    lock.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()

    # a lock left by a process of this host that is gone: taken over, with a warning
    gone = dead_pid()
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone, "started": 1.0}))
    with caplog.at_level(logging.WARNING):
        lock = acquire_output_lock(tmp_path / "out")
    assert f"taking over the lock left by pid {gone} on host {socket.gethostname()}" in caplog.text
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()

    # another host cannot be checked from here: refused, with what to do
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps(
        {"host": "elsewhere-node-7", "pid": gone, "started": 1.0}))
    with pytest.raises(OutputLockedError, match="pid .* on host elsewhere-node-7.*delete .*"
                                                f"{LOCK_FILE} if that job is gone"):
        acquire_output_lock(tmp_path / "out")
    # a damaged lock file is held by an unknown job, not silently taken
    (tmp_path / "out" / LOCK_FILE).write_text("{not json")
    with pytest.raises(OutputLockedError, match="in use by another fastpo job"):
        acquire_output_lock(tmp_path / "out")


@pytest.mark.slow
def test_a_second_job_on_one_folder_is_refused_and_a_killed_jobs_lock_taken_over(
        tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    long_job = job(tiny_dir, pairs_file, out, optimization={"max_steps": 100_000})
    (first_dir / "job.yaml").write_text(yaml.safe_dump(long_job))
    train = shutil.which("fastpo-train", path=str(os.path.dirname(sys.executable)))
    log = first_dir / "log"
    first = subprocess.Popen([train, "--config", str(first_dir / "job.yaml")],
                             stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():  # it holds the folder and trains
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc = fastpo_train(job(tiny_dir, pairs_file, out), second_dir)
        assert proc.returncode == 3, proc.stderr[-4000:]
        line = one_error_line(proc)
        assert line.startswith(f"fastpo-train: error: output folder {out} is in use by another "
                               f"fastpo job (pid {first.pid} on host {socket.gethostname()}")
        assert first.poll() is None  # the first job was not disturbed
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid  # left behind

    proc = fastpo_train(job(tiny_dir, pairs_file, out, optimization={"max_steps": 1}),
                        second_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"taking over the lock left by pid {first.pid}" in proc.stderr
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_checkpoint_dir_outside_the_output_folder_is_locked_too(tiny_dir, pairs_file, tmp_path):
    from trainer_helpers import run

    shared = tmp_path / "shared-checkpoints"
    held = acquire_output_lock(shared)  # another job writes its checkpoints there
    try:
        with pytest.raises(OutputLockedError, match=f"output folder {shared} is in use by "
                                                    f"another fastpo job \\(pid {os.getpid()}"):
            run(job(tiny_dir, pairs_file, tmp_path / "run", checkpoint={"dir": str(shared),
                                                                        "export": "none"}))
        assert not (tmp_path / "run" / LOCK_FILE).exists()  # its own folder released again
    finally:
        held.release()
    result = run(job(tiny_dir, pairs_file, tmp_path / "run",
                     checkpoint={"dir": str(shared), "every_steps": 1, "export": "none"}))
    assert result.steps == 2 and (shared / "step-00000002").is_dir()
    assert not (shared / LOCK_FILE).exists() and not (tmp_path / "run" / LOCK_FILE).exists()
