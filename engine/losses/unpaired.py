"""Unpaired preference losses (KTO): each example is one completion labelled desirable or not.

Notation: ρ = π_θ − π_ref per example (summed completion log-probs), z₀ the KL reference point,
λ_D / λ_U the desirable / undesirable weights. No function reads a tensor on the host: the
desirable/undesirable split is a mask, not an index, so mixed batches need no synchronization.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype

from . import pairwise as pl
from .inputs import at_least_fp32, check_beta, check_logps, check_num_tokens, check_vocab_size
from .metrics import unpaired_metrics
from .options import KTOOptions, fold_keywords, no_keywords_left


class KTOLossOutput(NamedTuple):
    """``loss`` = ``losses.mean()`` over all examples; ``losses`` and ``rewards`` (β · ρ,
    detached) are ``[N]``; ``kl`` is the clamped reference point used (0 for
    ``apo_zero_unpaired``)."""

    loss: Tensor
    losses: Tensor
    rewards: Tensor
    kl: Tensor
    metrics: dict[str, Tensor]


def kl_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's z₀ estimate before clamping: mean over the batch of π_θ(y'|x) − π_ref(y'|x) on
    mismatched prompt/completion pairs (x, y'), detached. Average it across ranks (all-reduce)
    before passing it to ``kto_loss(kl=...)`` to match a multi-device estimate."""
    return (at_least_fp32(policy_kl_logps) - at_least_fp32(ref_kl_logps)).mean().detach()


def kto_example_losses(
    logratios: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    kl: Tensor | float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306, Eq. 7), per example:

        desirable     λ_D · (1 − σ(β(ρ − z₀)))
        undesirable   λ_U · (1 − σ(β(z₀ − ρ)))

    ``kl`` is z₀ (already clamped at 0; it carries no gradient).
    """
    check_beta(beta)
    logratios = at_least_fp32(logratios)
    if isinstance(kl, Tensor):
        kl = kl.detach().to(logratios.dtype)
    desirable_loss = desirable_weight * torch.sigmoid(-beta * (logratios - kl))
    undesirable_loss = undesirable_weight * torch.sigmoid(-beta * (kl - logratios))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def apo_zero_unpaired_example_losses(
    logratios: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """APO-zero, unpaired (D'Oosterlinck et al., 2024, "Anchored Preference Optimization",
    arXiv:2408.06266, Eq. 7 per example): desirable λ_D · (1 − σ(βρ)), undesirable
    λ_U · σ(βρ)."""
    check_beta(beta)
    logratios = at_least_fp32(logratios)
    desirable_loss = desirable_weight * torch.sigmoid(-beta * logratios)
    undesirable_loss = undesirable_weight * torch.sigmoid(beta * logratios)
    return torch.where(desirable, desirable_loss, undesirable_loss)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    options: KTOOptions | None = None,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    kl: Tensor | None = None,
    num_tokens: Tensor | None = None,
    logits_sum: Tensor | None = None,
    vocab_size: int | None = None,
    **keywords: Any,
) -> KTOLossOutput:
    """Unpaired KTO loss with TRL ``KTOTrainer`` semantics; the mean is over all N examples.

    Args:
        policy_logps, ref_logps: ``[N]`` summed completion log-probs.
        desirable: bool ``[N]``, true for desirable ("chosen") examples.
        options: a ``KTOOptions`` (``loss_type`` ``"kto"`` or ``"apo_zero_unpaired"`` (no
            reference point), ``beta``, ``desirable_weight``, ``undesirable_weight``); its
            fields may also be given as keywords, replacing those of ``options``.
        policy_kl_logps, ref_kl_logps: ``[M]`` log-probs of mismatched prompt/completion pairs;
            z₀ = max(0, mean(policy − ref)). Alternatively ``kl``: the unclamped 0-d estimate,
            e.g. ``kl_reference_point`` averaged across ranks; it is clamped at 0 here. ``kto``
            needs exactly one of the two.
        num_tokens, logits_sum, vocab_size: ``[N]`` counts and logit sums for ``logits/*``.
    """
    keywords = dict(keywords)
    options = fold_keywords(KTOOptions, options, keywords, "options")
    no_keywords_left("kto_loss", keywords)
    beta = options.beta
    policy_logps = check_logps("policy_logps", policy_logps)
    check_logps("ref_logps", ref_logps, like=policy_logps)
    if not isinstance(desirable, Tensor):
        raise TypeError(f"desirable must be a bool tensor, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if desirable.device != policy_logps.device:
        raise ValueError(
            f"desirable is on {desirable.device} but policy_logps on {policy_logps.device}"
        )
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable has shape {tuple(desirable.shape)} but policy_logps has shape "
            f"{tuple(policy_logps.shape)}"
        )

    dtype = accumulation_dtype(policy_logps, ref_logps)
    if options.uses_kl_reference_point:
        from_pairs = policy_kl_logps is not None or ref_kl_logps is not None
        if from_pairs and kl is not None:
            raise ValueError("give either kl or policy_kl_logps/ref_kl_logps, not both")
        if kl is not None:
            if not isinstance(kl, Tensor) or kl.dim() != 0:
                raise ValueError("kl must be a 0-d tensor (the KL reference point estimate)")
            z0 = kl.detach().to(dtype)
        elif policy_kl_logps is not None and ref_kl_logps is not None:
            check_logps("policy_kl_logps", policy_kl_logps)
            check_logps("ref_kl_logps", ref_kl_logps, like=policy_kl_logps)
            z0 = kl_reference_point(policy_kl_logps, ref_kl_logps).to(dtype)
        else:
            raise ValueError(
                "loss_type 'kto' needs the KL reference point: policy_kl_logps and ref_kl_logps "
                "(log-probs of mismatched prompt/completion pairs), or kl"
            )
        z0 = z0.clamp(min=0.0)
    else:
        z0 = torch.zeros((), dtype=dtype, device=policy_logps.device)

    if num_tokens is not None:
        check_num_tokens("num_tokens", num_tokens, like=policy_logps)
    if logits_sum is not None:
        check_logps("logits_sum", logits_sum, like=policy_logps)
        if num_tokens is None:
            raise ValueError("the logits/* metrics need num_tokens with logits_sum")
        check_vocab_size(vocab_size)

    logratios = pl.log_ratios(policy_logps.to(dtype), ref_logps.to(dtype))
    weights = {"desirable_weight": options.desirable_weight,
               "undesirable_weight": options.undesirable_weight}
    if options.uses_kl_reference_point:
        losses = kto_example_losses(logratios, desirable, beta=beta, kl=z0, **weights)
    else:
        losses = apo_zero_unpaired_example_losses(logratios, desirable, beta=beta, **weights)
    rewards = (beta * logratios).detach()
    metrics = unpaired_metrics(
        rewards,
        policy_logps.to(dtype),
        desirable,
        kl=z0,
        logits_sum=None if logits_sum is None else logits_sum.to(dtype),
        num_tokens=num_tokens,
        vocab_size=vocab_size,
    )
    return KTOLossOutput(losses.mean(), losses, rewards, z0, metrics)
