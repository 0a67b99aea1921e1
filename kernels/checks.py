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
LINEAR_DESIGNS = ("auto", "gemm", "tile")


def check_temperature(temperature: float) -> None:
    """One rule for every backend and op: a finite real number > 0 (not a bool, str or tensor)."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or isinstance(temperature, torch.Tensor)):
        raise ValueError(f"temperature must be > 0 and finite (a float), got {temperature!r} of "
                         f"type {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")


def check_reduction(reduction: str) -> None:
    """A per-sequence reduction: ``"sum"`` or ``"mean"``."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS} "
                         "(per-token values: token_logps / linear_token_logps)")


def check_ignore_index(ignore_index: int) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r} of type "
                        f"{type(ignore_index).__name__}")


def check_tensors(*, optional: tuple[str, ...] = (), **named: object) -> None:
    """Every named value is a tensor; those named in ``optional`` may also be None."""
    required = {k: v for k, v in named.items() if k not in optional}
    if not all(isinstance(v, torch.Tensor) for v in required.values()):
        names, kinds = list(required), [type(v).__name__ for v in required.values()]
        if len(names) == 1:
            raise TypeError(f"{names[0]} must be a tensor, got {kinds[0]}")
        raise TypeError(f"{_join(names)} must be tensors, got {_join(kinds)}")
    for name in optional:
        value = named.get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got "
                        f"{tensor.dtype}")


def check_label_dtype(labels: torch.Tensor) -> None:
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")


def check_dims(name: str, tensor: torch.Tensor, dims: tuple[int, ...], layout: str) -> None:
    """``tensor.dim()`` is one of ``dims``; ``layout`` names the expected shape in the error."""
    if tensor.dim() not in dims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def check_vocab(name: str, vocab: int) -> None:
    if vocab == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_same_device(anchor_name: str, anchor: torch.Tensor, **named: torch.Tensor | None
                      ) -> None:
    """Every named tensor (None skipped) is on ``anchor``'s device."""
    for name, tensor in named.items():
        if tensor is not None and tensor.device != anchor.device:
            raise ValueError(f"{name} is on {tensor.device} but {anchor_name} is on "
                             f"{anchor.device}")


def check_labels_match(labels: torch.Tensor, inputs: torch.Tensor, *, name: str) -> None:
    """``labels`` have the leading shape of ``inputs`` (``[..., V]`` logits or ``[..., H]``
    hidden states) and live on the same device."""
    if tuple(labels.shape) != tuple(inputs.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape "
            f"{tuple(inputs.shape)}: expected labels of shape {tuple(inputs.shape[:-1])}"
        )
    check_same_device(name, inputs, labels=labels)


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, *,
                        name: str = "logits") -> None:
    """Metadata checks: logits ``[N, V]`` or ``[B, T, V]`` floating, labels integer of the leading
    shape on the same device."""
    check_tensors(**{name: logits, "labels": labels})
    check_float_dtype(name, logits)
    check_label_dtype(labels)
    check_dims(name, logits, (2, 3), "[N, V] or [B, T, V]")
    check_labels_match(labels, logits, name=name)
    check_vocab(name, logits.shape[-1])


def _check_positive(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float{' or None' if optional else ''}, "
                        f"got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}"
                         + (" (None: no soft-cap)" if optional else ""))


def check_logit_transform(logit_scale: float, softcap: float | None) -> None:
    """``logit_scale`` a finite number > 0; ``softcap`` None or a finite number > 0."""
    _check_positive("logit_scale", logit_scale)
    _check_positive("softcap", softcap, optional=True)


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """Metadata checks of the fused linear op: :func:`check_linear_head`, and labels integer of
    hidden's leading shape on its device."""
    check_tensors(hidden=hidden, weight=weight, labels=labels, bias=bias, optional=("bias",))
    check_label_dtype(labels)
    check_linear_head(hidden, weight, bias)
    check_labels_match(labels, hidden, name="hidden")


def check_linear_head(hidden: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> None:
    """hidden ``[N, H]`` or ``[B, T, H]``, weight ``[V, H]``, bias ``[V]`` or None, all floating
    and on hidden's device."""
    check_tensors(hidden=hidden, weight=weight, bias=bias, optional=("bias",))
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_float_dtype(name, tensor)
    check_dims("hidden", hidden, (2, 3), "[N, H] or [B, T, H]")
    check_dims("weight", weight, (2,), "[V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)}: expected weight of shape [V, {hidden.shape[-1]}]"
                         " (a ZeRO-3 partitioned weight must be gathered first: "
                         "fastpo.kernels.zero3.gathered_lm_head)")
    check_vocab("weight", weight.shape[0])
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight shape "
                         f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")
    check_same_device("hidden", hidden, weight=weight, bias=bias)


def check_linear_options(*, logit_scale: float, softcap: float | None, chunk_tokens: int,
                         chunk_vocab: int, design: str, deterministic: bool,
                         num_scored: int | None, num_labels: int) -> None:
    """The knobs of the fused linear op (see ``linear_token_logps``): the logit transform
    (``logit_scale`` finite > 0, ``softcap`` None or finite > 0), tile sizes (ints >= 0, 0 =
    automatic), ``design``, ``deterministic`` and the ``num_scored`` hint (None or an int in
    ``[0, num_labels]``)."""
    check_logit_transform(logit_scale, softcap)
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = automatic), got {value!r}")
    if design not in LINEAR_DESIGNS:
        raise ValueError(f"unknown design {design!r}; expected one of {LINEAR_DESIGNS}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if design == "tile" and deterministic:
        raise ValueError("design='tile' adds gradient shares with atomics and cannot be "
                         "deterministic; use design='gemm' or 'auto' with deterministic=True")
    if num_scored is not None and (not isinstance(num_scored, int) or isinstance(num_scored, bool)
                                   or not 0 <= num_scored <= num_labels):
        raise ValueError(f"num_scored must be None or an int in [0, {num_labels}] (the "
                         f"number of labels that are not ignore_index), got {num_scored!r}")


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


def check_num_scored(labels: torch.Tensor, ignore_index: int, num_scored: int | None) -> None:
    """The count of labels that are not ``ignore_index`` equals the caller's host-side hint
    ``num_scored`` (None or -1: no hint, nothing to check). No host synchronization on a device
    (see the module docstring)."""
    if num_scored is None or num_scored < 0:
        return
    count = (labels != ignore_index).sum()

    def describe() -> str:  # CPU only: the count is in host memory
        return (f"num_scored={num_scored} does not match the labels: {int(count)} of "
                f"{labels.numel()} labels are scored (not ignore_index={ignore_index})")

    _assert_none(count != num_scored,
                 f"fastpo: num_scored={num_scored} does not match the number of labels "
                 f"that are not ignore_index={ignore_index}", describe)


def check_num_sequences(num_sequences: int) -> None:
    if (isinstance(num_sequences, bool) or not isinstance(num_sequences, numbers.Integral)
            or num_sequences < 0):
        raise ValueError(f"num_sequences must be an int >= 0, got {num_sequences!r}")


def check_sequence_ids_layout(sequence_ids: torch.Tensor, labels: torch.Tensor, *,
                              name: str = "labels") -> None:
    """Packed ids: an integer tensor of the shape of ``labels`` (or of the per-token values named
    ``name``), on their device (metadata only)."""
    check_tensors(sequence_ids=sequence_ids)
    if sequence_ids.dtype.is_floating_point or sequence_ids.dtype.is_complex \
            or sequence_ids.dtype == torch.bool:
        raise TypeError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
    if tuple(sequence_ids.shape) != tuple(labels.shape):
        raise ValueError(f"sequence_ids shape {tuple(sequence_ids.shape)} does not match {name} "
                         f"shape {tuple(labels.shape)}")
    check_same_device(name, labels, sequence_ids=sequence_ids)


def check_sequence_ids(sequence_ids: torch.Tensor, num_sequences: int | None) -> None:
    """Packed ids are ``-1`` (no sequence) or in ``[0, num_sequences)``; else say where not.

    With ``num_sequences=None`` only ids below -1 are wrong (the count is then read from the ids).
    No host synchronization on a device (see the module docstring). The layout (an integer tensor
    of the labels' shape) is :func:`check_sequence_ids_layout`'s.
    """
    check_tensors(sequence_ids=sequence_ids)
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
