"""Preference losses straight from final hidden states and the lm_head: functional forms.

Each function takes the policy's last hidden states ``_input [rows, T, H]``, the head ``weight
[V, H]`` (and ``bias [V]``), the shifted ``target [rows, T]`` (``ignore_index`` on prompt and
padding tokens) and returns ``(loss, aux)``: the scalar loss and a tuple of detached metrics.
The paired losses take ``rows = 2B``: the B chosen completions first, then the B rejected ones in
the same order. The logits are never built whole; the losses' formulas are those of
``fastpo.engine.losses``; the module wrappers are in ``modules``, the argument checks in
``fused_linear_inputs``.

Design (``design=``; ``fused_linear_paths`` has both). "loss-fused" computes the loss inside the
fused linear op, chunk by chunk of whole pairs, with every gradient made in the forward (6·N·V·H
of matmul work per step, where the op's log-probs and a backward that recomputes the logits take
8·N·V·H); "logps" takes the log-probs from ``fastpo.kernels.linear_sequence_logps`` and autograd
through the loss. "auto" (the default) is loss-fused where the loss is a sum over pairs with
batch-level constants and, on CUDA, the roofline model predicts it faster than the op + loss
(``fused_linear_inputs.prefer_loss_fused``; on CPU the op's chunked path is faster and leaner).
Not sums over pairs: DPO's ``aot`` and ``aot_unpaired`` (they sort the batch's margins), DPO's
``sft`` (its own mean over the batch's tokens) and ORPO with an ``nll_target`` (second labels).

Per sequence, π is the summed log-prob of its scored tokens, or that over their count (π̄, "average
log-prob", 0 for a sequence with no scored token). The NLL term is per chosen token over the batch:

    NLL = −Σ_{chosen b, t} log p(y_bt) / #(scored chosen tokens)

The aux tuples, in order:

    DPO, CPO, SimPO   (chosen_logps [B], rejected_logps [B], chosen_logits_mean,
                       rejected_logits_mean, nll_loss, chosen_rewards [B], rejected_rewards [B])
    ORPO              the same, then log_odds_ratio = mean log σ(L), log_odds_chosen = mean L
    KTO               (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
                       chosen_rewards_sum, rejected_rewards_sum), "chosen" = desirable examples

``*_logits_mean`` is the mean logit over the B sequences × T positions (every position, scored or
not) × V vocabulary entries of that side; ``*_logits_sum`` the corresponding sum. ``compiled`` and
``chunk_size`` are accepted for call compatibility; the chunks come from a memory budget.
Defaults are those of the functional forms this mirrors; two differ from the modules' (SimPO's
``compute_nll_loss``: False here, True in the module; KTO's ``use_ref_model``: True here, False
in the module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype

from . import pairwise as pl
from .fused_linear_inputs import (
    CPO_TYPES,
    check_batch,
    check_common,
    check_design,
    check_kl,
    check_preference_labels,
    dpo_loss_types,
)
from .fused_linear_paths import (
    Aux,
    Take,
    design_loss,
    logit_sums_per_row,
    paired_aux,
    reference_logps,
    whole_batch,
)
from .inputs import check_weight
from .registry import LOSS_TYPES, cpo_loss, kto_loss, preference_loss

__all__ = [
    "Aux",
    "fused_linear_cpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
]

# DPO loss types that are no sum over pairs: they sort the batch, or (sft) hold the batch's own
# token mean in every pair's entry
_BATCH_COUPLED = (*(t for t, s in LOSS_TYPES.items() if s.sorts_batch), "sft")


# ----------------------------------------------------------------------------------------------
# paired losses
# ----------------------------------------------------------------------------------------------
def fused_linear_dpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    ref_input: Tensor | None = None, ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None, *, ignore_index: int = -100, beta: float = 0.1,
    compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
    average_log_prob: bool = False, chunk_size: int = 1,
    loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
    discopop_tau: float = 0.05, alpha: float = 1.0, loss_weights: Sequence[float] | None = None,
    ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
    design: str = "auto",
) -> tuple[Tensor, Aux]:
    """DPO family from hidden states: Σ_k w_k · mean_b ℓ_k(ρ_c[b], ρ_r[b]) + α · NLL.

    ρ = π − π_ref (π̄ with ``average_log_prob``; π_ref = 0 with ``use_ref_model=False``); ℓ_k are
    ``preference_loss``'s TRL loss types, e.g. sigmoid −log σ(β(ρ_c − ρ_r)), hinge, ipo
    ((ρ_c/|y_c| − ρ_r/|y_r| − 1/(2β))², per token), robust, exo_pair, nca_pair, bco_pair,
    sppo_hard, apo_zero, apo_down, discopop, aot, sigmoid_norm, sft, alone or as a list with
    ``loss_weights``. ``label_smoothing`` ε enters robust, exo_pair and the aot types (``sigmoid``
    ignores it, as the chunked-loss convention and TRL do; cDPO is ``preference_loss``'s).
    The NLL term (weight ``alpha``) is added with ``compute_nll_loss``. The reference is given as
    hidden states (``ref_input``, ``ref_weight``, ``ref_bias``) or as precomputed per-sequence
    log-probs ``ref_chosen_logps``/``ref_rejected_logps`` [B] (reduced like the policy's).
    Rewards are β · ρ. ``design``: "auto", "loss-fused" or "logps" (see the module docstring).
    Returns ``(loss, aux)`` (see the module docstring).
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss, use_ref_model=use_ref_model,
                 average_log_prob=average_log_prob)
    alpha = check_weight("alpha", alpha)
    types, weights = dpo_loss_types(loss_type, loss_weights, label_smoothing, average_log_prob)
    check_batch(_input, target, paired=True)
    coupled = [t for t in types if t in _BATCH_COUPLED]
    fused = check_design(design, f"loss_type {coupled} couples the pairs" if coupled else None,
                         hidden=_input, weight=weight, rows_per_unit=2)
    ref = reference_logps(use_ref_model, {"ref_chosen_logps": ref_chosen_logps,
                                          "ref_rejected_logps": ref_rejected_logps},
                          ref_input, ref_weight, ref_bias, target, _input,
                          ignore_index=ignore_index, average=average_log_prob)
    # ε per loss type: split the sigmoid term off when ε > 0 (it is not smoothed here).
    groups = [(types, weights, label_smoothing)]
    if label_smoothing and "sigmoid" in types:
        rest = [(t, w) for t, w in zip(types, weights) if t != "sigmoid"]
        plain = [w for t, w in zip(types, weights) if t == "sigmoid"]
        groups = [(["sigmoid"] * len(plain), plain, 0.0)]
        if rest:
            groups.append(([t for t, _ in rest], [w for _, w in rest], label_smoothing))

    def terms(policy: Tensor, counts: Tensor, take: Take) -> tuple[Tensor, Tensor, Tensor]:
        k = policy.shape[0] // 2
        # per-token normalizing types get the true counts for summed log-probs, 1 for averaged
        n = torch.ones_like(counts) if average_log_prob else counts
        r = None if ref is None else take(ref)
        outs = [preference_loss(policy[:k], policy[k:], None if r is None else r[:k],
                                None if r is None else r[k:], loss_type=g_types,
                                loss_weights=g_weights, beta=beta, label_smoothing=eps,
                                discopop_tau=discopop_tau, reference_free=r is None,
                                chosen_num_tokens=n[:k], rejected_num_tokens=n[k:])
                for g_types, g_weights, eps in groups]
        losses = outs[0].losses if len(outs) == 1 else outs[0].losses + outs[1].losses
        return losses, outs[0].chosen_rewards, outs[0].rejected_rewards

    return _paired(_input, weight, target, bias, terms, average=average_log_prob,
                   nll_weight=alpha if compute_nll_loss else None, fused=fused,
                   ignore_index=ignore_index)


def fused_linear_orpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    nll_target: Tensor | None = None, *, ignore_index: int = -100, beta: float = 0.1,
    compute_nll_loss: bool = True, compiled: bool = True, chunk_size: int = 1,
    design: str = "auto",
) -> tuple[Tensor, Aux]:
    """ORPO from hidden states: NLL + β · mean_b −log σ(L[b]), with the log odds ratio

        L = log odds(π̄_c) − log odds(π̄_r),   log odds(a) = a − log(1 − eᵃ)

    of the per-token average log-probs (``pairwise.odds_ratio_loss``). The NLL (dropped
    with ``compute_nll_loss=False``) is over ``nll_target``'s chosen half when given ([2B, T],
    like ``target``), else over the target's. Rewards are β · π̄; aux adds mean log σ(L) and
    mean L. ``design``: see the module docstring (an ``nll_target`` takes "logps").
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss)
    check_batch(_input, target, paired=True)
    blocker = None
    if nll_target is not None and compute_nll_loss:
        check_batch(_input, nll_target, paired=True, target_name="nll_target")
        blocker = "the NLL has its own labels (nll_target)"
    fused = check_design(design, blocker, hidden=_input, weight=weight, rows_per_unit=2)

    def terms(policy: Tensor, counts: Tensor, take: Take) -> tuple[Tensor]:
        k = policy.shape[0] // 2
        return (beta * pl.odds_ratio_loss(policy[:k], policy[k:])[0],)

    loss, logps, _, nll = design_loss(
        _input, weight, target, bias, terms, paired=True, average=True,
        nll_weight=1.0 if compute_nll_loss else None, fused=fused, ignore_index=ignore_index,
        nll_target=nll_target)
    half = _input.shape[0] // 2
    logps = logps.detach()
    ratio_loss, log_odds = pl.odds_ratio_loss(logps[:half], logps[half:])
    aux = paired_aux(logps, _input, weight, bias, nll, beta * logps[:half], beta * logps[half:])
    return loss, (*aux, (-ratio_loss).mean(), log_odds.mean())


def _cpo_family(_input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, *,
                ignore_index: int, beta: float, alpha: float, label_smoothing: float,
                compute_nll_loss: bool, average_log_prob: bool, loss_type: str,
                gamma: float, design: str) -> tuple[Tensor, Aux]:
    check_batch(_input, target, paired=True)
    if loss_type not in CPO_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {CPO_TYPES}")
    alpha = check_weight("alpha", alpha)
    fused = check_design(design, None, hidden=_input, weight=weight, rows_per_unit=2)

    def terms(policy: Tensor, counts: Tensor, take: Take) -> tuple[Tensor, Tensor, Tensor]:
        k = policy.shape[0] // 2
        n = torch.ones_like(counts) if average_log_prob else counts
        out = cpo_loss(policy[:k], policy[k:], chosen_num_tokens=n[:k],
                       rejected_num_tokens=n[k:], loss_type=loss_type, beta=beta,
                       label_smoothing=label_smoothing, cpo_alpha=0.0, simpo_gamma=gamma)
        return out.losses, out.chosen_rewards, out.rejected_rewards

    return _paired(_input, weight, target, bias, terms, average=average_log_prob,
                   nll_weight=alpha if compute_nll_loss else None, fused=fused,
                   ignore_index=ignore_index)




def fused_linear_cpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
    label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
    average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
    simpo_gamma: float = 0.5, design: str = "auto",
) -> tuple[Tensor, Aux]:
    """CPO from hidden states, reference-free: mean_b ℓ(r_c[b], r_r[b]) + α · NLL, with r = π
    (π̄ with ``average_log_prob``) and, by ``loss_type`` (``cpo_loss``'s):

        sigmoid  −(1 − ε) log σ(β(r_c − r_r)) − ε log σ(−β(r_c − r_r))
        hinge    max(0, 1 − β(r_c − r_r))
        ipo      (r_c/|y_c| − r_r/|y_r| − 1/(2β))²     (r per token)
        simpo    the sigmoid form on β(r_c/|y_c| − r_r/|y_r|) − γ,  γ = ``simpo_gamma``

    Rewards are β · r (r per token for ipo and simpo). ``design``: see the module docstring.
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob)
    return _cpo_family(_input, weight, target, bias, ignore_index=ignore_index, beta=beta,
                       alpha=alpha, label_smoothing=label_smoothing,
                       compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob,
                       loss_type=loss_type, gamma=simpo_gamma, design=design)


def fused_linear_simpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
    label_smoothing: float = 0.0, compute_nll_loss: bool = False, compiled: bool = True,
    gamma: float = 0.5, chunk_size: int = 1, design: str = "auto",
) -> tuple[Tensor, Aux]:
    """SimPO from hidden states: mean_b [−(1 − ε) log σ(z) − ε log σ(−z)] + α · NLL with
    z = β(π̄_c − π̄_r) − γ on the per-token average log-probs; rewards β · π̄. ``design``: see
    the module docstring."""
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss)
    return _cpo_family(_input, weight, target, bias, ignore_index=ignore_index, beta=beta,
                       alpha=alpha, label_smoothing=label_smoothing,
                       compute_nll_loss=compute_nll_loss, average_log_prob=True,
                       loss_type="simpo", gamma=gamma, design=design)


# ----------------------------------------------------------------------------------------------
# unpaired
# ----------------------------------------------------------------------------------------------
def fused_linear_kto_loss(
    _input: Tensor, weight: Tensor, target: Tensor, preference_labels: Tensor,
    bias: Tensor | None = None, ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
    kl: Tensor | float | None = None, *, ignore_index: int = -100, beta: float = 0.1,
    compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
    chunk_size: int = 1, ref_logps: Tensor | None = None, design: str = "auto",
) -> tuple[Tensor, Aux]:
    """KTO from hidden states, mean over the N examples of

        desirable    1 − σ(β(ρ − z₀))        undesirable   1 − σ(β(z₀ − ρ))

    with ρ = π − π_ref (π̄ with ``average_log_prob``; π_ref = 0 with ``use_ref_model=False``)
    and z₀ = max(0, ``kl``) the KL reference point (a 0-d tensor or float, no gradient; 0 when
    None), as ``kto_loss`` computes it. ``preference_labels`` is bool [N], true for desirable.
    The reference is hidden states or precomputed ``ref_logps`` [N]. Rewards are β · ρ.
    ``design``: see the module docstring.
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 use_ref_model=use_ref_model, average_log_prob=average_log_prob)
    check_batch(_input, target, paired=False)
    check_preference_labels(preference_labels, _input)
    fused = check_design(design, None, hidden=_input, weight=weight, rows_per_unit=1)
    ref = reference_logps(use_ref_model, {"ref_logps": ref_logps}, ref_input, ref_weight,
                          ref_bias, target, _input, ignore_index=ignore_index,
                          average=average_log_prob)
    z0 = check_kl(kl, accumulation_dtype(_input, weight), _input.device)

    def terms(policy: Tensor, counts: Tensor, take: Take) -> tuple[Tensor, Tensor]:
        out = kto_loss(policy, torch.zeros_like(policy) if ref is None else take(ref),
                       take(preference_labels), beta=beta, kl=z0)
        return out.losses, out.rewards

    loss, logps, counts, _ = design_loss(
        _input, weight, target, bias, terms, paired=False, average=average_log_prob,
        nll_weight=None, fused=fused, ignore_index=ignore_index)
    logps = logps.detach()
    with torch.no_grad():
        _, rewards = terms(logps, counts, whole_batch)
    desirable, undesirable = preference_labels, ~preference_labels
    logit_sums = logit_sums_per_row(_input, weight, bias)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)

    def side_sum(values: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, values.detach(), zero.to(values.dtype)).sum()

    return loss, (side_sum(logps, desirable), side_sum(logps, undesirable),
                  side_sum(logit_sums, desirable), side_sum(logit_sums, undesirable),
                  side_sum(rewards, desirable), side_sum(rewards, undesirable))


def _paired(_input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, terms, *,
            average: bool, nll_weight: float | None, fused: bool, ignore_index: int
            ) -> tuple[Tensor, Aux]:
    """A paired loss from its per-pair ``terms`` (losses, chosen and rejected rewards): the
    loss by the chosen design, the rewards of the aux tuple from the detached log-probs."""
    loss, logps, counts, nll = design_loss(
        _input, weight, target, bias, terms, paired=True, average=average,
        nll_weight=nll_weight, fused=fused, ignore_index=ignore_index)
    with torch.no_grad():
        _, chosen_rewards, rejected_rewards = terms(logps.detach(), counts, whole_batch)
    return loss, paired_aux(logps, _input, weight, bias, nll, chosen_rewards, rejected_rewards)
