"""One writer per output folder: a lock file that names its holder.

    <output_dir>/fastpo.lock     {"host": ..., "pid": ..., "started": ..., "proc_start": ...}

:func:`acquire_output_lock` creates the file with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+)
before the job writes anything into the folder, and :meth:`OutputLock.release` removes it when the
job ends (normally or with an error). A second job on the same folder is refused with an
:class:`OutputLockedError` naming the holder (host, pid, start time). A lock whose holder is gone
(same host, its pid no longer runs, or runs a different process that started later) was left by a
killed job: it is taken over with a warning, so ``--resume`` after a crash or a SIGKILL just
works. A lock held from another host cannot be checked from here: the message says to delete the
file once that job is known to be gone.

Multi-rank jobs take it once, on rank 0; the other ranks wait for rank 0's answer (one broadcast)
and stop with the same message when it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import JobFault

logger = logging.getLogger(__name__)

LOCK_FILE = "fastpo.lock"


class OutputLockedError(JobFault):
    """The output folder is held by another job (the message names it)."""


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name


def _alive(pid: int, proc_start: int | None) -> bool:
    """Whether process ``pid`` (on this host) still runs and is the one that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def _holder_text(holder: dict[str, object]) -> str:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "an unknown time")
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {when}"


@dataclass
class OutputLock:
    """A held lock; :meth:`release` removes its file (only if it is still ours)."""

    path: Path
    token: str

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # gone already, or taken over: not ours to remove


def _read_holder(path: Path) -> dict[str, object] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held by an unknown job
    return holder if isinstance(holder, dict) else {}


def acquire_output_lock(folder: str | Path) -> OutputLock:
    """Take the lock of ``folder`` (created if missing); :class:`OutputLockedError` when another
    live job holds it; a dead holder's lock on this host is taken over with a warning."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    host, pid = socket.gethostname(), os.getpid()
    token = f"{host}:{pid}:{time.time_ns()}"
    record = {"host": host, "pid": pid, "started": time.time(), "proc_start": _proc_start(pid),
              "token": token}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.get("host") == host and isinstance(holder.get("pid"), int) \
                    and holder["pid"] != pid:
                proc_start = holder.get("proc_start")
                if not _alive(holder["pid"], proc_start if isinstance(proc_start, int) else None):
                    stale = path.with_name(f".{LOCK_FILE}.stale-{pid}")
                    try:
                        os.replace(path, stale)  # one taker wins; the others find it held
                    except FileNotFoundError:
                        continue
                    stale.unlink(missing_ok=True)
                    logger.warning("output folder %s: taking over the lock left by %s, which is "
                                   "no longer running", folder, _holder_text(holder))
                    continue
            raise OutputLockedError(
                f"output folder {folder} is in use by another fastpo job ({_holder_text(holder)}; "
                f"lock file {path}); wait for it to end, choose another logging.output_dir, or "
                f"delete {path} if that job is gone") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return OutputLock(path, token)
    raise OutputLockedError(f"output folder {folder}: could not take the lock {path} (it keeps "
                            "changing hands); is another job starting there?")


def lock_output_folder(folder: str | Path, *, rank: int, world_size: int) -> OutputLock | None:
    """Rank 0 takes the lock of ``folder``; every rank learns the answer (one broadcast) and
    stops with rank 0's message when it failed. Rank 0 gets the lock, the others None."""
    lock, message = None, None
    if rank == 0:
        try:
            lock = acquire_output_lock(folder)
        except OutputLockedError as exc:
            message = str(exc)
        except OSError as exc:  # an unwritable or full output folder
            from .storage import storage_failure

            fault = storage_failure(exc, folder=Path(folder), what="the output lock")
            message = str(fault or exc)
    if world_size > 1:
        import torch

        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise OutputLockedError(message if rank == 0 else f"rank {rank}: {message}")
    return lock
