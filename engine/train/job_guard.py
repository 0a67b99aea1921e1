"""The trainer's guard against faults of its environment (see README "What happens when…").

:class:`JobGuard`, built right after the process group and before anything is written:

- takes the output folder's lock on rank 0 (:mod:`.output_lock`; also ``checkpoint.dir``'s when
  it lies outside, so that two jobs never rotate each other's checkpoints) and releases it when
  the job ends, normally or not;
- learns every rank's host and pid, so that a failed collective becomes a
  :class:`~.lost_rank.LostRankError` naming the rank that is gone (:meth:`watching`);
- lets the ranks agree on host-side facts without a device sync (:meth:`any_rank`, a gloo
  all-reduce on the CPU: the stop signal, a storage check's verdict), so that a check rank 0
  makes (:meth:`rank0_check`: the room for a checkpoint or the export) stops every rank at once.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .lost_rank import lost_rank_error, peer_table
from .output_lock import OutputLock, lock_output_folder
from .runtime import Runtime
from .storage import StorageError, check_room


class JobGuard:
    """See the module docstring."""

    def __init__(self, rt: Runtime, cfg: TrainConfig) -> None:
        self.rt, self.timeout_s = rt, cfg.deepspeed.timeout_s
        self.peers = peer_table(rt.world_size)
        # host-side agreement is reduced on the CPU (gloo), never through the device
        self.host_group = None
        if rt.world_size > 1 and torch.distributed.get_backend() != "gloo":
            self.host_group = torch.distributed.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        self.locks: list[OutputLock] = []
        folders = [Path(cfg.logging.output_dir)]
        if cfg.checkpoint.dir and not Path(cfg.checkpoint.dir).absolute().is_relative_to(
                folders[0].absolute()):
            folders.append(Path(cfg.checkpoint.dir))
        with self.watching(release=False):
            for folder in folders:
                lock = lock_output_folder(folder, rank=rt.rank, world_size=rt.world_size)
                if lock is not None:
                    self.locks.append(lock)

    def release(self) -> None:
        """Release the folders (rank 0; idempotent)."""
        while self.locks:
            self.locks.pop().release()

    @contextlib.contextmanager
    def watching(self, *, release: bool = True) -> Iterator[None]:
        """A block of the job: an exception leaving it releases the folder, and a failed
        collective leaves it as a :class:`~.lost_rank.LostRankError` naming the lost rank; with
        ``release``, the folder is released after the block in any case."""
        try:
            yield
        except BaseException as exc:
            self.release()
            lost = lost_rank_error(exc, rank=self.rt.rank, peers=self.peers,
                                   timeout_s=self.timeout_s)
            if lost is not None:
                raise lost from None
            raise
        finally:
            if release:
                self.release()

    def any_rank(self, value: int) -> int:
        """The largest ``value`` over the ranks (host memory: no device sync)."""
        if self.rt.world_size == 1:
            return value
        got = torch.tensor([float(value)])
        torch.distributed.all_reduce(got, op=torch.distributed.ReduceOp.MAX,
                                     group=self.host_group)
        return int(got[0])

    def rank0_check(self, check: Callable[[], None]) -> None:
        """Run a storage ``check`` on rank 0; every rank stops when it fails."""
        error = None
        if self.rt.is_main:
            try:
                check()
            except StorageError as exc:
                error = exc
        if self.any_rank(int(error is not None)):
            raise error or StorageError(f"rank {self.rt.rank}: stopped: rank 0 found too little "
                                        "free space (its message names the folder)")

    def check_export_room(self, module: nn.Module, folder: Path, cfg: TrainConfig) -> None:
        """Before the export of ``module`` into ``folder``: its weights (the adapter's, or the
        whole model's) must fit."""
        from .model_loading import resolve_export

        kind = resolve_export(cfg)
        if kind == "none":
            return
        needed = sum(p.numel() * p.element_size() for p in module.parameters()
                     if kind != "adapter" or p.requires_grad)
        self.rank0_check(lambda: check_room(
            folder, needed, what="checkpoint.export_dir",
            hint="free space there or set checkpoint.export_dir to a larger disk; the last "
                 "checkpoint is kept: run again with --resume to export"))
