"""Pairwise preference losses as pure functions of per-sequence log-probabilities.

Notation (every tensor is ``[B]``, one entry per preference pair):

    π_c, π_r    policy log-probs of the chosen / rejected completion (summed over its tokens)
    ρ_c, ρ_r    log-ratios  π_c − ref_c,  π_r − ref_r  (``log_ratios``)
    s_c, s_r    f-divergence scores of the log-ratios  (``divergence_scores``; s = ρ for reverse KL)
    Δ           s_c − s_r,   σ the logistic function,   β the inverse temperature,   ε the smoothing

Each function returns the per-pair loss ``[B]``; the caller takes the (weighted) mean. Inputs are
computed in float32 at least (float64 stays float64). Nothing here reads a tensor's value on the
host, so the functions never synchronize with the device. The per-pair reweightings (WPO, LD-DPO)
are in ``weighting``; which loss type uses which function, in ``loss_types``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import (
    at_least_fp32,
    check_beta,
    check_label_smoothing,
    check_positive,
    check_unit_interval,
    check_weight,
)

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Exponentials of log-ratios (f-divergence scores, AlphaPO rewards) are capped at exp(40) ≈ 2.4e17:
# past it the logistic losses are saturated, and the squared ones (IPO) and their gradients,
# ~ exp(2 · 40), still fit in float32. The gradient is zero past the cap.
EXP_CAP = 40.0
_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------
def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0`` without cancellation (Mächler, 2012).

    Near 0, ``log(−expm1(x))`` is exact; below ``−log 2``, ``log1p(−exp(x))`` is.
    """
    x = at_least_fp32(x)
    return torch.where(x > -_LOG2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _capped_expm1(t: Tensor) -> Tensor:
    # exp(t) − 1 with t capped at EXP_CAP: finite for any finite t; zero gradient past the cap.
    return torch.expm1(t.clamp(max=EXP_CAP))


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    # −(1 − ε) log σ(z) − ε log σ(−z): the logistic loss against a label flipped with prob. ε.
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def per_token(values: Tensor, num_tokens: Tensor) -> Tensor:
    """``values / max(1, num_tokens)``: a sequence with no tokens gives 0, not 0/0."""
    return values / num_tokens.to(values.dtype).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# log-ratios and f-divergence scores
# ----------------------------------------------------------------------------------------------
def log_ratios(policy_logps: Tensor, ref_logps: Tensor | None = None) -> Tensor:
    """ρ = log π_θ(y|x) − log π_ref(y|x); with no reference (``None``) ρ = log π_θ(y|x)."""
    policy_logps = at_least_fp32(policy_logps)
    if ref_logps is None:
        return policy_logps
    return policy_logps - at_least_fp32(ref_logps).to(policy_logps.dtype)


def divergence_scores(
    logratios: Tensor, *, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> Tensor:
    """f'(u) at u = π_θ/π_ref = exp(ρ): the f-DPO score that replaces ρ (Wang et al., 2023,
    "Beyond Reverse KL", arXiv:2309.16240). Additive constants cancel in s_c − s_r.

        reverse_kl         ρ
        forward_kl         1 − exp(−ρ)                      (f'(u) = 1 − 1/u)
        js_divergence      log 2 + log σ(ρ)                 (f'(u) = log(2u / (1 + u)))
        alpha_divergence   (1 − exp(−α ρ)) / α              (f'(u) = (1 − u^−α) / α), α ∈ [0, 1]

    α = 0 is reverse KL and α = 1 forward KL. This is the paper's α (TRL documents the same
    ``u^-α``; TRL 1.16's code computes ``(u^(α−1) − 1)/(α − 1)``, i.e. the paper's 1 − α, which
    agrees only at its default α = 0.5). Exponents are capped at ``EXP_CAP`` so that a log-ratio
    of −1e4 gives a large finite score instead of ``inf`` (and ``inf − inf`` in Δ).
    """
    logratios = at_least_fp32(logratios)
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -_capped_expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return _LOG2 + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        check_unit_interval("f_alpha_divergence_coef", alpha)
        if alpha == 0:
            return logratios
        return -_capped_expm1(-alpha * logratios) / alpha
    raise ValueError(
        f"unknown f_divergence_type {f_divergence_type!r}; expected one of {list(F_DIVERGENCES)}"
    )


# ----------------------------------------------------------------------------------------------
# losses on the score difference Δ = s_c − s_r
# ----------------------------------------------------------------------------------------------
def sigmoid_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO: −log σ(βΔ) (Rafailov et al., 2023, arXiv:2305.18290).

    With ε > 0, conservative DPO (cDPO, Mitchell, 2023): −(1 − ε) log σ(βΔ) − ε log σ(−βΔ).
    (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; here it is cDPO as the knob says.)
    """
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    delta = at_least_fp32(chosen_scores) - at_least_fp32(rejected_scores)
    return _smoothed_logistic(beta * delta, label_smoothing)


def hinge_loss(chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float) -> Tensor:
    """SLiC hinge: max(0, 1 − βΔ) (Zhao et al., 2023, "SLiC-HF", arXiv:2305.10425)."""
    check_beta(beta)
    return torch.relu(1.0 - beta * (at_least_fp32(chosen_scores) - at_least_fp32(rejected_scores)))


def ipo_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float,
    chosen_num_tokens: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
) -> Tensor:
    """IPO: (s_c/|y_c| − s_r/|y_r| − 1/(2β))² (Azar et al., 2023, arXiv:2310.12036, Eq. 17; β = τ).

    With token counts the scores are averaged per token (as TRL does, and as the paper's results
    were obtained); without them the sequence-level form of the paper is used.
    """
    check_beta(beta)
    chosen_scores, rejected_scores = at_least_fp32(chosen_scores), at_least_fp32(rejected_scores)
    if (chosen_num_tokens is None) != (rejected_num_tokens is None):
        raise ValueError(
            "ipo_loss needs both chosen_num_tokens and rejected_num_tokens, or neither"
        )
    if chosen_num_tokens is not None and rejected_num_tokens is not None:
        chosen_scores = per_token(chosen_scores, chosen_num_tokens)
        rejected_scores = per_token(rejected_scores, rejected_num_tokens)
    return (chosen_scores - rejected_scores - 1.0 / (2.0 * beta)) ** 2


def sigmoid_norm_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
) -> Tensor:
    """Length-normalized DPO: −log σ(β (s_c/|y_c| − s_r/|y_r|)) (TRL's ``sigmoid_norm``; the
    per-token implicit reward of SimPO, Meng et al., 2024, arXiv:2405.14734, kept relative to
    the reference)."""
    check_beta(beta)
    chosen = per_token(at_least_fp32(chosen_scores), chosen_num_tokens)
    rejected = per_token(at_least_fp32(rejected_scores), rejected_num_tokens)
    return -F.logsigmoid(beta * (chosen - rejected))


def exo_pair_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float, label_smoothing: float
) -> Tensor:
    """EXO-pref: KL(p_θ ‖ p_ε) over {chosen, rejected} with p_θ = (σ(βΔ), σ(−βΔ)) and target
    p_ε = (1 − ε, ε) (Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 16):

        σ(βΔ) (log σ(βΔ) − log(1 − ε)) + σ(−βΔ) (log σ(−βΔ) − log ε),   ε ∈ (0, 0.5)
    """
    check_beta(beta)
    check_exo_pair_smoothing(label_smoothing)
    z = beta * (at_least_fp32(chosen_scores) - at_least_fp32(rejected_scores))
    log_q_win, log_q_lose = F.logsigmoid(z), F.logsigmoid(-z)
    return torch.sigmoid(z) * (log_q_win - math.log1p(-label_smoothing)) + torch.sigmoid(-z) * (
        log_q_lose - math.log(label_smoothing)
    )


def check_exo_pair_smoothing(label_smoothing: float) -> None:
    """exo_pair's ε: in (0, 0.5), as its target p_ε = (1 − ε, ε) enters through log ε."""
    check_label_smoothing(label_smoothing)
    if label_smoothing == 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")


def robust_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO, unbiased under labels flipped with probability ε (Chowdhury et al., 2024,
    "Provably Robust DPO", arXiv:2403.00409):

        (−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε),   ε ∈ [0, 0.5)
    """
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    z = beta * (at_least_fp32(chosen_scores) - at_least_fp32(rejected_scores))
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def discopop_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float, tau: float = 0.05
) -> Tensor:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al., 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv:2406.08414, Eq. 5).
    With z = βΔ and the mixing weight m = σ(z/τ):

        (1 − m) · (−log σ(z)) + m · exp(−z)

    ``m · exp(−z)`` is evaluated as ``exp(−z + log σ(z/τ))``: finite (→ 0) for z → −∞ when τ < 1.
    """
    check_beta(beta)
    check_positive("discopop_tau", tau)
    z = beta * (at_least_fp32(chosen_scores) - at_least_fp32(rejected_scores))
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / tau)
    exponential = torch.exp(-z + F.logsigmoid(z / tau))
    return logistic + exponential


def _sorted_logistic(delta_sorted: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return _smoothed_logistic(beta * delta_sorted, label_smoothing)


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, paired: distributional dominance by optimal transport over the batch (Melnyk et al.,
    2024, "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882).
    The policy margins π_c − π_r and the reference margins ref_c − ref_r are each sorted over
    the batch, and the smoothed logistic loss is taken on their sorted difference δ_(i):

        −(1 − ε) log σ(β δ_(i)) − ε log σ(−β δ_(i))

    The i-th entry belongs to the i-th quantile, not to pair i.
    """
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    policy = at_least_fp32(policy_chosen_logps) - at_least_fp32(policy_rejected_logps)
    ref = at_least_fp32(ref_chosen_logps) - at_least_fp32(ref_rejected_logps)
    delta = torch.sort(policy, dim=0).values - torch.sort(ref.to(policy.dtype), dim=0).values
    return _sorted_logistic(delta, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, unpaired (Melnyk et al., 2024, arXiv:2406.05882): the chosen log-ratios and the
    rejected log-ratios are sorted separately over the batch, δ_(i) = ρ_c,(i) − ρ_r,(i), then
    −(1 − ε) log σ(β δ_(i)) − ε log σ(−β δ_(i)). Entries are quantiles, not pairs."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    chosen, rejected = at_least_fp32(chosen_logratios), at_least_fp32(rejected_logratios)
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return _sorted_logistic(delta, beta, label_smoothing)


# ----------------------------------------------------------------------------------------------
# losses on the individual log-ratios
# ----------------------------------------------------------------------------------------------
def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """NCA, pairwise: −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r) (Chen et al., 2024,
    "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv:2402.05369)."""
    check_beta(beta)
    chosen, rejected = (
        beta * at_least_fp32(chosen_logratios),
        beta * at_least_fp32(rejected_logratios),
    )
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """BCO, pairwise: −log σ(βρ_c) − log σ(−βρ_r) (Jung et al., 2024, "Binary Classifier
    Optimization for Large Language Model Alignment", arXiv:2404.04656). As in TRL's
    ``bco_pair``, without the paper's running reward shift δ."""
    check_beta(beta)
    chosen, rejected = (
        beta * at_least_fp32(chosen_logratios),
        beta * at_least_fp32(rejected_logratios),
    )
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SPPO with hard win probabilities (P = 1 for the winner, 0 for the loser):
    (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))² (Wu et al., 2024, "Self-Play Preference Optimization",
    arXiv:2405.00675, Eq. 4.7)."""
    check_beta(beta)
    half = 0.5 / beta
    chosen, rejected = at_least_fp32(chosen_logratios), at_least_fp32(rejected_logratios)
    return (chosen - half) ** 2 + (rejected + half) ** 2


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-zero: (1 − σ(βρ_c)) + σ(βρ_r) — raise chosen, lower rejected (D'Oosterlinck et al.,
    2024, "Anchored Preference Optimization", arXiv:2408.06266, Eq. 7)."""
    check_beta(beta)
    chosen, rejected = at_least_fp32(chosen_logratios), at_least_fp32(rejected_logratios)
    return torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-down: σ(βρ_c) + (1 − σ(β(ρ_c − ρ_r))) — lower chosen, lower rejected more
    (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8). Always on the raw log-ratios."""
    check_beta(beta)
    chosen, rejected = at_least_fp32(chosen_logratios), at_least_fp32(rejected_logratios)
    return torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - rejected))


# ----------------------------------------------------------------------------------------------
# reference-free losses
# ----------------------------------------------------------------------------------------------
def nll_loss(chosen_logps: Tensor, *, chosen_num_tokens: Tensor,
             tokens_per_pair: Tensor | None = None) -> Tensor:
    """NLL of the chosen completions per token (TRL's ``sft`` term, CPO's BC term, ORPO's
    L_SFT) as per-pair terms ``[B]``: −π_c[b] / n̄, n̄ the mean chosen length, by default
    max(1, Σ_b |y_c[b]|) / B (the batch mean is then −Σ_b π_c[b] / max(1, Σ_b |y_c[b]|)).
    ``tokens_per_pair`` (0-d): n̄ of a whole optimizer step (every micro-batch and rank), so that
    the step's per-pair terms summed ÷ its pair count are its NLL per chosen token."""
    chosen_logps = at_least_fp32(chosen_logps)
    if tokens_per_pair is None:
        total = chosen_num_tokens.to(chosen_logps.dtype).sum().clamp(min=1.0)
        tokens_per_pair = total / chosen_logps.shape[0]
    return -chosen_logps / tokens_per_pair.to(chosen_logps.dtype)


def simpo_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO: −log σ(β (r_c − r_r) − γ) with r the length-averaged log-prob π/|y| (Meng et al.,
    2024, "SimPO", arXiv:2405.14734, Eq. 6), smoothed with ε like cDPO. With r given by
    ``alphapo_rewards`` this is AlphaPO."""
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    check_weight("simpo_gamma", gamma)
    z = beta * (at_least_fp32(chosen_rewards) - at_least_fp32(rejected_rewards)) - gamma
    return _smoothed_logistic(z, label_smoothing)


def alphapo_rewards(logps: Tensor, *, alpha: float) -> Tensor:
    """AlphaPO reward shape r = (1 − p^−α)/α with p = exp(logp); α = 0 gives r = logp (Gupta et
    al., 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv:2501.03884).
    Computed as −expm1(−α logp)/α with the exponent capped at ``EXP_CAP``, so it is meant for
    length-averaged log-probs (SimPO): with α > 0 a summed log-prob below −EXP_CAP/α saturates."""
    check_weight("alpha", alpha)
    logps = at_least_fp32(logps)
    if alpha == 0:
        return logps
    return -_capped_expm1(-alpha * logps) / alpha


def odds_ratio_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO odds-ratio term (Hong et al., 2024, "ORPO", arXiv:2403.07691, Eqs. 4 and 7).
    With p = exp(mean token log-prob), odds(p) = p/(1 − p) and

        L = log odds(p_c) − log odds(p_r) = (a_c − a_r) − (log1mexp(a_c) − log1mexp(a_r))

    returns ``(−log σ(L), L)`` per pair. The averages are clamped at −eps of their dtype so a
    completion with no tokens (average 0, p = 1, infinite odds) stays finite.
    """
    chosen, rejected = at_least_fp32(chosen_avg_logps), at_least_fp32(rejected_avg_logps)
    ceiling = -torch.finfo(chosen.dtype).eps
    chosen, rejected = chosen.clamp(max=ceiling), rejected.clamp(max=ceiling)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -F.logsigmoid(log_odds), log_odds
