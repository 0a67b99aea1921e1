"""A module's parameters under DeepSpeed ZeRO-3: gathered whole for a block, copied out to CPU
(:func:`full_state_dict`) or in from a state dict (:func:`load_full_state_dict`), one parameter at
a time so that the whole model is never gathered at once. Without ZeRO-3 each is a plain copy."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastpo.kernels.zero3 import is_zero3_parameter


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], *, modifier_rank: int | None = None):
    """DeepSpeed ZeRO-3 partitioned parameters gathered whole inside the block (else no-op)."""
    if any(is_zero3_parameter(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def full_state_dict(module: nn.Module, *, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of a module's parameters (gathered one by one under ZeRO-3) and persistent
    buffers, under their ``state_dict`` names."""
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        with gathered([param]):
            out[name] = param.detach().to("cpu", copy=True)
    if not only_trainable:
        persistent = set(module.state_dict(keep_vars=True))
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], *,
                         source: str = "checkpoint") -> None:
    """Copy ``state`` into ``module``'s parameters (ZeRO-3: gathered, rank 0 broadcasts)."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    unknown = sorted(set(state) - set(params) - set(buffers))
    if unknown:
        raise KeyError(f"{source} holds tensors the model does not have: {unknown[:5]}")
    for name, value in state.items():
        if name in buffers:
            buffers[name].data.copy_(value)
            continue
        param = params[name]
        with gathered([param], modifier_rank=0), torch.no_grad():
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(param.shape)}")
            param.data.copy_(value)
