"""The reference follows the policy: TR-DPO soft updates and iterative-DPO hard resets.

TR-DPO (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656) updates the reference every N steps with ref ← (1 − α)·ref + α·policy;
iterative DPO sets ref ← policy (α = 1) at the start of each round.

- Separate reference model: a lerp of every reference parameter towards the policy's. Under
  DeepSpeed ZeRO-3 both are partitioned: each pair is gathered (``GatheredParameters``, rank 0
  modifies, then re-partitioned) one parameter at a time, so nothing is ever gathered whole.
- LoRA policy whose reference is the base model (adapter disabled): with policy W + s·BA and
  reference W, the update W ← W + α·s·BA and B ← (1 − α)·B moves the reference exactly to
  (1 − α)·W + α·(W + s·BA) and leaves the policy unchanged. B's optimizer master copy (ZeRO /
  mixed precision) is updated too; the Adam moments are kept as they are.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .gather import gathered


def _named(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters())


@torch.no_grad()
def soft_update_separate(reference: nn.Module, policy: nn.Module, alpha: float) -> int:
    """ref ← (1 − α)·ref + α·policy over every parameter; returns how many were updated."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    ref_params, pol_params = _named(reference), _named(policy)
    missing = sorted(set(ref_params) ^ set(pol_params))
    if missing:
        raise ValueError("the reference and the policy have different parameters "
                         f"(e.g. {missing[:3]}); a soft update needs the same architecture")
    for name, ref in ref_params.items():
        pol = pol_params[name]
        with gathered([ref, pol], modifier_rank=0):
            if ref.shape != pol.shape:
                raise ValueError(f"{name}: reference {tuple(ref.shape)} vs policy "
                                 f"{tuple(pol.shape)}")
            ref.data.lerp_(pol.data.to(ref.dtype), alpha)
    return len(ref_params)


def _set_trainable(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give a trainable parameter a new value, including its optimizer master copy: under
    DeepSpeed (imported by then) its public ``safe_set_full_fp32_param`` updates the fp32 master
    of a ZeRO or bf16-optimizer parameter and leaves any other parameter alone."""
    param.data.copy_(value.to(param.dtype))
    if "deepspeed" in sys.modules:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


@torch.no_grad()
def soft_update_lora(model: nn.Module, alpha: float) -> int:
    """Fold α of every active LoRA delta into the base weights (see the module docstring).

    Returns how many LoRA layers were updated. DoRA and non-Linear LoRA layers are refused.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise TypeError(f"{name}: reference sync supports LoRA on Linear layers only, got "
                            f"{type(module).__name__}")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise TypeError(f"{name}: reference sync does not support DoRA adapters")
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            base = module.get_base_layer().weight
            with gathered([a, b, base], modifier_rank=0):
                delta = module.get_delta_weight(adapter).float()
                base.data.add_((alpha * delta).to(base.dtype))
                _set_trainable(b, b.data.float() * (1.0 - alpha))
            count += 1
    if count == 0:
        raise ValueError("no active LoRA layer found: the adapter-disabled reference cannot sync")
    return count
