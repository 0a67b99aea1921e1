"""Validation and casting of the inputs of the preference-loss fronts, and their output type.

Checks read only metadata (dtype, shape, device) and Python numbers, never tensor values, so
they cost no device synchronization.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class PreferenceLossOutput(NamedTuple):
    """``loss`` is the scalar to backpropagate, equal to ``losses.mean()``; ``losses`` holds the
    weighted per-pair losses ``[B]``; the rewards ``[B]`` and the metrics are detached."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# input checks (metadata and Python numbers only)
# ----------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COUNT_DTYPES = (torch.int32, torch.int64, *_FLOAT_DTYPES)


def check_logps(name: str, value: object, *, like: Tensor | None = None) -> Tensor:
    """``value`` is a 1-D floating tensor (shaped and placed like ``like`` when given)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    _check_like(name, value, like)
    return value


def check_num_tokens(name: str, value: object, *, like: Tensor) -> Tensor:
    """``value`` is an integer or floating tensor of the shape of ``like``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in _COUNT_DTYPES:
        raise TypeError(f"{name} must be an integer or floating tensor, got {value.dtype}")
    _check_like(name, value, like)
    return value


def _check_like(name: str, value: Tensor, like: Tensor | None) -> None:
    if like is None:
        if value.dim() != 1:
            raise ValueError(f"{name} must have shape [B], got {tuple(value.shape)}")
        if value.shape[0] == 0:
            raise ValueError(f"{name} is empty: a batch needs at least one sequence")
        return
    if value.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the policy log-probs have shape "
            f"{tuple(like.shape)}"
        )
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the policy log-probs on {like.device}")


def check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def check_logits_inputs(
    policy: Tensor,
    chosen_logits_sum: Tensor | None,
    rejected_logits_sum: Tensor | None,
    vocab_size: int | None,
    have_counts: bool,
) -> None:
    for name, value in (
        ("chosen_logits_sum", chosen_logits_sum),
        ("rejected_logits_sum", rejected_logits_sum),
    ):
        if value is not None:
            check_logps(name, value, like=policy)
    if chosen_logits_sum is None and rejected_logits_sum is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(
            f"the logits/* metrics need vocab_size, a positive int, with the logit sums; "
            f"got {vocab_size!r}"
        )
    if not have_counts:
        raise ValueError("the logits/* metrics need chosen_num_tokens and rejected_num_tokens")
