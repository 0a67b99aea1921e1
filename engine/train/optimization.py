"""What the two optimization backends share: the LR schedule, the parameter groups, the gradient
norm, and the outcome of one optimizer step.

Both backends (:mod:`.torch_backend`, :mod:`.deepspeed_backend`) expose the same calls to the
training loop: ``backward(loss)`` per micro-batch and ``step()`` at the accumulation boundary,
which returns a :class:`StepOutcome`: the gradient norm and whether the update was applied
(non-finite gradients are detected there: DeepSpeed skips such a step under ZeRO / mixed
precision, and the plain paths refuse it before the optimizer runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
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


def gradient_norm(params: list[nn.Parameter]) -> Tensor | None:
    """The 2-norm of all the parameters' gradients (float32), None when none has one."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))
