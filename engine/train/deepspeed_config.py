"""DeepSpeed JSON from the job config, or the user's own JSON reconciled with it.

The trainer drives the data loop itself (micro-batch size, gradient accumulation), so DeepSpeed
must agree with it: in a user JSON every ``"auto"`` value is filled from the job config, missing
batch keys are added, and an explicit value that contradicts the job config is an error naming
both. The optimizer is AdamW (``torch_adam``; DeepSpeed's CPU Adam when the optimizer is
offloaded; fused with ZeRO-0 in fp32, where the backend skips a non-finite step through its
``found_inf``), the schedule is the trainer's own (passed to ``deepspeed.initialize``) unless the
JSON brings a ``scheduler``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig

_QUIET_STEPS = 10**9  # DeepSpeed's own step printing: off (the trainer logs)


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    block: dict[str, Any] = {"device": device, "pin_memory": device == "cpu"}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    return block


def batch_settings(cfg: TrainConfig, world_size: int) -> dict[str, int | float]:
    """The batch keys DeepSpeed must share with the trainer's loop."""
    opt = cfg.optimization
    # with a token budget the number of pairs per micro-batch varies; DeepSpeed only uses this
    # number for its throughput bookkeeping
    micro = opt.pairs_per_batch() or 1
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": opt.gradient_accumulation_steps,
        "train_batch_size": micro * opt.gradient_accumulation_steps * world_size,
        "gradient_clipping": float(opt.max_grad_norm),
    }


def optimizer_block(cfg: TrainConfig) -> dict[str, Any]:
    opt = cfg.optimization
    params: dict[str, Any] = {
        "lr": opt.learning_rate,
        "betas": [opt.adam_beta1, opt.adam_beta2],
        "eps": opt.adam_epsilon,
        "weight_decay": opt.weight_decay,
    }
    if cfg.deepspeed.offload_optimizer == "none":
        params["torch_adam"] = True  # plain torch.optim.AdamW: no JIT-built fused op
        if cfg.deepspeed.zero_stage == 0 and cfg.optimization.precision == "fp32":
            # DeepSpeed has no overflow check here; fused AdamW's found_inf lets the backend
            # skip a non-finite step on the device (DeepSpeedBackend.step)
            params["fused"] = True
    return {"type": "AdamW", "params": params}


def build_deepspeed_config(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON of the job (``deepspeed.config_file`` reconciled, or generated)."""
    if cfg.deepspeed.config_file:
        return reconcile_user_config(read_user_config(cfg.deepspeed.config_file), cfg,
                                     world_size=world_size, source=cfg.deepspeed.config_file)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False)
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, ds.nvme_path)
    precision = cfg.optimization.precision
    config: dict[str, Any] = {
        **batch_settings(cfg, world_size),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        "optimizer": optimizer_block(cfg),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if ds.zero_stage > 0:
        config["zero_allow_untested_optimizer"] = True
    return config


def read_user_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON "
                          f"(line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object")
    return data


def _fill(block: dict[str, Any], key: str, value: Any, *, where: str, source: str) -> None:
    """Fill ``block[key]`` when missing or "auto"; refuse a value that contradicts ours."""
    current = block.get(key, "auto")
    if current == "auto":
        block[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and float(current) == value):
        raise ConfigError(f"{source}: {where}{key} is {current!r} but the job config gives "
                          f"{value!r}; set it to \"auto\" or make the two agree")


def reconcile_user_config(user: dict[str, Any], cfg: TrainConfig, *, world_size: int,
                          source: str = "deepspeed config") -> dict[str, Any]:
    """Fill a user's DeepSpeed JSON from the job config (see the module docstring)."""
    config = copy.deepcopy(user)
    for key, value in batch_settings(cfg, world_size).items():
        _fill(config, key, value, where="", source=source)
    opt = config.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        for key, value in optimizer_block(cfg)["params"].items():
            if key != "torch_adam" and params.get(key) == "auto":
                params[key] = value
    else:
        config["optimizer"] = optimizer_block(cfg)
    precision = cfg.optimization.precision
    for name in ("bf16", "fp16"):
        block = config.setdefault(name, {})
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: {name} must be an object")
        _fill(block, "enabled", precision == name, where=f"{name}.", source=source)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = cfg.deepspeed.zero_stage
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0..3, got {zero['stage']!r}")
    leftover = _find_auto(config)
    if leftover:
        raise ConfigError(f"{source}: no job setting fills \"auto\" at {', '.join(leftover)}")
    config.setdefault("steps_per_print", _QUIET_STEPS)
    if zero["stage"] > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    return config


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}{k}.")]
    return [path.rstrip(".")] if node == "auto" else []


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def reference_deepspeed_config(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """Config to shard a frozen reference model with ZeRO-3 (no optimizer); None below stage 3,
    where the reference is simply replicated on every rank."""
    if zero_stage(ds_config) != 3:
        return None
    zero = {k: v for k, v in ds_config["zero_optimization"].items()
            if k not in ("offload_optimizer",)}
    return {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "train_batch_size": ds_config["train_batch_size"],
        "steps_per_print": _QUIET_STEPS,
        "zero_optimization": zero,
        "bf16": dict(ds_config.get("bf16", {"enabled": False})),
        "fp16": dict(ds_config.get("fp16", {"enabled": False})),
    }
