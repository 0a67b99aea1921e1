"""The patched forward's two ways from hidden states to log-probs, and the choice between them.

- the fused linear path: the lm_head weight goes to :func:`fastpo.kernels.linear_token_logps`
  (with TRL's temperature, logit scale and soft-cap), gathered under ZeRO-3; the ``[tokens,
  vocab]`` logits never exist;
- the logits path: the head module runs on the scored positions only and
  :func:`fastpo.kernels.token_logps` takes its logits (quantized or wrapped heads, FSDP2).

:func:`choose_path` says which one a head takes, and why when it is not the fused one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastpo.kernels import linear_token_logps, token_logps
from fastpo.kernels.linear_logprobs_stats import linear_token_logps_with_statistics
from fastpo.kernels.logit_transform import transform_logits
from fastpo.kernels.zero3 import gathered_lm_head

from .head_statistics import STATISTICS, head_statistics, scatter_scored

IGNORE_INDEX = -100


@dataclass
class HeadSettings:
    """How TRL's fused head turns hidden states into logits, read from the forward it installed."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    cast_lm_head_to_fp32: bool = False
    outputs: frozenset[str] = frozenset({"log_probs"})
    backbone_attr: str = "base_model"


def settings_from(closure: dict[str, Any]) -> HeadSettings:
    """The head settings in the closure of TRL's fused forward (``fused_head_closure`` has
    checked that every one is there, so no default stands in for a missing one)."""
    softcap = closure["final_logit_softcapping"]
    logit_scale = closure["logit_scale"]  # TRL keeps a real 0.0; None means unscaled
    return HeadSettings(
        temperature=float(closure["temperature"]),
        logit_scale=1.0 if logit_scale is None else float(logit_scale),
        softcap=float(softcap) if softcap else None,
        cast_lm_head_to_fp32=bool(closure["cast_lm_head_to_fp32"]),
        outputs=frozenset(closure["outputs"]),
        backbone_attr=str(closure["backbone_attr"]),
    )


# --------------------------------------------------------------------------- the lm_head


def choose_path(head: torch.nn.Module, settings: HeadSettings, fused_linear: bool | None
                 ) -> tuple[str, str]:
    """("linear" | "logits", why) for this head and these settings."""
    weight = getattr(head, "weight", None)
    reasons = []
    if type(head) is not torch.nn.Linear or not isinstance(weight, Tensor):
        reasons.append(f"the lm_head is a {type(head).__name__}, not a plain torch.nn.Linear")
    elif not weight.is_floating_point():
        reasons.append(f"the lm_head weight is {weight.dtype}")
    elif _is_dtensor(weight):
        reasons.append("the lm_head weight is a sharded DTensor (FSDP2)")
    if settings.logit_scale <= 0:
        reasons.append(f"logit scale {settings.logit_scale} is not positive")
    if fused_linear is False:
        return "logits", "fused_linear=False"
    if reasons:
        if fused_linear:
            raise ValueError("fused_linear=True but the fused linear path cannot run: "
                             + "; ".join(reasons))
        return "logits", "; ".join(reasons)
    return "linear", ""


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _compute_dtype(hidden: Tensor, settings: HeadSettings) -> torch.dtype:
    if settings.cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def linear_path(head: torch.nn.Linear, hidden: Tensor, labels: Tensor, mask: Tensor,
                 settings: HeadSettings) -> tuple[Tensor, dict[str, Tensor]]:
    dtype = _compute_dtype(hidden, settings)
    # like nn.Linear under autocast, the head runs in the compute dtype (fp32 accumulation);
    # under ZeRO-3 the weight is gathered for the op and its gradient reaches the shards
    with gathered_lm_head(head) as (weight, bias), \
            torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        options = {"bias": b, "ignore_index": IGNORE_INDEX, "temperature": settings.temperature,
                   "logit_scale": settings.logit_scale, "softcap": settings.softcap}
        wanted = settings.outputs & set(STATISTICS)
        if not wanted:
            return linear_token_logps(hidden.to(dtype), w, labels, **options).float(), {}
        # the statistics come from the op's own pass over the vocabulary: no second V×H pass
        log_probs, scored = linear_token_logps_with_statistics(hidden.to(dtype), w, labels,
                                                               **options)
    stats = {k: getattr(scored, k) if k == "is_top1" else getattr(scored, k).float()
             for k in wanted}
    return log_probs.float(), stats


def logits_path(head: torch.nn.Module, hidden: Tensor, labels: Tensor, mask: Tensor,
                 settings: HeadSettings) -> tuple[Tensor, dict[str, Tensor]]:
    h = hidden[mask]
    # the head module itself runs (quantized heads, FSDP/ZeRO-3 gathering hooks), on the
    # scored positions only; cast_lm_head_to_fp32 runs a plain linear head in fp32
    if settings.cast_lm_head_to_fp32 and type(head) is torch.nn.Linear:
        with torch.autocast(hidden.device.type, enabled=False):
            logits = torch.nn.functional.linear(
                h.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    else:
        logits = head(h)
    z = transform_logits(logits, logit_scale=settings.logit_scale, softcap=settings.softcap,
                         temperature=1.0)
    scored_labels = labels[mask]
    per_token = token_logps(z, scored_labels, ignore_index=IGNORE_INDEX,
                            temperature=settings.temperature)
    stats = {}
    wanted = settings.outputs & set(STATISTICS)
    if wanted:
        zd = z.detach()
        scored = head_statistics(lambda s, e: zd[s:e], scored_labels, vocab_size=z.shape[-1],
                                 which=wanted,
                                 transform=lambda t: t / settings.temperature)
        stats = {k: scatter_scored(v, mask) for k, v in scored.items()}
    return scatter_scored(per_token.float(), mask), stats


# --------------------------------------------------------------------------- the patched forward
