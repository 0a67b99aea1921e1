"""Input validation shared by every backend of the log-probability ops.

Shape, dtype and knob checks read only metadata. The value checks (labels inside the vocabulary,
packed ``sequence_ids`` inside ``[-1, num_sequences)``) never stop a device's pipeline:

- the condition is handed to ``torch._assert_async``: on a GPU it is queued on the stream (no host
  synchronization; a bad value fails the stream with a device-side assert, and the message where
  the backend carries one); on CPU it is checked at once, and a failure is reported as a
  ``ValueError`` naming the first bad value and its position (host memory: no synchronization);
- under ``torch.compile`` the same ``_assert_async`` is traced into the graph.

``FASTPO_CHECK_LABELS=0`` turns the label check off (the Triton kernels then read NaN, never
memory past a row, for a label outside the vocabulary).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("sum", "mean")


def check_temperature(temperature: float) -> None:
    """One rule for every backend and op: a finite real number > 0 (not a bool, str or tensor)."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or isinstance(temperature, torch.Tensor)):
        raise ValueError(f"temperature must be > 0 and finite (a float), got {temperature!r} of "
                         f"type {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")


def check_reduction(reduction: str) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def check_ignore_index(ignore_index: int) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r} of type "
                        f"{type(ignore_index).__name__}")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, *,
                        name: str = "logits") -> None:
    """Metadata checks: logits ``[N, V]`` or ``[B, T, V]`` floating, labels integer of the leading
    shape on the same device."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() not in (2, 3):
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


def _assert_none(bad: torch.Tensor, message: str, describe: Callable[[], str]) -> None:
    """No element of ``bad`` is True, checked with ``torch._assert_async``: queued on a device
    (no host synchronization), immediate on CPU, where a failure becomes ``ValueError(describe())``
    (which may then read the values: they are in host memory already)."""
    ok = ~bad.any()
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        try:
            torch._assert_async(ok, message)
        except RuntimeError:
            raise ValueError(describe()) from None
    else:
        torch._assert_async(ok, message)


def _first(bad: torch.Tensor, values: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
    """(position, value, count) of the first True of ``bad`` (host tensors only)."""
    where = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return where, int(values[where]), int(bad.sum())


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in ``[0, vocab)`` or equals ``ignore_index``; else say where it is not.

    No host synchronization on a device (see the module docstring).
    """
    if os.environ.get("FASTPO_CHECK_LABELS", "1") == "0" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))

    def describe() -> str:
        where, value, count = _first(bad, labels)
        return (f"label {value} at position {where} is outside [0, {vocab}) and is not "
                f"ignore_index={ignore_index} ({count} such label{'s' if count > 1 else ''})")

    _assert_none(bad, f"fastpo: a label is outside [0, {vocab}) and is not "
                      f"ignore_index={ignore_index}", describe)


def check_num_sequences(num_sequences: int) -> None:
    if (isinstance(num_sequences, bool) or not isinstance(num_sequences, numbers.Integral)
            or num_sequences < 0):
        raise ValueError(f"num_sequences must be an int >= 0, got {num_sequences!r}")


def check_sequence_ids(sequence_ids: torch.Tensor, num_sequences: int | None) -> None:
    """Packed ids are ``-1`` (no sequence) or in ``[0, num_sequences)``; else say where not.

    With ``num_sequences=None`` only ids below -1 are wrong (the count is then read from the ids).
    No host synchronization on a device (see the module docstring).
    """
    if not isinstance(sequence_ids, torch.Tensor):
        raise TypeError(f"sequence_ids must be a tensor, got {type(sequence_ids).__name__}")
    if sequence_ids.dtype.is_floating_point or sequence_ids.dtype.is_complex \
            or sequence_ids.dtype == torch.bool:
        raise TypeError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
    if num_sequences is not None:
        check_num_sequences(num_sequences)
    if sequence_ids.numel() == 0:
        return
    bad = sequence_ids < -1
    if num_sequences is not None:
        bad = bad | (sequence_ids >= num_sequences)
    upper = "num_sequences" if num_sequences is None else f"num_sequences={num_sequences}"

    def describe() -> str:
        where, value, count = _first(bad, sequence_ids)
        return (f"sequence_ids {value} at position {where} is outside [-1, {upper}) ({count} such "
                f"id{'s' if count > 1 else ''}): -1 marks a token of no sequence, "
                "0..num_sequences-1 the sequences")

    _assert_none(bad, f"fastpo: a sequence_ids entry is outside [-1, {upper})", describe)
