"""Stopping on SIGTERM/SIGINT: ``StopSignals`` (the first signal is recorded, the second gets the
previous handler) and the trainer (finish the step, checkpoint, exit 128 + signal, resume exactly).
The 2-rank agreement is in ``tests/distributed/test_train_zero.py``."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest
from trainer_helpers import job, losses, merge, run

from fastpo.engine.train import Callback, cli
from fastpo.engine.train.checkpoint import LATEST, validate_checkpoint
from fastpo.engine.train.interrupts import StopSignals


def test_first_signal_is_recorded_and_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.received is None
        signal.raise_signal(signal.SIGTERM)  # would end the process without the handler
        assert stop.received == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler in place, whatever the parent process left (a shell starts
    background jobs with SIGINT ignored, and Python then keeps it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_twice_gets_the_previous_handler(python_sigint_handler):
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Python's default SIGINT handler
            signal.raise_signal(signal.SIGINT)


FORWARDED = """
import signal
from fastpo.engine.train.interrupts import StopSignals

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground process

with StopSignals() as stop:
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)
    print("alive", stop.received == signal.SIGTERM)
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        print("interrupted")
"""


def test_forwarded_sigterms_do_not_end_the_process():
    """The scheduler's SIGTERM, then the launcher's copy of it (and a Ctrl-C on top): the first
    one is kept and the process lives on to checkpoint; only a second SIGINT leaves at once.
    In a child process: getting this wrong ends the process."""
    proc = subprocess.run([sys.executable, "-c", FORWARDED], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["alive", "True", "interrupted"]


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with StopSignals() as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.received))

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == [(before, None)]


class SignalAt(Callback):
    """Sends this process ``signum`` at the end of step ``step`` (as a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, record) -> None:
        if step == self.step:
            signal.raise_signal(self.signum)


def test_sigterm_checkpoints_the_step_and_resume_continues_exactly(tiny_dir, pairs_file,
                                                                     tmp_path):
    sections = dict(optimization={"max_steps": 4}, logging={"eval_before": True},
                    data={"eval_fraction": 0.25}, checkpoint={"every_steps": 3})
    stopped = job(tiny_dir, pairs_file, tmp_path / "stopped", **sections)
    first = run(stopped, callbacks=[SignalAt(2)])
    assert first.stopped == "signal" and first.stop_signal == signal.SIGTERM
    assert [r["step"] for r in first.history] == [1, 2]
    assert first.eval_after is None and first.export_dir is None  # no time spent after it
    assert cli.exit_status(first) == 128 + signal.SIGTERM
    ckpts = tmp_path / "stopped" / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step-00000002"
    assert validate_checkpoint(ckpts / "step-00000002") is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again

    resumed = run(merge(stopped, {"checkpoint": {"resume": True}}))
    assert resumed.stopped == "completed" and cli.exit_status(resumed) == 0
    assert [r["step"] for r in resumed.history] == [3, 4]
    straight = run(job(tiny_dir, pairs_file, tmp_path / "straight", **sections))
    assert losses(first.history) + losses(resumed.history) == pytest.approx(
        losses(straight.history), rel=1e-6, abs=1e-7)
    assert resumed.eval_after == pytest.approx(straight.eval_after, rel=1e-6, abs=1e-7)


def test_signals_left_alone_when_switched_off(tiny_dir, pairs_file, tmp_path):
    seen = []

    class Probe(Callback):
        def on_step_end(self, trainer, step, record) -> None:
            seen.append(signal.getsignal(signal.SIGTERM))

    run(job(tiny_dir, pairs_file, tmp_path, checkpoint={"export": "none", "on_signal": False}),
        callbacks=[Probe()])
    assert seen and all(h == signal.SIG_DFL for h in seen)
