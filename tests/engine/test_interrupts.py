"""StopSignals: the first SIGTERM/SIGINT is recorded, the second gets the previous handler."""

from __future__ import annotations

import signal
import threading

import pytest

from fastpo.engine.interrupts import StopSignals


def test_first_signal_is_recorded_and_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.received is None
        signal.raise_signal(signal.SIGTERM)  # would end the process without the handler
        assert stop.received == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_second_signal_gets_the_previous_handler():
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Python's default SIGINT handler
            signal.raise_signal(signal.SIGINT)


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
