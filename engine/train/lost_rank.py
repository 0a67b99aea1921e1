"""A lost rank: a collective that fails because a peer died becomes one line naming it.

At start every rank learns each rank's host and pid (:func:`peer_table`, one ``all_gather``).
When a collective fails — gloo sees the dead peer's socket close at once; a peer that hangs is
given up after ``deepspeed.timeout_s`` (the process group's timeout, default 300 s instead of
torch's 30 minutes) — :func:`lost_rank_error` turns the communication error into a
:class:`LostRankError` that names the ranks whose process is gone (checked by pid for ranks on
this host; a rank on another host is named as unreachable). The survivors then exit with status
3, leaving the last complete checkpoint for ``--resume``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch

from ..errors import JobFault

# texts of the communication errors gloo / NCCL / the TCP store raise when a peer is gone
_COMM_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "Gloo", "gloo", "NCCL", "Timed out", "timed out", "Socket Timeout",
               "DistBackendError", "Connection refused", "ProcessGroup")


class LostRankError(JobFault):
    """A rank of the job died or stopped answering; the message names it."""


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int


def peer_table(world_size: int) -> list[Peer]:
    """Every rank's host and pid (a collective: every rank calls it once, at start)."""
    me = (socket.gethostname(), os.getpid())
    if world_size == 1:
        return [Peer(0, *me)]
    gathered: list[tuple[str, int] | None] = [None] * world_size
    torch.distributed.all_gather_object(gathered, me)
    return [Peer(rank, host, pid) for rank, (host, pid) in
            enumerate(g for g in gathered if g is not None)]


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer gone, or the timeout reached)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _COMM_TEXTS)


def _state(peer: Peer) -> str | None:
    """"gone", "stopped" (SIGSTOP, a debugger) or "running"; None on another host."""
    if peer.host != socket.gethostname():
        return None
    try:
        os.kill(peer.pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "running"
    try:  # a zombie (killed, not yet reaped by the launcher) is gone too
        with open(f"/proc/{peer.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "running"
    return {"Z": "gone", "X": "gone", "T": "stopped", "t": "stopped"}.get(state, "running")


def lost_rank_error(exc: BaseException, *, rank: int, peers: list[Peer],
                    timeout_s: float) -> LostRankError | None:
    """``exc`` as a :class:`LostRankError` naming the lost ranks, or None when ``exc`` is not a
    failed collective of a multi-rank job."""
    if len(peers) < 2 or not is_comm_failure(exc):
        return None
    states = [(p, _state(p)) for p in peers if p.rank != rank]

    def named(state: str | None) -> list[str]:
        return [f"rank {p.rank} (pid {p.pid} on {p.host})" for p, s in states if s == state]

    if named("gone"):
        what = f"{', '.join(named('gone'))} {'is' if len(named('gone')) == 1 else 'are'} gone"
    elif named("stopped"):
        what = f"{', '.join(named('stopped'))} stopped answering (its process is stopped)"
    elif named(None):
        what = f"no answer from {', '.join(named(None))}"
    else:
        what = "a collective failed while every rank of this host still runs"
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp):\d+\]\s*", "", str(exc)).strip()  # gloo's source
    first = text.splitlines()[0][:120] if text else type(exc).__name__
    return LostRankError(f"rank {rank}: lost a rank of the job: {what} (communication error: "
                         f"{first}; deepspeed.timeout_s {timeout_s:g}); the last complete "
                         "checkpoint is kept: run the job again with --resume")
