"""A head's raw logits to the logits its softmax sees, which scale and soft-cap a model's config
asks for, and ``log Σ p²`` of that softmax: written once for the engine's forward and the
integrations (the fused linear kernels apply the same transform inside their tiles).

    z = c·tanh(s·a / c) / T     with a soft-cap c (Gemma-2's ``final_logit_softcapping``)
    z = s·a / T                 without one (s: Cohere's ``logit_scale``, T: the temperature)
    log Σ_v softmax(z)_v² = logsumexp(2z) − 2·logsumexp(z)     (WPO's weights, TRL's statistic)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# config attribute -> how it scales the logits (multiply by the value, or divide by it); the first
# one a config sets counts (Cohere's logit_scale, Granite's logits_scaling, ...)
LOGIT_SCALES = {"logit_scale": "multiply", "output_multiplier": "multiply",
                "lm_head_multiplier": "multiply", "logits_scaling": "divide"}


def config_logit_transform(config: object, owner: str = "the model") -> tuple[float, float | None]:
    """(logit scale, soft-cap or None) that a model with ``config`` applies to its head's
    logits: a scale from :data:`LOGIT_SCALES`, then Gemma-2's ``final_logit_softcapping`` (0 or
    None: no cap). A multimodal config is read through its text config. A value that is not a
    finite number > 0 is a ValueError naming ``owner`` and the attribute."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def checked(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{owner}: config.{name}={value!r} is not a finite number > 0")
        return float(value)

    scale = 1.0
    for name, how in LOGIT_SCALES.items():
        value = getattr(config, name, None)
        if value is not None:
            value = checked(name, value)
            scale = value if how == "multiply" else 1.0 / value
            break
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (checked("final_logit_softcapping", cap) if cap else None)


def transform_logits(logits: Tensor, *, logit_scale: float = 1.0, softcap: float | None = None,
                     temperature: float = 1.0) -> Tensor:
    """``z`` of the raw ``logits`` (any shape, in their own dtype): scaled by ``logit_scale``,
    soft-capped by ``softcap`` (None: no cap), divided by ``temperature``."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature if temperature != 1.0 else logits


def log_sum_sq_probs(z: Tensor, lse: Tensor | None = None) -> Tensor:
    """Per row of ``z`` (last dimension the vocabulary), ``log Σ_v softmax(z)_v²``; ``lse``: the
    rows' ``logsumexp(z)`` when the caller already has it."""
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return torch.logsumexp(2 * z, dim=-1) - 2 * lse
