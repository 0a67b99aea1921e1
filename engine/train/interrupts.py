"""A clean stop on SIGTERM or SIGINT: the trainer finishes its step, checkpoints and exits.

Schedulers preempt a job with SIGTERM (and SIGKILL after a grace period); Ctrl-C sends SIGINT.
A signal only records itself; the trainer reads :attr:`StopSignals.received` at the next step
boundary (all ranks agree through an all-reduce), writes a checkpoint and returns.

Launchers forward signals: a rank may get SIGTERM from the scheduler and again from the deepspeed
launcher (or torchrun) a moment later, so further SIGTERMs are only noted — the scheduler's
SIGKILL ends a job that overstays. A second SIGINT (Ctrl-C twice) gets the handler that was there
before, ``KeyboardInterrupt``, for a user at the terminal who wants out at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, the first of ``signals`` is recorded, not acted on (see the
    module docstring for repeated signals).

    Signal handlers can only be set from the main thread; elsewhere this does nothing (and
    ``received`` stays None).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._interrupted = False  # a SIGINT has been received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT and self._interrupted:  # Ctrl-C twice: out at once
                signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
                signal.raise_signal(signum)
            self._interrupted |= signum == signal.SIGINT
            return
        self.received = signum
        self._interrupted = signum == signal.SIGINT
        logger.warning("%s received: stopping after this step with a checkpoint%s",
                       signal.Signals(signum).name,
                       " (Ctrl-C again to stop at once)" if self._interrupted else "")
