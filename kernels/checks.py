"""Input validation shared by every backend of the log-probability ops.

Shape, dtype and knob checks read only metadata. The label range check reads the labels (one
small reduction; on CUDA it synchronizes once per call) so that a bad label is reported with its
position instead of reading memory past a row; set ``FASTPO_CHECK_LABELS=0`` to turn it off.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("sum", "mean")


def check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, *,
                        name: str = "logits") -> None:
    """Metadata checks: logits ``[..., V]`` floating, labels integer of the leading shape."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [N, V] or [B, T, V], got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape "
            f"{tuple(logits.shape)}: expected labels of shape {tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but {name} are on {logits.device}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} have an empty vocabulary dimension (V = 0)")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in ``[0, vocab)`` or equals ``ignore_index``; else say where it is not."""
    if os.environ.get("FASTPO_CHECK_LABELS", "1") == "0" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(labels[where])
        count = int(bad.sum())
        raise ValueError(
            f"label {value} at position {where} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index} ({count} such label{'s' if count > 1 else ''})"
        )
