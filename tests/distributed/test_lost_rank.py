"""A lost rank: 2 CPU ranks (gloo) of the real ``fastpo-train``, one SIGKILLed mid-step and, on the
resumed run, during a checkpoint write. The survivor exits with status 3 and one line naming the
lost rank, well within ``deepspeed.timeout_s``; no partial checkpoint is left; the run resumed
after each loss ends with the per-step losses and final weights of an uninterrupted run, bit for
bit. A second job on a folder another job holds is refused on every rank, naming the holder.

The ranks are started directly with the launcher's variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``PORT``), so the test sees what each rank does on its own (the deepspeed
launcher would SIGTERM the survivor as soon as it sees a rank die). Rank 1 is ``fastpo-train``'s
``main`` with one patch that SIGKILLs the process at a chosen point.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from trainer_helpers import job, merge

from fastpo.engine.train.checkpoint import LATEST
from fastpo.engine.train.metrics_log import read_jsonl
from fastpo.engine.train.output_lock import LOCK_FILE

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60

# rank 1: fastpo-train's main, SIGKILLed at the n-th optimizer step ("step", n) or while it
# writes the checkpoint of step n ("checkpoint", n)
KILLED_RANK = """
import os, signal, sys
from pathlib import Path
point, n = sys.argv[1], int(sys.argv[2])
if point == "step":
    from fastpo.engine.train.deepspeed_backend import DeepSpeedBackend
    original, calls = DeepSpeedBackend.step, [0]
    def step(self, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, **kw)
    DeepSpeedBackend.step = step
else:
    from fastpo.engine.train import trainer_checkpoint
    original = trainer_checkpoint.save_rng
    def save_rng(folder, rank):
        if Path(folder).name == f".tmp-step-{n:08d}":  # the backend's files are written
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, rank)
    trainer_checkpoint.save_rng = save_rng
from fastpo.engine.train.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, logs: Path, *, kill: tuple[str, int] | None = None
           ) -> list[subprocess.Popen]:
    """Rank 0 and rank 1 of ``config`` (rank 1 killed at ``kill``), each logging to
    ``logs/rank<k>.log``."""
    train = shutil.which("fastpo-train", path=str(Path(sys.executable).parent))
    assert train, "fastpo-train is not installed"
    port, procs = _port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        command = [train, "--config", str(config), "--resume"]
        if rank == 1 and kill is not None:
            command = [sys.executable, "-c", KILLED_RANK, kill[0], str(kill[1]), *command[1:]]
        procs.append(subprocess.Popen(command, env=env, stdout=(logs / f"rank{rank}.log").open("w"),
                                      stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], logs: Path) -> list[int]:
    try:
        return [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def error_lines(log: Path) -> list[str]:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("fastpo-train: error:")]


def step_losses(out: Path) -> dict[int, float]:
    """The loss of every step (the last record of a step redone after a resume)."""
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl", "train")}


@pytest.mark.slow
def test_a_lost_rank_is_named_and_the_job_resumes_exactly(tiny_dir, pairs_file, tmp_path):
    sections = dict(deepspeed={"enabled": True, "timeout_s": TIMEOUT_S},
                    optimization={"micro_batch_size": 1, "max_steps": 6},
                    checkpoint={"every_steps": 2, "keep_last": 2, "export": "full"})
    config = tmp_path / "job.yaml"

    # a job on a folder another live job holds: both ranks refuse, naming the holder
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                             "started": time.time()}))
    config.write_text(yaml.safe_dump(job(tiny_dir, pairs_file, out, **sections)))
    logs = tmp_path / "locked"
    assert wait(launch(config, logs), logs) == [3, 3]
    for rank in range(2):
        (line,) = error_lines(logs / f"rank{rank}.log")
        assert f"output folder {out} is in use by another fastpo job (pid {os.getpid()}" in line
    assert not (out / "metrics.jsonl").exists()  # nothing written into the held folder
    (out / LOCK_FILE).unlink()

    # rank 1 killed at its 3rd optimizer step (checkpoint at 2): rank 0 names it and exits
    logs = tmp_path / "killed-step"
    procs = launch(config, logs, kill=("step", 3))
    assert procs[1].wait(timeout=300) == -9, (logs / "rank1.log").read_text()[-3000:]
    t_lost = time.monotonic()
    assert procs[0].wait(timeout=TIMEOUT_S + 30) == 3, (logs / "rank0.log").read_text()[-3000:]
    assert time.monotonic() - t_lost < TIMEOUT_S
    (line,) = error_lines(logs / "rank0.log")
    assert f"rank 0: lost a rank of the job: rank 1 (pid {procs[1].pid}" in line
    assert "run the job again with --resume" in line
    ckpts = out / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step-00000002"
    assert not (out / LOCK_FILE).exists()  # released by the survivor

    # resumed; rank 1 killed while it writes the checkpoint of step 4
    logs = tmp_path / "killed-checkpoint"
    procs = launch(config, logs, kill=("checkpoint", 4))
    assert wait(procs, logs) == [3, -9], (logs / "rank0.log").read_text()[-3000:]
    (line,) = error_lines(logs / "rank0.log")
    assert "lost a rank of the job: rank 1" in line
    assert (ckpts / LATEST).read_text().strip() == "step-00000002"
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, "step-00000002"]  # no .tmp-*

    # resumed again: it completes, as an uninterrupted run does, bit for bit
    logs = tmp_path / "resumed"
    assert wait(launch(config, logs), logs) == [0, 0], (logs / "rank0.log").read_text()[-3000:]
    straight = tmp_path / "straight"
    config.write_text(yaml.safe_dump(job(tiny_dir, pairs_file, straight, **sections)))
    logs = tmp_path / "straight-logs"
    assert wait(launch(config, logs), logs) == [0, 0], (logs / "rank0.log").read_text()[-3000:]
    assert step_losses(out) == step_losses(straight)
    assert list(step_losses(out)) == [1, 2, 3, 4, 5, 6]
    resumed_weights = load_file(str(out / "final" / "model.safetensors"))
    straight_weights = load_file(str(straight / "final" / "model.safetensors"))
    assert resumed_weights.keys() == straight_weights.keys()
    for name, value in straight_weights.items():
        assert resumed_weights[name].equal(value), name


def test_the_timeout_is_configurable_and_reaches_every_new_group():
    import datetime

    from torch.distributed import distributed_c10d

    from fastpo.engine.train.config_loading import config_from_dict
    from fastpo.engine.train.runtime import set_collective_timeout

    assert config_from_dict({}).deepspeed.timeout_s == 300.0
    assert config_from_dict(merge({}, {"deepspeed": {"timeout_s": 12}})).deepspeed.timeout_s == 12
    # a group made without a timeout (DeepSpeed's data-parallel groups) gets the configured one
    saved = distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout
    try:
        set_collective_timeout(datetime.timedelta(seconds=12))
        backends = ["gloo"] + (["nccl"] if saved[1] is not None else [])  # NCCL where built
        for backend in backends:
            assert distributed_c10d._get_default_timeout(
                distributed_c10d.Backend(backend)) == datetime.timedelta(seconds=12)
    finally:
        distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout = saved


def test_a_hung_rank_is_given_up_after_the_timeout(tiny_dir, pairs_file, tmp_path):
    import signal

    out, timeout_s = tmp_path / "run", 10
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(
        tiny_dir, pairs_file, out, deepspeed={"enabled": True, "timeout_s": timeout_s},
        optimization={"micro_batch_size": 1, "max_steps": 100_000})))
    logs = tmp_path / "logs"
    procs = launch(config, logs)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or \
                len(read_jsonl(out / "metrics.jsonl", "train")) < 2:
            assert procs[0].poll() is None and time.monotonic() < deadline, \
                (logs / "rank0.log").read_text()[-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGSTOP)  # alive, but it answers no collective
        t_stop = time.monotonic()
        assert procs[0].wait(timeout=timeout_s + 60) == 3, (logs / "rank0.log").read_text()[-3000:]
        waited = time.monotonic() - t_stop
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert timeout_s - 1 < waited < timeout_s + 30  # given up after the timeout, not torch's 30 min
    (line,) = error_lines(logs / "rank0.log")
    assert f"rank 0: lost a rank of the job: rank 1 (pid {procs[1].pid}" in line
    assert "stopped answering" in line and f"deepspeed.timeout_s {timeout_s}" in line
