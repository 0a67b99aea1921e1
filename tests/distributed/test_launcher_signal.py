"""SIGTERM to a 2-rank CPU job under the deepspeed launcher, as a scheduler's preemption sends it:
to every process of the job (runner, launcher, ranks).

The launcher then forwards SIGTERM to its ranks one after the other (each given 30 s), so every
rank sees it twice and at different moments. Both ranks must stop after the same step (the
trainer all-reduces the flag at every step end), write one complete checkpoint of that step
together and exit; a resumed run then continues from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainer_helpers import job, merge

from fastpo.engine.train.checkpoint import LATEST, STATE_FILE, validate_checkpoint
from fastpo.engine.train.metrics_log import read_jsonl

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_alive(session: int) -> bool:
    """Whether any process of the session (the job's process tree) is still running."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def launch(config: Path, log: Path) -> subprocess.Popen:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    train = shutil.which("fastpo-train", path=str(Path(sys.executable).parent))
    # both are installed by the README's set-up (deepspeed is a dependency): missing is a failure
    assert launcher and train, "the deepspeed launcher or fastpo-train is not installed"
    return subprocess.Popen([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                             train, "--config", str(config)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_sigterm_to_the_launcher_checkpoints_every_rank_at_the_same_step(tiny_dir, pairs_file,
                                                                         tmp_path):
    out = tmp_path / "run"
    data = job(tiny_dir, pairs_file, out, deepspeed={"enabled": True, "zero_stage": 2},
               optimization={"micro_batch_size": 1, "max_steps": 10_000},
               checkpoint={"export": "none"})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = launch(config, tmp_path / "launcher.log")
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or \
                len(read_jsonl(out / "metrics.jsonl", "train")) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run ended or stalled before step 2:\n"
                            + (tmp_path / "launcher.log").read_text()[-4000:])
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 120
        while session_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not session_alive(proc.pid), "ranks still running 120 s after SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "launcher.log").read_text()
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl", "train")]
    ckpts = out / "checkpoints"
    assert (ckpts / LATEST).is_file(), log[-4000:]
    folder = ckpts / (ckpts / LATEST).read_text().strip()
    assert validate_checkpoint(folder) is None
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["step"] == steps[-1] >= 2 and state["world_size"] == 2
    assert sorted((folder / "deepspeed").glob("*optim_states.pt")), "both ranks' shards"
    assert len(list((folder / "deepspeed").glob("*optim_states.pt"))) == 2
    assert "SIGTERM: stopped after step" in log and "10000 steps (completed)" not in log

    resumed = merge(data, {"optimization": {"max_steps": steps[-1] + 1},
                           "checkpoint": {"resume": True}})
    config.write_text(yaml.safe_dump(resumed))
    again = launch(config, tmp_path / "resumed.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    after = [r["step"] for r in read_jsonl(out / "metrics.jsonl", "train")]
    assert after == [*steps, steps[-1] + 1]
