"""Reference-free pairwise losses with TRL's CPO and ORPO semantics (SimPO, AlphaPO included).

Inputs are summed completion log-probs ``[B]`` and completion token counts ``[B]``; the
per-token averages, the NLL term and the metrics are formed here. See ``pairwise`` for
the formulas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import pairwise as pl
from .inputs import (
    PreferenceLossOutput,
    check_logits_inputs,
    check_logps,
    check_num_tokens,
    check_weight,
    compute_dtype,
)
from .metrics import preference_output

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def _check_inputs(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    **stats: Any,
) -> tuple[torch.dtype, dict[str, Any]]:
    """Check the shared inputs of CPO and ORPO. Returns the dtype the loss is computed in and
    ``stats`` (token counts, logit sums, vocab size) as :func:`preference_output` takes them."""
    like = check_logps("policy_chosen_logps", policy_chosen_logps)
    check_logps("policy_rejected_logps", policy_rejected_logps, like=like)
    check_num_tokens("chosen_num_tokens", stats["chosen_num_tokens"], like=like)
    check_num_tokens("rejected_num_tokens", stats["rejected_num_tokens"], like=like)
    check_logits_inputs(like, stats["chosen_logits_sum"], stats["rejected_logits_sum"],
                        stats["vocab_size"], True)
    return compute_dtype(policy_chosen_logps, policy_rejected_logps), stats


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    chosen_logits_sum: Tensor | None = None,
    rejected_logits_sum: Tensor | None = None,
    vocab_size: int | None = None,
) -> PreferenceLossOutput:
    """Reference-free CPO family (TRL ``CPOTrainer`` semantics): mean_b ℓ[b] + cpo_alpha · NLL.

    CPO (Xu et al., 2024, "Contrastive Preference Optimization", arXiv:2401.08417) uses
    r = π (summed log-probs) in ``sigmoid`` (smoothed by ε) or ``hinge``; ``ipo`` and ``simpo``
    use r = π/|y|. ``simpo`` is −log σ(β(r_c − r_r) − γ) (SimPO: set ``cpo_alpha=0``);
    ``alphapo`` is ``simpo`` with ``cpo_alpha`` forced to 0, as in TRL. With ``alpha ≠ 0`` every
    type first maps r to the AlphaPO reward (1 − e^(−α r))/α. NLL is per chosen token.
    Rewards are β · r; ``logps/*`` report r before the AlphaPO map.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; valid loss types are {list(CPO_LOSS_TYPES)}"
        )
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    pl.check_beta(beta)
    pl.check_label_smoothing(label_smoothing)
    cpo_alpha = check_weight("cpo_alpha", cpo_alpha)
    dtype, stats = _check_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens, chosen_logits_sum=chosen_logits_sum,
        rejected_logits_sum=rejected_logits_sum, vocab_size=vocab_size)
    chosen_full, rejected_full = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    n_chosen, n_rejected = chosen_num_tokens.to(dtype), rejected_num_tokens.to(dtype)
    if loss_type in ("ipo", "simpo"):
        chosen, rejected = (
            pl.per_token(chosen_full, n_chosen),
            pl.per_token(rejected_full, n_rejected),
        )
    else:
        chosen, rejected = chosen_full, rejected_full
    chosen_r = pl.alphapo_rewards(chosen, alpha=alpha)
    rejected_r = pl.alphapo_rewards(rejected, alpha=alpha)
    if loss_type == "sigmoid":
        losses = pl.sigmoid_loss(chosen_r, rejected_r, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "hinge":
        losses = pl.hinge_loss(chosen_r, rejected_r, beta=beta)
    elif loss_type == "ipo":
        losses = pl.ipo_loss(chosen_r, rejected_r, beta=beta)
    else:
        losses = pl.simpo_loss(
            chosen_r, rejected_r, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing
        )
    nll = pl.nll_loss(chosen_full, chosen_num_tokens=n_chosen)
    if cpo_alpha:
        losses = losses + cpo_alpha * nll
    return preference_output(
        losses,
        chosen_rewards=beta * chosen_r,
        rejected_rewards=beta * rejected_r,
        chosen_logps=chosen,
        rejected_logps=rejected,
        nll=nll[0],
        **stats,
    )


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
    beta: float = 0.1,
    chosen_logits_sum: Tensor | None = None,
    rejected_logits_sum: Tensor | None = None,
    vocab_size: int | None = None,
) -> PreferenceLossOutput:
    """ORPO (Hong et al., 2024, arXiv:2403.07691, Eq. 6): NLL − λ · mean_b log σ(L[b]), with L
    the log odds ratio of the length-averaged log-probs (``pairwise.odds_ratio_loss``)
    and λ = ``beta`` (TRL's name). Rewards are β · π/|y|; metrics add ``log_odds_ratio``
    (mean log σ(L)) and ``log_odds_chosen`` (mean L), as TRL names them.
    """
    pl.check_beta(beta)
    dtype, stats = _check_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens, chosen_logits_sum=chosen_logits_sum,
        rejected_logits_sum=rejected_logits_sum, vocab_size=vocab_size)
    chosen_full = policy_chosen_logps.to(dtype)
    n_chosen = chosen_num_tokens.to(dtype)
    chosen = pl.per_token(chosen_full, n_chosen)
    rejected = pl.per_token(policy_rejected_logps.to(dtype), rejected_num_tokens.to(dtype))
    ratio_loss, log_odds = pl.odds_ratio_loss(chosen, rejected)
    nll = pl.nll_loss(chosen_full, chosen_num_tokens=n_chosen)
    output = preference_output(
        nll + beta * ratio_loss,
        chosen_rewards=beta * chosen,
        rejected_rewards=beta * rejected,
        chosen_logps=chosen,
        rejected_logps=rejected,
        nll=nll[0],
        **stats,
    )
    output.metrics["log_odds_ratio"] = (-ratio_loss).detach().mean()
    output.metrics["log_odds_chosen"] = log_odds.detach().mean()
    return output
