"""The plain optimization backend: one process, ``torch.optim.AdamW`` and a ``LambdaLR`` schedule,
gradient accumulation, clipping, optional bf16 autocast; a non-finite step is skipped on the
device (fused AdamW's ``found_inf``), without a host read."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .optimization import StepOutcome, gradient_norm, lr_lambda, param_groups


class TorchBackend:
    """A single plain process: AdamW + LambdaLR, accumulation, clipping, bf16 autocast."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, total_steps: int,
                 device: torch.device) -> None:
        opt = cfg.optimization
        if opt.precision == "fp16":
            raise ValueError("optimization.precision 'fp16' needs DeepSpeed (loss scaling)")
        # a bitsandbytes-quantized base was placed on its device when it was loaded
        self.module = module if getattr(module, "is_quantized", False) else module.to(device)
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
        """Accumulate the gradient of ``loss``: the micro-batch's share of the step's loss (the
        objective normalizes by the step's item count, :mod:`.step_weighting`), not divided
        again by the accumulation steps."""
        loss.backward()

    def step(self, *, nonfinite: Tensor | None = None) -> StepOutcome:
        """Clip, update, advance the schedule. The update is skipped when the gradient norm is
        not finite or ``nonfinite`` (the step's count of non-finite losses) is > 0: on the
        device with fused AdamW (no host synchronization; the schedule still advances), else
        after reading the norm."""
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = gradient_norm(self.params)
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
