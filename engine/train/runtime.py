"""Process set-up: :func:`init_runtime` reads the ranks from the launcher's environment
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, as set by ``deepspeed`` or ``torchrun``), picks the
device, and starts DeepSpeed's process group when DeepSpeed is used; :func:`zero3_loading` makes
transformers load models straight into ZeRO-3 shards.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """In-place all-reduce over the ranks (sum or max); identity in one process."""
        if self.world_size > 1:
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM,
                         "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """The mean over the ranks of a detached copy of ``tensor`` (itself in one process)."""
        if self.world_size == 1:
            return tensor
        return self.all_reduce_(tensor.detach().clone()) / self.world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory collective (~1-2 min per fresh
    machine). That op only serves DeepSpeed's tensor-parallel *inference* all-reduce; training
    collectives go through the torch process group (gloo on CPU) either way.

    DeepSpeed has no public switch for it: its torch communication backend calls the module
    function ``deepspeed.comm.torch.build_shm_op()`` when it starts, so that function is replaced
    by one that builds nothing (``tests/engine/train/test_train_deepspeed.py`` checks that the
    installed DeepSpeed still calls it there)."""
    import deepspeed.comm.torch  # noqa: F401  (the attribute `deepspeed.comm.torch` is shadowed)

    module = sys.modules["deepspeed.comm.torch"]
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def set_collective_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the timeout of every process group this process creates from now on.

    The world group takes it from ``init_process_group``, but a group made later with
    ``new_group`` and no timeout gets torch's default (30 minutes; NCCL 10) instead, and DeepSpeed
    makes its data-parallel groups so: a hung rank would hold the others there for 30 minutes.
    No public API sets that default; ``torch.distributed.distributed_c10d._get_default_timeout``
    reads the module's ``default_pg_timeout`` / ``default_pg_nccl_timeout`` at each call, so those
    are set (``tests/distributed/test_lost_rank.py`` checks that the installed torch still reads
    them, and that a hung rank is given up after ``deepspeed.timeout_s``)."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def init_runtime(cfg: TrainConfig) -> Runtime:
    """Ranks, device and (with DeepSpeed) the process group of this process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_ds = cfg.uses_deepspeed(world_size)
    if world_size > 1 and not use_ds:
        raise ValueError(f"{world_size} ranks were launched but deepspeed.enabled is false; "
                         "multi-rank training runs through DeepSpeed")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if use_ds:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu" and not cfg.deepspeed.cpu_shm_comm:
            skip_deepspeed_shm_op()
        if world_size == 1:  # a single process without a launcher still needs a rendezvous
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # a lost rank ends the job after deepspeed.timeout_s, not torch's 30 minutes
        timeout = datetime.timedelta(seconds=cfg.deepspeed.timeout_s)
        set_collective_timeout(timeout)
        if not torch.distributed.is_initialized():
            backend = cfg.deepspeed.communication_backend
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout) if backend else \
                deepspeed.init_distributed(timeout=timeout)
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Runtime(rank, world_size, local_rank, device, use_ds)


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Under a ZeRO-3 DeepSpeed config, transformers loads models straight into ZeRO-3 shards
    (``zero.Init``) inside this block, so no rank ever holds a whole copy of the policy or the
    reference; loads after it (the merged export) are plain again, also after an error."""
    from .deepspeed_config import zero_stage

    if ds_config is None or zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers holds a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
