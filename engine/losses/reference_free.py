"""Reference-free pairwise losses with TRL's CPO and ORPO semantics (SimPO, AlphaPO included).

Inputs are summed completion log-probs ``[B]`` and, in ``PairStats``, the completion token
counts ``[B]`` (required) and the logit sums; the per-token averages, the NLL term and the
metrics are formed here. See ``pairwise`` for the formulas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype

from . import pairwise as pl
from .inputs import PairStats, PreferenceLossOutput, check_beta, check_logps
from .metrics import preference_output
from .options import CPOOptions, fold_keywords, no_keywords_left


def _inputs(front: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
            stats: PairStats | None, keywords: dict[str, Any]) -> tuple[torch.dtype, PairStats]:
    """Check the shared inputs of CPO and ORPO (the token counts are required). Returns the
    dtype the loss is computed in and the statistics, ``keywords`` folded in."""
    stats = fold_keywords(PairStats, stats, keywords, "stats")
    no_keywords_left(front, keywords)
    like = check_logps("policy_chosen_logps", policy_chosen_logps)
    check_logps("policy_rejected_logps", policy_rejected_logps, like=like)
    if not stats.has_num_tokens:
        raise TypeError(f"{front} needs chosen_num_tokens and rejected_num_tokens (completion "
                        "token counts per sequence: the per-token averages and the NLL)")
    stats.check(like, needs_num_tokens=[])
    return accumulation_dtype(policy_chosen_logps, policy_rejected_logps), stats


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    options: CPOOptions | None = None,
    stats: PairStats | None = None,
    **keywords: Any,
) -> PreferenceLossOutput:
    """Reference-free CPO family (TRL ``CPOTrainer`` semantics): mean_b ℓ[b] + cpo_alpha · NLL.

    CPO (Xu et al., 2024, "Contrastive Preference Optimization", arXiv:2401.08417) uses
    r = π (summed log-probs) in ``sigmoid`` (smoothed by ε) or ``hinge``; ``ipo`` and ``simpo``
    use r = π/|y|. ``simpo`` is −log σ(β(r_c − r_r) − γ) (SimPO: set ``cpo_alpha=0``);
    ``alphapo`` is ``simpo`` with ``cpo_alpha`` forced to 0, as in TRL. With ``alpha ≠ 0`` every
    type first maps r to the AlphaPO reward (1 − e^(−α r))/α. NLL is per chosen token.
    Rewards are β · r; ``logps/*`` report r before the AlphaPO map.

    ``options``: a ``CPOOptions``; ``stats``: a ``PairStats`` with the token counts (and the
    logit sums for ``logits/*``). Their fields may also be given as keywords (``loss_type``,
    ``beta``, ``chosen_num_tokens``, ...), replacing those of ``options`` / ``stats``.
    """
    keywords = dict(keywords)
    options = fold_keywords(CPOOptions, options, keywords, "options")
    dtype, stats = _inputs("cpo_loss", policy_chosen_logps, policy_rejected_logps, stats, keywords)
    beta, formula = options.beta, options.formula
    chosen_full, rejected_full = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    n_chosen = stats.chosen_num_tokens.to(dtype)
    chosen, rejected = chosen_full, rejected_full
    if formula in ("ipo", "simpo"):
        chosen = pl.per_token(chosen_full, n_chosen)
        rejected = pl.per_token(rejected_full, stats.rejected_num_tokens.to(dtype))
    chosen_r = pl.alphapo_rewards(chosen, alpha=options.alpha)
    rejected_r = pl.alphapo_rewards(rejected, alpha=options.alpha)
    if formula == "sigmoid":
        losses = pl.sigmoid_loss(chosen_r, rejected_r, beta=beta,
                                 label_smoothing=options.label_smoothing)
    elif formula == "hinge":
        losses = pl.hinge_loss(chosen_r, rejected_r, beta=beta)
    elif formula == "ipo":
        losses = pl.ipo_loss(chosen_r, rejected_r, beta=beta)
    else:
        losses = pl.simpo_loss(chosen_r, rejected_r, beta=beta, gamma=options.simpo_gamma,
                               label_smoothing=options.label_smoothing)
    nll = pl.nll_loss(chosen_full, chosen_num_tokens=n_chosen,
                      tokens_per_pair=stats.chosen_tokens_per_pair)
    if options.nll_weight:
        losses = losses + options.nll_weight * nll
    return preference_output(
        losses,
        chosen_rewards=beta * chosen_r,
        rejected_rewards=beta * rejected_r,
        chosen_logps=chosen,
        rejected_logps=rejected,
        stats=stats,
        nll=nll.mean(),
    )


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    stats: PairStats | None = None,
    **keywords: Any,
) -> PreferenceLossOutput:
    """ORPO (Hong et al., 2024, arXiv:2403.07691, Eq. 6): NLL − λ · mean_b log σ(L[b]), with L
    the log odds ratio of the length-averaged log-probs (``pairwise.odds_ratio_loss``)
    and λ = ``beta`` (TRL's name). Rewards are β · π/|y|; metrics add ``log_odds_ratio``
    (mean log σ(L)) and ``log_odds_chosen`` (mean L), as TRL names them. ``stats``: a
    ``PairStats`` with the token counts, or its fields as keywords (as for ``cpo_loss``).
    """
    check_beta(beta)
    dtype, stats = _inputs("orpo_loss", policy_chosen_logps, policy_rejected_logps, stats,
                           dict(keywords))
    chosen_full = policy_chosen_logps.to(dtype)
    n_chosen = stats.chosen_num_tokens.to(dtype)
    chosen = pl.per_token(chosen_full, n_chosen)
    rejected = pl.per_token(policy_rejected_logps.to(dtype), stats.rejected_num_tokens.to(dtype))
    ratio_loss, log_odds = pl.odds_ratio_loss(chosen, rejected)
    nll = pl.nll_loss(chosen_full, chosen_num_tokens=n_chosen,
                      tokens_per_pair=stats.chosen_tokens_per_pair)
    output = preference_output(
        nll + beta * ratio_loss,
        chosen_rewards=beta * chosen,
        rejected_rewards=beta * rejected,
        chosen_logps=chosen,
        rejected_logps=rejected,
        stats=stats,
        nll=nll.mean(),
    )
    output.metrics["log_odds_ratio"] = (-ratio_loss).detach().mean()
    output.metrics["log_odds_chosen"] = log_odds.detach().mean()
    return output
