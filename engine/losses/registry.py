"""Drop-in preference losses: per-sequence log-probs in, loss + implicit rewards + metrics out.

    preference_loss   reference-based pairwise losses under TRL's DPO ``loss_type`` names, alone
                      or combined with weights (e.g. MPO = sigmoid + bco_pair + sft)
    cpo_loss          TRL's CPO family: sigmoid / hinge / ipo / simpo / alphapo + the NLL term
    orpo_loss         ORPO: NLL + λ · odds-ratio term         (both in ``reference_free``)
    kto_loss          unpaired KTO                             (in ``unpaired``)

The formulas, one pure function each, are in ``pairwise``; the metrics in ``metrics``.

Inputs are what ``fastpo.kernels.sequence_logps`` gives per sequence (``reduction="sum"``): the
summed completion log-probs ``[B]``, the completion token counts ``[B]`` and, for the
``logits/*`` metrics, the logit sums ``[B]``. Knobs mean what they mean in TRL. Validation
reads only metadata and Python numbers, and the computation never reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import pairwise as pl
from .inputs import (
    PreferenceLossOutput,
    cast,
    check_logits_inputs,
    check_logps,
    check_num_tokens,
    check_weight,
    compute_dtype,
)
from .metrics import preference_output
from .reference_free import CPO_LOSS_TYPES, cpo_loss, orpo_loss
from .unpaired import KTO_LOSS_TYPES, KTOLossOutput, kto_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LOSS_TYPES",
    "KTOLossOutput",
    "LossSpec",
    "PreferenceLossOutput",
    "cpo_loss",
    "kto_loss",
    "orpo_loss",
    "preference_loss",
]


# ----------------------------------------------------------------------------------------------
# the registry of TRL DPO loss types
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pair:
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
    beta: float
    label_smoothing: float
    discopop_tau: float


@dataclass(frozen=True)
class LossSpec:
    """A loss type: its function of the pair and what it needs beyond the policy log-probs."""

    fn: Callable[[_Pair], Tensor]
    needs_reference: bool = True
    needs_num_tokens: bool = False
    f_divergence: bool = False  # defined on s_c − s_r, so any f-divergence applies
    sorts_batch: bool = False  # entries are batch quantiles, not pairs


def _counts(p: _Pair) -> dict[str, Tensor | None]:
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
        lambda p: pl.nll_loss(p.chosen_full_logps, chosen_num_tokens=p.chosen_num_tokens),
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


def _normalize_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None, valid: Sequence[str]
) -> tuple[list[str], list[float]]:
    if not isinstance(loss_type, (str, Sequence)):
        raise TypeError(
            f"loss_type must be a name or a list of names from {list(valid)}, got "
            f"{type(loss_type).__name__}"
        )
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"loss_type is empty; give one or more of {list(valid)}")
    for name in types:
        if name not in valid:
            raise ValueError(f"unknown loss_type {name!r}; valid loss types are {list(valid)}")
    if loss_weights is None:
        return types, [1.0] * len(types)
    if isinstance(loss_weights, str) or not isinstance(loss_weights, Sequence):
        raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
    weights = list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries but loss_type has {len(types)} "
            f"({types}); give one weight per loss type"
        )
    return types, [check_weight(f"loss_weights[{i}]", w) for i, w in enumerate(weights)]


# ----------------------------------------------------------------------------------------------
# fronts
# ----------------------------------------------------------------------------------------------
def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    chosen_num_tokens: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
    ld_alpha: float | None = None,
    policy_chosen_tail_logps: Tensor | None = None,
    policy_rejected_tail_logps: Tensor | None = None,
    ref_chosen_tail_logps: Tensor | None = None,
    ref_rejected_tail_logps: Tensor | None = None,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: Tensor | None = None,
    rejected_log_sum_sq_probs: Tensor | None = None,
    chosen_logits_sum: Tensor | None = None,
    rejected_logits_sum: Tensor | None = None,
    vocab_size: int | None = None,
) -> PreferenceLossOutput:
    """Reference-based pairwise preference loss Σ_k w_k · mean_b ℓ_k[b] (TRL DPO semantics).

    Args:
        policy_*_logps, ref_*_logps: ``[B]`` completion log-probs summed over the completion
            tokens. The reference is not needed with ``reference_free=True`` (ref = 0, and any
            reference given is not used) nor for ``sft`` alone.
        loss_type, loss_weights: names from ``LOSS_TYPES`` and one weight each (default 1).
        beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau: TRL's
            knobs (see each function in ``pairwise``; ε is used by sigmoid (cDPO), robust,
            exo_pair, aot and aot_unpaired and must lie in [0, 0.5)).
        chosen_num_tokens, rejected_num_tokens: ``[B]`` completion token counts; needed by
            ipo, sigmoid_norm, sft, ``use_weighting`` and the ``logits/*`` metrics.
        ld_alpha: LD-DPO α ∈ [0, 1]. The log-probs entering the loss become π − (1 − α) · tail,
            where ``*_tail_logps`` is the part of each summed log-prob beyond the pair's shared
            length (``pairwise.shared_length_tail_logps``); the NLL and the WPO weights
            keep the full sums. The reference tails are not needed when reference-free.
        use_weighting: WPO weights (``pairwise.wpo_weights``) from ``*_log_sum_sq_probs``,
            per sequence Σ_t log Σ_v π(v|·)² over the completion tokens.
        chosen_logits_sum, rejected_logits_sum, vocab_size: for the ``logits/*`` metrics.

    Returns ``PreferenceLossOutput``; rewards are β · ρ (before any f-divergence).
    """
    types, weights = _normalize_loss_types(loss_type, loss_weights, list(LOSS_TYPES))
    specs = [LOSS_TYPES[t] for t in types]
    pl.check_beta(beta)
    pl.check_label_smoothing(label_smoothing)
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if "discopop" in types:
        pl.check_positive("discopop_tau", discopop_tau)
    if f_divergence_type not in pl.F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; expected one of "
            f"{list(pl.F_DIVERGENCES)}"
        )
    if f_divergence_type == "alpha_divergence":
        pl.check_unit_interval("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type != "reverse_kl":
        unsupported = [t for t, s in zip(types, specs) if not s.f_divergence]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is defined only for loss types "
                f"{[t for t, s in LOSS_TYPES.items() if s.f_divergence]}; got {unsupported}"
            )

    policy_chosen_logps = check_logps("policy_chosen_logps", policy_chosen_logps)
    check_logps("policy_rejected_logps", policy_rejected_logps, like=policy_chosen_logps)
    like = policy_chosen_logps
    uses_reference = not reference_free and any(s.needs_reference for s in specs)
    if uses_reference:
        missing = [
            n
            for n, v in (
                ("ref_chosen_logps", ref_chosen_logps),
                ("ref_rejected_logps", ref_rejected_logps),
            )
            if v is None
        ]
        if missing:
            needing = [t for t, s in zip(types, specs) if s.needs_reference]
            raise ValueError(
                f"loss types {needing} need reference log-probs; {missing} not given "
                "(pass them, or reference_free=True)"
            )
        check_logps("ref_chosen_logps", ref_chosen_logps, like=like)
        check_logps("ref_rejected_logps", ref_rejected_logps, like=like)
    else:
        ref_chosen_logps = ref_rejected_logps = None

    have_counts = chosen_num_tokens is not None and rejected_num_tokens is not None
    needs_counts = [t for t, s in zip(types, specs) if s.needs_num_tokens]
    if use_weighting:
        needs_counts.append("use_weighting")
    if needs_counts and not have_counts:
        raise ValueError(
            f"{needs_counts} need chosen_num_tokens and rejected_num_tokens (completion token "
            "counts per sequence)"
        )
    if chosen_num_tokens is not None:
        check_num_tokens("chosen_num_tokens", chosen_num_tokens, like=like)
    if rejected_num_tokens is not None:
        check_num_tokens("rejected_num_tokens", rejected_num_tokens, like=like)

    tails = {
        "policy_chosen_tail_logps": policy_chosen_tail_logps,
        "policy_rejected_tail_logps": policy_rejected_tail_logps,
    }
    if uses_reference:
        tails["ref_chosen_tail_logps"] = ref_chosen_tail_logps
        tails["ref_rejected_tail_logps"] = ref_rejected_tail_logps
    if ld_alpha is not None:
        pl.check_unit_interval("ld_alpha", ld_alpha)
        missing = [n for n, v in tails.items() if v is None]
        if missing:
            raise ValueError(f"ld_alpha needs the log-probs beyond the shared length: {missing}")
        for name, value in tails.items():
            check_logps(name, value, like=like)

    if use_weighting:
        sorting = [t for t, s in zip(types, specs) if s.sorts_batch]
        if sorting:
            raise ValueError(f"use_weighting is not defined for {sorting}: they sort the batch")
        missing = [
            n
            for n, v in (
                ("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs),
                ("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"use_weighting needs {missing}")
        check_logps("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs, like=like)
        check_logps("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs, like=like)
    check_logits_inputs(like, chosen_logits_sum, rejected_logits_sum, vocab_size, have_counts)

    # ---- computation ----
    dtype = compute_dtype(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_full = policy_chosen_logps.to(dtype)
    rejected_full = policy_rejected_logps.to(dtype)
    policy_chosen, policy_rejected = chosen_full, rejected_full
    ref_chosen = cast(ref_chosen_logps, dtype)
    ref_rejected = cast(ref_rejected_logps, dtype)
    if ld_alpha is not None:
        policy_chosen = pl.ld_logps(chosen_full, policy_chosen_tail_logps, ld_alpha=ld_alpha)
        policy_rejected = pl.ld_logps(rejected_full, policy_rejected_tail_logps, ld_alpha=ld_alpha)
        if ref_chosen is not None:
            ref_chosen = pl.ld_logps(ref_chosen, ref_chosen_tail_logps, ld_alpha=ld_alpha)
            ref_rejected = pl.ld_logps(ref_rejected, ref_rejected_tail_logps, ld_alpha=ld_alpha)
    if ref_chosen is None or ref_rejected is None:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_chosen)

    chosen_logratios = pl.log_ratios(policy_chosen, ref_chosen)
    rejected_logratios = pl.log_ratios(policy_rejected, ref_rejected)
    divergence = {"f_divergence_type": f_divergence_type, "alpha": f_alpha_divergence_coef}
    pair = _Pair(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=pl.divergence_scores(chosen_logratios, **divergence),
        rejected_scores=pl.divergence_scores(rejected_logratios, **divergence),
        chosen_full_logps=chosen_full,
        chosen_num_tokens=cast(chosen_num_tokens, dtype),
        rejected_num_tokens=cast(rejected_num_tokens, dtype),
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        discopop_tau=float(discopop_tau),
    )

    losses = sum(w * spec.fn(pair) for w, spec in zip(weights, specs))
    if use_weighting:
        losses = losses * pl.wpo_weights(
            chosen_full,
            rejected_full,
            chosen_log_sum_sq_probs=chosen_log_sum_sq_probs.to(dtype),
            rejected_log_sum_sq_probs=rejected_log_sum_sq_probs.to(dtype),
            chosen_num_tokens=pair.chosen_num_tokens,
            rejected_num_tokens=pair.rejected_num_tokens,
        )
    nll = None
    if have_counts:
        nll = pl.nll_loss(chosen_full.detach(), chosen_num_tokens=pair.chosen_num_tokens)[0]
    return preference_output(
        losses,
        chosen_rewards=beta * chosen_logratios,
        rejected_rewards=beta * rejected_logratios,
        chosen_logps=policy_chosen,
        rejected_logps=policy_rejected,
        chosen_logits_sum=chosen_logits_sum,
        rejected_logits_sum=rejected_logits_sum,
        chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens,
        vocab_size=vocab_size,
        nll=nll,
    )
