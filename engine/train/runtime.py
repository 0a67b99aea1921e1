"""Process set-up and the two optimization backends of the trainer.

- :func:`init_runtime`: ranks from the launcher's environment (``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``, as set by ``deepspeed`` or ``torchrun``), the device, and DeepSpeed's process
  group when DeepSpeed is used.
- :class:`TorchBackend`: one plain process: ``torch.optim.AdamW``, the LR schedule, gradient
  accumulation, clipping, optional bf16 autocast.
- :class:`DeepSpeedBackend`: ``deepspeed.initialize`` with the generated (or user) JSON, ZeRO
  0-3, offload, bf16/fp16; checkpoints through ``engine.save_checkpoint``/``load_checkpoint``
  inside the trainer's atomic folder, with a checkpoint engine that hashes files as it writes
  them and loads them with ``weights_only=True`` (:mod:`.safe_load`).

Both expose the same calls to the training loop: ``backward(loss)`` per micro-batch and
``step()`` at the accumulation boundary, which returns the gradient norm and whether the
update was applied (non-finite gradients are detected here: DeepSpeed skips such a step under
ZeRO / mixed precision, and the plain paths refuse it before the optimizer runs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
    collectives go through the torch process group (gloo on CPU) either way."""
    module = sys.modules.get("deepspeed.comm.torch")
    if module is None:
        import deepspeed.comm.torch  # noqa: F401

        module = sys.modules["deepspeed.comm.torch"]
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


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
        if not torch.distributed.is_initialized():
            backend = cfg.deepspeed.communication_backend
            deepspeed.init_distributed(dist_backend=backend) if backend else \
                deepspeed.init_distributed()
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


# --------------------------------------------------------------------------- optimization
def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warmup, then cosine / linear
    decay to ``min_lr_ratio`` at ``total_steps`` (or constant)."""
    opt = cfg.optimization
    warmup = opt.warmup_steps or math.ceil(opt.warmup_ratio * total_steps)
    floor, kind = opt.min_lr_ratio, opt.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return floor + (1.0 - floor) * shape

    return factor


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


@dataclass
class StepOutcome:
    """Device tensors where the backend decides on the device (read at the trainer's next
    logging point), host values where it already synchronized (DeepSpeed's own checks)."""

    grad_norm: Tensor | float | None
    applied: Tensor | bool
    reason: str = ""


def _grad_norm(params: list[nn.Parameter]) -> Tensor | None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))


class TorchBackend:
    """A single plain process: AdamW + LambdaLR, accumulation, clipping, bf16 autocast."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, total_steps: int,
                 device: torch.device) -> None:
        opt = cfg.optimization
        if opt.precision == "fp16":
            raise ValueError("optimization.precision 'fp16' needs DeepSpeed (loss scaling)")
        self.module = module.to(device)
        self.device = device
        self.accumulation = opt.gradient_accumulation_steps
        self.max_grad_norm = opt.max_grad_norm
        self.autocast_dtype = torch.bfloat16 if opt.precision == "bf16" else None
        # fused AdamW skips a non-finite step on the device (``found_inf``, as under GradScaler):
        # no host read of the gradient norm per step
        self.fused = device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(
            param_groups(module, opt.weight_decay), lr=opt.learning_rate,
            betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_epsilon,
            **({"fused": True} if self.fused else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(cfg, total_steps))
        self.params = [p for p in module.parameters() if p.requires_grad]

    @property
    def model(self) -> nn.Module:
        return self.module

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self, *, nonfinite: Tensor | None = None) -> StepOutcome:
        """Clip, update, advance the schedule. The update is skipped when the gradient norm is
        not finite or ``nonfinite`` (the step's count of non-finite losses) is > 0: on the
        device with fused AdamW (no host synchronization; the schedule still advances), else
        after reading the norm."""
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = _grad_norm(self.params)
        if norm is None:  # no gradients at all: nothing to update
            self.scheduler.step()
            return StepOutcome(None, True)
        bad = ~torch.isfinite(norm)
        if nonfinite is not None:
            bad = bad | (nonfinite > 0)
        if self.fused:
            self.optimizer.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(norm.detach(), ~bad, "non-finite gradient norm or loss")
        value = float(norm)  # a host read: only on devices without fused AdamW
        if bool(bad):
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(value, False, "non-finite gradient norm or loss")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(value, True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, *, rank: int, include_frozen: bool) -> None:
        from safetensors.torch import save_file

        from ..model.gather import full_state_dict
        from .checkpoint import write_hashed

        if rank != 0:
            return
        state = full_state_dict(self.module, only_trainable=not include_frozen)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        with write_hashed(folder / "optimizer.pt") as f:
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, f)

    def load(self, folder: Path) -> None:
        from ..model.gather import load_full_state_dict
        from .checkpoint import CheckpointError
        from .safe_load import load_safetensors, torch_load

        model_file, optimizer_file = folder / "model.safetensors", folder / "optimizer.pt"
        load_full_state_dict(self.module, load_safetensors(model_file), source=str(model_file))
        state = torch_load(optimizer_file, map_location=self.device)
        if not isinstance(state, dict) or not {"optimizer", "scheduler"} <= set(state):
            raise CheckpointError(f"{optimizer_file}: expected the optimizer and scheduler "
                                  "states, found something else")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedBackend:
    """``deepspeed.initialize`` around the policy; the engine owns optimizer and schedule."""

    TAG = "deepspeed"

    def __init__(self, module: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], *,
                 total_steps: int) -> None:
        import deepspeed

        opt = cfg.optimization
        scheduler = None
        if "scheduler" not in ds_config:
            schedule = lr_lambda(cfg, total_steps)

            def scheduler(optimizer):
                return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, opt.weight_decay),
            config=ds_config, lr_scheduler=scheduler)
        from .safe_load import install_safe_checkpoint_engine

        install_safe_checkpoint_engine(self.engine)
        self.module = self.engine.module
        self.accumulation = self.engine.gradient_accumulation_steps()
        zero = self.engine.zero_optimization_stage()
        # plain fp32 without ZeRO: the engine applies NaN gradients unchecked; check them first
        self.precheck = zero == 0 and not (self.engine.bfloat16_enabled()
                                           or self.engine.fp16_enabled())
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def model(self) -> nn.Module:
        return self.engine

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, *, nonfinite: Tensor | None = None) -> StepOutcome:
        """DeepSpeed's step. Its overflow / non-finite checks (fp16 loss scaling, ZeRO) read
        the device inside ``engine.step``; we add none, except in the fp32 no-ZeRO ``precheck``
        below, where the engine would apply NaN gradients unchecked. A non-finite loss
        (``nonfinite``) leaves non-finite gradients, which those checks catch."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedBackend.step() called off the gradient accumulation "
                               "boundary: the trainer and DeepSpeed disagree on micro-steps")
        if self.precheck:
            norm = _grad_norm(self.params)
            if norm is not None and not math.isfinite(float(norm)):
                for p in self.params:
                    p.grad = None  # AdamW leaves parameters without gradients untouched
                self.engine.step()
                return StepOutcome(float(norm), False, "non-finite gradient norm")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor or a float: the trainer reads it
        applied = bool(getattr(self.engine, "_step_applied", True))  # host state of DeepSpeed's
        return StepOutcome(norm, applied, "" if applied else "non-finite gradients "
                           "(DeepSpeed skipped the update)")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, folder: Path, *, rank: int, include_frozen: bool) -> None:
        with self._frozen_aliases_excluded(not include_frozen):
            self.engine.save_checkpoint(str(folder), tag=self.TAG, save_latest=False,
                                        exclude_frozen_parameters=not include_frozen)

    @contextlib.contextmanager
    def _frozen_aliases_excluded(self, active: bool) -> Iterator[None]:
        """DeepSpeed drops frozen parameters from a checkpoint by their ``named_parameters``
        names, which list a tied tensor once: a frozen lm_head tied to the input embedding
        (SmolLM2, Gemma, small Qwen) was still written under its second name. While active,
        every state-dict entry that shares storage with a frozen parameter is dropped too."""
        engine = self.engine
        stage3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
        if not active or stage3:  # ZeRO-3 parameters are empty shards: no storage to match
            yield
            return
        original = engine.module_state_dict

        def without_frozen(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            state = original(*args, **kwargs)
            frozen = {p.data_ptr() for p in engine.module.parameters()
                      if not p.requires_grad and p.numel()}
            return type(state)((k, v) for k, v in state.items()
                               if not (v.numel() and v.data_ptr() in frozen))

        engine.module_state_dict = without_frozen
        try:
            yield
        finally:
            del engine.module_state_dict  # back to the class's method

    def load(self, folder: Path) -> None:
        if self.engine.load_universal_checkpoint():
            raise ValueError("DeepSpeed's checkpoint.load_universal is not supported: it reads "
                             "files with full unpickling (fastpo loads with weights_only=True)")
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/{self.TAG}")
