"""Validation of the fused-linear preference losses' arguments (metadata and Python values only).

The losses are in ``fused_linear``, their module forms in ``modules``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastpo.kernels.linear_logprobs_cost import LOSS_FUSED, best_plan, predict
from fastpo.kernels.linear_logprobs_roofline import Shape, device_spec
from fastpo.kernels.zero3 import full_shape

from . import pairwise as pl
from .options import DPOOptions

CPO_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# How a loss reaches the hidden states: "loss-fused" (every gradient made in the forward by the
# loss-fused design, where the loss is a sum over pairs), "logps" (per-sequence log-probs from the
# fused linear op, autograd through the loss) or "auto" (loss-fused wherever it applies).
DESIGNS = ("auto", "loss-fused", "logps")


def check_common(*, ignore_index: int, beta: float, compiled: bool, chunk_size: int,
                 **flags: bool) -> None:
    """The options every loss shares; ``flags`` are further bool options by name."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    pl.check_beta(beta)
    for name, value in {"compiled": compiled, **flags}.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def dpo_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None,
                   label_smoothing: float, average_log_prob: bool,
                   ) -> tuple[list[str], list[float]]:
    """Validated DPO loss types and their weights (the rules of :class:`.options.DPOOptions`),
    and the one rule of the hidden-state form: ``sft`` needs summed log-probs."""
    options = DPOOptions(loss_type=loss_type, loss_weights=loss_weights,
                         label_smoothing=label_smoothing)
    types = list(options.loss_type)
    if "sft" in types and average_log_prob:
        raise ValueError("loss_type 'sft' is the NLL of the summed log-probs and is not defined "
                         "with average_log_prob=True; use compute_nll_loss=True with alpha")
    return types, list(options.weights)


def check_batch(_input: object, target: object, *, paired: bool, name: str = "_input",
                target_name: str = "target") -> None:
    """``_input [rows, T, H]`` and ``target [rows, T]`` tensors, rows > 0 (even when paired)."""
    if not isinstance(_input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name} and {target_name} must be tensors, got "
                        f"{type(_input).__name__} and {type(target).__name__}")
    rows = "2B" if paired else "N"
    if _input.dim() != 3:
        raise ValueError(f"{name} must have shape [{rows}, T, H], got {tuple(_input.shape)}")
    if tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"{target_name} shape {tuple(target.shape)} does not match {name} shape "
                         f"{tuple(_input.shape)}: expected {tuple(_input.shape[:2])}")
    if _input.shape[0] == 0:
        raise ValueError(f"{name} is empty: a batch needs at least one sequence")
    if paired and _input.shape[0] % 2:
        raise ValueError(f"{name} has {_input.shape[0]} rows: a paired loss needs 2B rows, the B "
                         "chosen completions first, then the B rejected ones")


def check_ref_logps(name: str, value: object, rows: int, like: Tensor) -> Tensor:
    """Precomputed reference log-probs: a floating ``[rows]`` tensor on ``like``'s device;
    returned detached."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but _input on {like.device}")
    return value.detach()


def check_design(design: object, blocker: str | None, *, hidden: Tensor, weight: Tensor,
                 rows_per_unit: int) -> bool:
    """Whether to take the loss-fused design: ``design`` from ``DESIGNS``; ``blocker`` says why
    this call's loss does not decompose over pairs (None: it does). ``"auto"`` asks
    :func:`prefer_loss_fused` with this call's shape: ``hidden [rows, T, H]``, ``weight [V, H]``,
    ``rows_per_unit`` rows per indivisible piece (2 for a pair, 1 for KTO's examples)."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if design == "loss-fused" and blocker is not None:
        raise ValueError(f"design='loss-fused' needs a loss that is a sum over pairs, but "
                         f"{blocker}; use design='logps' or 'auto'")
    if design != "auto" or blocker is not None:
        return design == "loss-fused"
    rows, length, size = hidden.shape
    shape = Shape(tokens=rows * length, hidden=size, vocab=full_shape(weight)[0],
                  dtype_bytes=hidden.element_size(), unit_tokens=rows_per_unit * length)
    name = torch.cuda.get_device_name(hidden.device) if hidden.is_cuda else None
    return prefer_loss_fused(shape, hidden.device.type, name)


def prefer_loss_fused(shape: Shape, device_type: str, device_name: str | None) -> bool:
    """``design="auto"``: the loss-fused design where the roofline model of
    ``kernels/linear_logprobs_cost.py`` predicts its forward + backward faster than the op's best
    plan (tile / gemm) plus the loss; on CUDA only. On CPU the op's chunked path wins (measured,
    benchmarks/RESULTS.md: B8×T512×V49152 fp32, 3.8 s / 132 MB against 4.7 s / 1,662 MB)."""
    if device_type != "cuda":
        return False
    spec = device_spec(device_name)
    fused = predict(LOSS_FUSED, "fwd+bwd", shape, spec).time_s
    return fused < best_plan(shape, spec)[2].time_s


def check_preference_labels(preference_labels: object, like: Tensor) -> None:
    """KTO's labels: a bool ``[N]`` tensor, one per row of ``like``, on its device."""
    if not isinstance(preference_labels, Tensor) or preference_labels.dtype != torch.bool:
        got = preference_labels.dtype if isinstance(preference_labels, Tensor) else type(
            preference_labels).__name__
        raise TypeError(f"preference_labels must be a bool tensor [N], got {got}")
    if tuple(preference_labels.shape) != (like.shape[0],):
        raise ValueError(f"preference_labels must have shape ({like.shape[0]},), one label per "
                         f"row of _input, got {tuple(preference_labels.shape)}")
    if preference_labels.device != like.device:
        raise ValueError(f"preference_labels is on {preference_labels.device} but _input on "
                         f"{like.device}")


def check_kl(kl: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    """KTO's KL reference point as a detached 0-d tensor on ``device`` (``dtype`` for a float;
    0 for None)."""
    if kl is None:
        return torch.zeros((), dtype=dtype, device=device)
    if isinstance(kl, (int, float)) and not isinstance(kl, bool):
        return torch.tensor(float(kl), dtype=dtype, device=device)
    if not isinstance(kl, Tensor) or kl.numel() != 1 or not kl.is_floating_point():
        raise ValueError(f"kl must be a float or a one-element floating tensor (the KL reference "
                         f"point), got {kl!r}")
    return kl.detach().reshape(()).to(device)
