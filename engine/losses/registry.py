"""Drop-in preference losses: per-sequence log-probs in, loss + implicit rewards + metrics out.

    preference_loss   reference-based pairwise losses under TRL's DPO ``loss_type`` names, alone
                      or combined with weights (e.g. MPO = sigmoid + bco_pair + sft)
    cpo_loss          TRL's CPO family: sigmoid / hinge / ipo / simpo / alphapo + the NLL term
    orpo_loss         ORPO: NLL + λ · odds-ratio term         (both in ``reference_free``)
    kto_loss          unpaired KTO                             (in ``unpaired``)

``preference_loss`` dispatches over the registry of loss types (``loss_types.LOSS_TYPES``); the
formulas, one pure function each, are in ``pairwise`` and ``weighting``, the options in
``options``, the metrics in ``metrics``.

Inputs are what ``fastpo.kernels.sequence_logps`` gives per sequence (``reduction="sum"``): the
summed completion log-probs ``[B]``, and in ``PairStats`` the completion token counts ``[B]``
and, for the ``logits/*`` metrics, the logit sums ``[B]``. Knobs mean what they mean in TRL.
Validation reads only metadata and Python numbers, and the computation never reads a tensor on
the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype

from . import pairwise as pl
from .inputs import PairStats, PreferenceLossOutput, cast, check_logps
from .loss_types import CPO_LOSS_TYPES, KTO_LOSS_TYPES, LOSS_TYPES, LossSpec, PairTerms
from .metrics import preference_output
from .options import (
    CPOOptions,
    DPOOptions,
    KTOOptions,
    OptionError,
    OptionTypeError,
    fold_keywords,
    no_keywords_left,
)
from .reference_free import cpo_loss, orpo_loss
from .unpaired import KTOLossOutput, kto_loss
from .weighting import ld_logps, wpo_weights

__all__ = [
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LOSS_TYPES",
    "CPOOptions",
    "DPOOptions",
    "KTOLossOutput",
    "KTOOptions",
    "LossSpec",
    "OptionError",
    "OptionTypeError",
    "PairStats",
    "PreferenceLossOutput",
    "cpo_loss",
    "kto_loss",
    "orpo_loss",
    "preference_loss",
]

_TAILS = ("policy_chosen_tail_logps", "policy_rejected_tail_logps")
_REF_TAILS = ("ref_chosen_tail_logps", "ref_rejected_tail_logps")
_SUM_SQ = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    options: DPOOptions | None = None,
    stats: PairStats | None = None,
    **keywords: Any,
) -> PreferenceLossOutput:
    """Reference-based pairwise preference loss Σ_k w_k · mean_b ℓ_k[b] (TRL DPO semantics).

    Args:
        policy_*_logps, ref_*_logps: ``[B]`` completion log-probs summed over the completion
            tokens. The reference is not needed when reference-free (ref = 0, and any reference
            given is not used) nor for ``sft`` alone.
        options: a ``DPOOptions`` (loss types and weights, β, ε, f-divergence, DiscoPOP τ,
            ``reference_free``, LD-DPO ``ld_alpha``, WPO ``use_weighting``).
        stats: a ``PairStats``: the token counts (needed by ipo, sigmoid_norm, sft, WPO and the
            ``logits/*`` metrics), the LD-DPO tails (with ``ld_alpha``; the reference tails only
            when a reference is used), WPO's ``*_log_sum_sq_probs`` (with ``use_weighting``),
            the logit sums and ``vocab_size`` (for ``logits/*``).
        **keywords: any field of ``DPOOptions`` or ``PairStats`` by name, e.g.
            ``loss_type="ipo", beta=0.1, chosen_num_tokens=...``; it replaces that field of
            ``options`` / ``stats``.

    With ``ld_alpha`` the log-probs entering the loss are π − (1 − α) · tail, while the NLL and
    the WPO weights keep the full sums. Returns ``PreferenceLossOutput``; rewards are β · ρ
    (before any f-divergence).
    """
    keywords = dict(keywords)
    options = fold_keywords(DPOOptions, options, keywords, "options")
    stats = fold_keywords(PairStats, stats, keywords, "stats")
    no_keywords_left("preference_loss", keywords)
    like = check_logps("policy_chosen_logps", policy_chosen_logps)
    check_logps("policy_rejected_logps", policy_rejected_logps, like=like)
    if options.uses_reference:
        _check_reference(options, ref_chosen_logps, ref_rejected_logps, like)
    else:
        ref_chosen_logps = ref_rejected_logps = None
    stats.check(like, needs_num_tokens=options.num_tokens_users)
    if options.ld_alpha is not None:
        tails = _TAILS + _REF_TAILS if options.uses_reference else _TAILS
        stats.require(tails, like,
                      needed_by="ld_alpha needs the log-probs beyond the shared length:")
    if options.use_weighting:
        stats.require(_SUM_SQ, like, needed_by="use_weighting needs")

    dtype = accumulation_dtype(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    pair = _pair_terms(options, stats, dtype, policy_chosen_logps, policy_rejected_logps,
                       ref_chosen_logps, ref_rejected_logps)
    losses = sum(w * spec.fn(pair) for w, spec in zip(options.weights, options.specs))
    if options.use_weighting:
        losses = losses * wpo_weights(
            pair.chosen_full_logps,
            policy_rejected_logps.to(dtype),
            chosen_log_sum_sq_probs=stats.chosen_log_sum_sq_probs.to(dtype),
            rejected_log_sum_sq_probs=stats.rejected_log_sum_sq_probs.to(dtype),
            chosen_num_tokens=pair.chosen_num_tokens,
            rejected_num_tokens=pair.rejected_num_tokens,
        )
    nll = None
    if stats.has_num_tokens:
        nll = pl.nll_loss(pair.chosen_full_logps.detach(), chosen_num_tokens=pair.chosen_num_tokens,
                          tokens_per_pair=pair.chosen_tokens_per_pair).mean()
    return preference_output(
        losses,
        chosen_rewards=options.beta * pair.chosen_logratios,
        rejected_rewards=options.beta * pair.rejected_logratios,
        chosen_logps=pair.policy_chosen,
        rejected_logps=pair.policy_rejected,
        stats=stats,
        nll=nll,
    )


def _check_reference(options: DPOOptions, ref_chosen: Tensor | None,
                     ref_rejected: Tensor | None, like: Tensor) -> None:
    given = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        needing = [t for t, s in zip(options.loss_type, options.specs) if s.needs_reference]
        raise ValueError(
            f"loss types {needing} need reference log-probs; {missing} not given "
            "(pass them, or reference_free=True)"
        )
    for name, value in given.items():
        check_logps(name, value, like=like)


def _pair_terms(options: DPOOptions, stats: PairStats, dtype: torch.dtype,
                policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None) -> PairTerms:
    """The log-probs in ``dtype`` (LD-DPO applied), the log-ratios and their f-divergence
    scores: what the loss types read."""
    chosen_full = policy_chosen_logps.to(dtype)
    policy_chosen, policy_rejected = chosen_full, policy_rejected_logps.to(dtype)
    ref_chosen, ref_rejected = cast(ref_chosen_logps, dtype), cast(ref_rejected_logps, dtype)
    alpha = options.ld_alpha
    if alpha is not None:
        policy_chosen = ld_logps(policy_chosen, stats.policy_chosen_tail_logps, ld_alpha=alpha)
        policy_rejected = ld_logps(policy_rejected, stats.policy_rejected_tail_logps,
                                   ld_alpha=alpha)
        if ref_chosen is not None and ref_rejected is not None:
            ref_chosen = ld_logps(ref_chosen, stats.ref_chosen_tail_logps, ld_alpha=alpha)
            ref_rejected = ld_logps(ref_rejected, stats.ref_rejected_tail_logps, ld_alpha=alpha)
    if ref_chosen is None or ref_rejected is None:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_chosen)
    chosen_logratios = pl.log_ratios(policy_chosen, ref_chosen)
    rejected_logratios = pl.log_ratios(policy_rejected, ref_rejected)
    divergence = {"f_divergence_type": options.f_divergence_type,
                  "alpha": options.f_alpha_divergence_coef}
    return PairTerms(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=pl.divergence_scores(chosen_logratios, **divergence),
        rejected_scores=pl.divergence_scores(rejected_logratios, **divergence),
        chosen_full_logps=chosen_full,
        chosen_num_tokens=cast(stats.chosen_num_tokens, dtype),
        rejected_num_tokens=cast(stats.rejected_num_tokens, dtype),
        chosen_tokens_per_pair=cast(stats.chosen_tokens_per_pair, dtype),
        beta=float(options.beta),
        label_smoothing=float(options.label_smoothing),
        discopop_tau=float(options.discopop_tau),
    )
