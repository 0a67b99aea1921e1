"""The DeepSpeed optimization backend: ``deepspeed.initialize`` with the generated (or user) JSON,
ZeRO 0-3, offload, bf16/fp16; checkpoints through ``engine.save_checkpoint`` /
``load_checkpoint`` inside the trainer's atomic folder, with a checkpoint engine that hashes files
as it writes them and loads them with ``weights_only=True`` (:mod:`.safe_load`).

It uses DeepSpeed's public engine API (``backward``, ``step``, ``was_step_applied``,
``get_global_grad_norm``, ``save_checkpoint`` ...) except in one place, where no public API does
the job: :meth:`DeepSpeedBackend._frozen_aliases_excluded` (see there), checked against the
installed DeepSpeed by ``tests/engine/train/test_train_deepspeed.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .optimization import StepOutcome, gradient_norm, lr_lambda, param_groups


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
        # plain fp32 without ZeRO: the engine applies NaN gradients unchecked. With fused torch
        # AdamW (the generated config's) the update is skipped on the device through its
        # found_inf; with another optimizer (a user's JSON) the norm is read first.
        unchecked = zero == 0 and not (self.engine.bfloat16_enabled()
                                       or self.engine.fp16_enabled())
        optimizer = self.engine.optimizer
        self.skip_on_device = unchecked and isinstance(optimizer, torch.optim.AdamW) and bool(
            optimizer.defaults.get("fused"))
        self.precheck = unchecked and not self.skip_on_device
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def model(self) -> nn.Module:
        return self.engine

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        """``loss`` is the micro-batch's share of the step's loss (:mod:`.step_weighting`):
        DeepSpeed does not divide it by the accumulation steps again (it still averages the
        gradients over the ranks, which the share's ``world_size`` factor undoes)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, *, nonfinite: Tensor | None = None) -> StepOutcome:
        """DeepSpeed's step. Its overflow / non-finite checks (fp16 loss scaling, ZeRO) read
        the device inside ``engine.step``; we add none. In fp32 without ZeRO, where the engine
        has no such check, a step whose gradient norm is not finite or whose loss was
        (``nonfinite`` > 0) is skipped on the device by fused AdamW's ``found_inf``, without a
        host read; only with another optimizer (a user's JSON: ``precheck``) is the norm read
        first. Elsewhere a non-finite loss leaves non-finite gradients, which DeepSpeed's
        checks catch."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedBackend.step() called off the gradient accumulation "
                               "boundary: the trainer and DeepSpeed disagree on micro-steps")
        if self.skip_on_device:
            norm = gradient_norm(self.params)  # before DeepSpeed's clipping, as reported
            if norm is None:
                self.engine.step()
                return StepOutcome(None, True)
            bad = ~torch.isfinite(norm)
            if nonfinite is not None:
                bad = bad | (nonfinite > 0)
            optimizer = self.engine.optimizer
            optimizer.found_inf = bad.float()
            try:
                self.engine.step()
            finally:
                del optimizer.found_inf
            return StepOutcome(norm.detach(), ~bad, "non-finite gradient norm or loss")
        if self.precheck:
            norm = gradient_norm(self.params)
            if norm is not None and not math.isfinite(float(norm)):
                self._step_without_update()
                return StepOutcome(float(norm), False, "non-finite gradient norm")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor or a float: the trainer reads it
        applied = self.engine.was_step_applied()  # a host flag: DeepSpeed's own overflow check
        return StepOutcome(norm, applied, "" if applied else "non-finite gradients "
                           "(DeepSpeed skipped the update)")

    def _step_without_update(self) -> None:
        """``engine.step()`` with the parameters and the optimizer state left as they were (its
        counters and the schedule advance): a non-finite step under an optimizer without
        ``found_inf``. The gradients are zeroed first (DeepSpeed's clipping needs some), and the
        state is restored from a copy: an exceptional path, where a copy costs nothing that
        matters."""
        optimizer = self.engine.optimizer
        params = [p.detach().clone() for p in self.params]
        state = copy.deepcopy(optimizer.state_dict())
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()
        self.engine.step()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, scheduled in zip(optimizer.param_groups, groups):
            group.update(scheduled)  # the schedule's new learning rate stays
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)

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
        every state-dict entry that shares storage with a frozen parameter is dropped too.

        No public DeepSpeed API chooses what ``save_checkpoint`` writes of the module, so this
        overrides the engine's ``module_state_dict`` on the instance for the block: it relies on
        ``save_checkpoint`` building the module's state through ``self.module_state_dict``
        (``test_train_deepspeed.py`` checks that on the installed DeepSpeed, and that a frozen
        tied head stays out of the written file)."""
        engine = self.engine
        if not active or engine.zero_optimization_stage() == 3:
            yield  # ZeRO-3 parameters are empty shards: no storage to match
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
