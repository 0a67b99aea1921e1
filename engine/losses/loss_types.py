"""The registry of TRL's DPO loss types: each name, its formula (``pairwise``) as a function of
the prepared pair, and what it needs beyond the policy log-probs; and the loss types of the
other fronts (``CPO_LOSS_TYPES``, ``KTO_LOSS_TYPES``).

``preference_loss`` (``registry``) validates its options against this table (``DPOOptions``) and
sums the weighted entries; the training config validates ``loss.loss_type`` through the same
options. A new loss type is a ``LossSpec`` entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import pairwise as pl

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")  # cpo_loss (reference_free)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # kto_loss (unpaired)


@dataclass(frozen=True)
class PairTerms:
    """Everything a pairwise loss may read, already cast to the compute dtype."""

    policy_chosen: Tensor  # log-probs entering the loss (length-desensitized with ld_alpha)
    policy_rejected: Tensor
    ref_chosen: Tensor  # zeros when reference-free
    ref_rejected: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor  # f-divergence scores of the log-ratios
    rejected_scores: Tensor
    chosen_full_logps: Tensor  # summed over every completion token (for the NLL)
    chosen_num_tokens: Tensor | None
    rejected_num_tokens: Tensor | None
    chosen_tokens_per_pair: Tensor | None  # 0-d, the NLL's mean chosen length (None: batch's)
    beta: float
    label_smoothing: float
    discopop_tau: float


@dataclass(frozen=True)
class LossSpec:
    """A loss type: its function of the pair and what it needs beyond the policy log-probs."""

    fn: Callable[[PairTerms], Tensor]
    needs_reference: bool = True
    needs_num_tokens: bool = False
    f_divergence: bool = False  # defined on s_c − s_r, so any f-divergence applies
    sorts_batch: bool = False  # entries are batch quantiles, not pairs


def _counts(p: PairTerms) -> dict[str, Tensor | None]:
    return {"chosen_num_tokens": p.chosen_num_tokens, "rejected_num_tokens": p.rejected_num_tokens}


LOSS_TYPES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        lambda p: pl.sigmoid_loss(
            p.chosen_scores, p.rejected_scores, beta=p.beta, label_smoothing=p.label_smoothing
        ),
        f_divergence=True,
    ),
    "hinge": LossSpec(
        lambda p: pl.hinge_loss(p.chosen_scores, p.rejected_scores, beta=p.beta),
        f_divergence=True,
    ),
    "ipo": LossSpec(
        lambda p: pl.ipo_loss(p.chosen_scores, p.rejected_scores, beta=p.beta, **_counts(p)),
        needs_num_tokens=True,
        f_divergence=True,
    ),
    "exo_pair": LossSpec(
        lambda p: pl.exo_pair_loss(
            p.chosen_scores, p.rejected_scores, beta=p.beta, label_smoothing=p.label_smoothing
        ),
        f_divergence=True,
    ),
    "nca_pair": LossSpec(
        lambda p: pl.nca_pair_loss(p.chosen_logratios, p.rejected_logratios, beta=p.beta)
    ),
    "robust": LossSpec(
        lambda p: pl.robust_loss(
            p.chosen_scores, p.rejected_scores, beta=p.beta, label_smoothing=p.label_smoothing
        ),
        f_divergence=True,
    ),
    "bco_pair": LossSpec(
        lambda p: pl.bco_pair_loss(p.chosen_logratios, p.rejected_logratios, beta=p.beta)
    ),
    "sppo_hard": LossSpec(
        lambda p: pl.sppo_hard_loss(p.chosen_logratios, p.rejected_logratios, beta=p.beta)
    ),
    "aot": LossSpec(
        lambda p: pl.aot_loss(
            p.policy_chosen,
            p.policy_rejected,
            p.ref_chosen,
            p.ref_rejected,
            beta=p.beta,
            label_smoothing=p.label_smoothing,
        ),
        sorts_batch=True,
    ),
    "aot_unpaired": LossSpec(
        lambda p: pl.aot_unpaired_loss(
            p.chosen_logratios, p.rejected_logratios, beta=p.beta, label_smoothing=p.label_smoothing
        ),
        sorts_batch=True,
    ),
    "apo_zero": LossSpec(
        lambda p: pl.apo_zero_loss(p.chosen_logratios, p.rejected_logratios, beta=p.beta)
    ),
    "apo_down": LossSpec(
        lambda p: pl.apo_down_loss(p.chosen_logratios, p.rejected_logratios, beta=p.beta)
    ),
    "discopop": LossSpec(
        lambda p: pl.discopop_loss(
            p.chosen_scores, p.rejected_scores, beta=p.beta, tau=p.discopop_tau
        ),
        f_divergence=True,
    ),
    "sft": LossSpec(
        lambda p: pl.nll_loss(p.chosen_full_logps, chosen_num_tokens=p.chosen_num_tokens,
                              tokens_per_pair=p.chosen_tokens_per_pair),
        needs_reference=False,
        needs_num_tokens=True,
        f_divergence=True,
    ),
    "sigmoid_norm": LossSpec(
        lambda p: pl.sigmoid_norm_loss(
            p.chosen_scores, p.rejected_scores, beta=p.beta, **_counts(p)
        ),
        needs_num_tokens=True,
        f_divergence=True,
    ),
}
