"""The inputs of the preference-loss fronts: their checks, the per-sequence statistics that come
with a batch of pairs (``PairStats``), the compute dtype, and the output type.

Checks read only metadata (dtype, shape, device) and Python numbers, never tensor values, so
they cost no device synchronization. Two value conditions are therefore the caller's to keep:
log-probabilities are <= 0 (a sum of token log-probs; a positive value is not a probability and
gives finite but meaningless rewards) and token counts are >= 0 (a negative count flips the sign
of a length-normalised reward). fastpo's own pipeline produces them so (``forward_logps``,
``collate_batch``); checking a caller's values would read them on the host at every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype


class PreferenceLossOutput(NamedTuple):
    """``loss`` is the scalar to backpropagate, equal to ``losses.mean()``; ``losses`` holds the
    weighted per-pair losses ``[B]``; the rewards ``[B]`` and the metrics are detached."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class PairStats:
    """Per-sequence statistics of a batch of pairs beyond the summed log-probs, each ``[B]``
    (None: not computed). Which ones a loss needs is the loss's to say; the fronts check them.

    num_tokens        completion token counts (ipo, sigmoid_norm, sft, WPO, CPO, ORPO, logits/*)
    *_tail_logps      LD-DPO: the part of each summed log-prob beyond the pair's shared length
                      (``weighting.shared_length_tail_logps``)
    log_sum_sq_probs  WPO: Σ_t log Σ_v π(v|·)² over the completion tokens
    logits_sum        Σ over the scored tokens and the vocabulary of the logits (``logits/*``,
                      with ``vocab_size``)

    ``chosen_tokens_per_pair`` (0-d, not ``[B]``): the mean chosen completion length that turns
    the NLL term into a per-token mean (``pairwise.nll_loss``); None: the batch's own. A trainer
    passes its optimizer step's, over every micro-batch and rank.
    """

    chosen_num_tokens: Tensor | None = None
    rejected_num_tokens: Tensor | None = None
    policy_chosen_tail_logps: Tensor | None = None
    policy_rejected_tail_logps: Tensor | None = None
    ref_chosen_tail_logps: Tensor | None = None
    ref_rejected_tail_logps: Tensor | None = None
    chosen_log_sum_sq_probs: Tensor | None = None
    rejected_log_sum_sq_probs: Tensor | None = None
    chosen_logits_sum: Tensor | None = None
    rejected_logits_sum: Tensor | None = None
    vocab_size: int | None = None
    chosen_tokens_per_pair: Tensor | None = None

    @property
    def has_num_tokens(self) -> bool:
        return self.chosen_num_tokens is not None and self.rejected_num_tokens is not None

    def check(self, like: Tensor, *, needs_num_tokens: list[str]) -> None:
        """The token counts (required when ``needs_num_tokens`` names a user) and the logit
        sums, against the policy log-probs ``like``."""
        if needs_num_tokens and not self.has_num_tokens:
            raise ValueError(
                f"{needs_num_tokens} need chosen_num_tokens and rejected_num_tokens (completion "
                "token counts per sequence)"
            )
        for name in ("chosen_num_tokens", "rejected_num_tokens"):
            if getattr(self, name) is not None:
                check_num_tokens(name, getattr(self, name), like=like)
        for name in ("chosen_logits_sum", "rejected_logits_sum"):
            if getattr(self, name) is not None:
                check_logps(name, getattr(self, name), like=like)
        per_pair = self.chosen_tokens_per_pair
        if per_pair is not None and (not isinstance(per_pair, Tensor) or per_pair.dim() != 0
                                     or not per_pair.is_floating_point()):
            raise ValueError("chosen_tokens_per_pair must be a 0-d floating tensor (the mean "
                             f"chosen length), got {_describe(per_pair)}")
        if self.chosen_logits_sum is None and self.rejected_logits_sum is None:
            return
        check_vocab_size(self.vocab_size)
        if not self.has_num_tokens:
            raise ValueError("the logits/* metrics need chosen_num_tokens and rejected_num_tokens")

    def require(self, names: tuple[str, ...], like: Tensor, *, needed_by: str) -> None:
        """The log-prob-like statistics ``names`` are all given and fit ``like``; the error for
        missing ones is ``needed_by`` followed by their names."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{needed_by} {missing}")
        for name in names:
            check_logps(name, getattr(self, name), like=like)


# ----------------------------------------------------------------------------------------------
# knobs (Python numbers)
# ----------------------------------------------------------------------------------------------
def check_beta(beta: float) -> None:
    check_positive("beta", beta)


def check_label_smoothing(label_smoothing: float) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def check_unit_interval(name: str, value: float) -> None:
    """``value`` is a Python number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_positive(name: str, value: float) -> None:
    """``value`` is a finite Python number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_weight(name: str, value: object) -> float:
    """``value`` is a finite Python number; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def check_vocab_size(vocab_size: object) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(
            f"the logits/* metrics need vocab_size, a positive int, with the logit sums; "
            f"got {vocab_size!r}"
        )


# ----------------------------------------------------------------------------------------------
# tensors (metadata only)
# ----------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COUNT_DTYPES = (torch.int32, torch.int64, *_FLOAT_DTYPES)


def check_logps(name: str, value: object, *, like: Tensor | None = None) -> Tensor:
    """``value`` is a 1-D floating tensor (shaped and placed like ``like`` when given); its
    values (<= 0 for log-probs) are not read: see the module docstring."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    _check_like(name, value, like)
    return value


def check_num_tokens(name: str, value: object, *, like: Tensor) -> Tensor:
    """``value`` is an integer or floating tensor of the shape of ``like``; its values (>= 0)
    are not read: see the module docstring."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in _COUNT_DTYPES:
        raise TypeError(f"{name} must be an integer or floating tensor, got {value.dtype}")
    _check_like(name, value, like)
    return value


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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


# ----------------------------------------------------------------------------------------------
# dtypes: the kernels' accumulation dtype (float32, float64 when an input is float64)
# ----------------------------------------------------------------------------------------------
def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in its accumulation dtype: half precision is upcast to float32, float32 and float64
    are kept."""
    return x.to(accumulation_dtype(x))


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
