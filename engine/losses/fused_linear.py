"""Preference losses straight from final hidden states and the lm_head: functional forms.

Each function takes the policy's last hidden states ``_input [rows, T, H]``, the head ``weight
[V, H]`` (and ``bias [V]``), the shifted ``target [rows, T]`` (``ignore_index`` on prompt and
padding tokens) and returns ``(loss, aux)``: the scalar loss and a tuple of detached metrics.
The paired losses take ``rows = 2B``: the B chosen completions first, then the B rejected ones in
the same order. Log-probs come from ``fastpo.kernels.linear_sequence_logps`` (logits never built
whole), the losses from ``fastpo.engine.losses``; the module wrappers are in ``modules``.

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
``chunk_size`` are accepted for call compatibility; the op already streams the vocabulary in tiles.
Defaults are those of the functional forms this mirrors; two differ from the modules' (SimPO's
``compute_nll_loss``: False here, True in the module; KTO's ``use_ref_model``: True here, False
in the module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastpo.kernels.linear_logprobs import linear_sequence_logps

from . import pairwise as pl
from .inputs import check_weight
from .registry import LOSS_TYPES, cpo_loss, kto_loss, preference_loss

Aux = tuple[Tensor, ...]
CPO_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_SMOOTHED_IN_DPO = ("robust", "exo_pair", "aot", "aot_unpaired")  # where label_smoothing enters

__all__ = [
    "fused_linear_cpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
]


# ----------------------------------------------------------------------------------------------
# validation (metadata and Python values only)
# ----------------------------------------------------------------------------------------------
def check_common(*, ignore_index: int, beta: float, compiled: bool, chunk_size: int,
                 **flags: bool) -> None:
    """The options every loss shares; ``flags`` are further bool options by name."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    pl.check_beta(beta)
    for name, value in {"compiled": compiled, **flags}.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def dpo_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None,
                   label_smoothing: float, average_log_prob: bool,
                   ) -> tuple[list[str], list[float]]:
    """Validated DPO loss types and their weights."""
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a name or a list of names from {list(LOSS_TYPES)}, "
                        f"got {loss_type!r}")
    if not types:
        raise ValueError(f"loss_type is empty; give one or more of {list(LOSS_TYPES)}")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; valid loss types are {list(LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    elif isinstance(loss_weights, str) or not isinstance(loss_weights, Sequence):
        raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
    elif len(loss_weights) != len(types):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has "
                         f"{len(types)} ({types}); give one weight per loss type")
    else:
        weights = [check_weight(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights)]
    pl.check_label_smoothing(label_smoothing)
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (EXO recommends 1e-3)")
    if "sft" in types and average_log_prob:
        raise ValueError("loss_type 'sft' is the NLL of the summed log-probs and is not defined "
                         "with average_log_prob=True; use compute_nll_loss=True with alpha")
    return types, weights


def _check_batch(_input: object, target: object, *, paired: bool, name: str = "_input",
                 target_name: str = "target") -> None:
    if not isinstance(_input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name} and {target_name} must be tensors, got "
                        f"{type(_input).__name__} and {type(target).__name__}")
    rows = "2B" if paired else "N"
    if _input.dim() != 3:
        raise ValueError(f"{name} must have shape [{rows}, T, H], got {tuple(_input.shape)}")
    if tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"{target_name} shape {tuple(target.shape)} does not match {name} shape "
                         f"{tuple(_input.shape)}: expected {tuple(_input.shape[:2])}")
    if _input.shape[0] == 0:
        raise ValueError(f"{name} is empty: a batch needs at least one sequence")
    if paired and _input.shape[0] % 2:
        raise ValueError(f"{name} has {_input.shape[0]} rows: a paired loss needs 2B rows, the B "
                         "chosen completions first, then the B rejected ones")


def _check_ref_logps(name: str, value: object, rows: int, like: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but _input on {like.device}")
    return value.detach()


# ----------------------------------------------------------------------------------------------
# log-probs and statistics from the hidden states
# ----------------------------------------------------------------------------------------------
def _logps(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, *,
           ignore_index: int, average: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(π or π̄ per row, π per row, scored-token counts per row)."""
    out = linear_sequence_logps(hidden, weight, target, bias=bias, ignore_index=ignore_index)
    sums, counts = out.logps, out.num_tokens
    return (pl.per_token(sums, counts) if average else sums), sums, counts


def _ref_logps(use_ref_model: bool, given: dict[str, Tensor | None], ref_input: Tensor | None,
               ref_weight: Tensor | None, ref_bias: Tensor | None, target: Tensor, _input: Tensor,
               *, ignore_index: int, average: bool) -> Tensor | None:
    """Reference log-probs per row: precomputed ones, else from the reference hidden states
    (no gradient), else None without a reference model."""
    have = {k: v for k, v in given.items() if v is not None}
    if not use_ref_model:
        if have or ref_input is not None:
            raise ValueError(f"use_ref_model=False but reference inputs were given "
                             f"({[*have, *(['ref_input'] if ref_input is not None else [])]})")
        return None
    if have:
        if len(have) != len(given):
            raise ValueError(f"give all of {list(given)} or none; got only {list(have)}")
        if ref_input is not None:
            raise ValueError(f"give either ref_input (with ref_weight) or {list(given)}, not both")
        rows = target.shape[0] // len(given)
        return torch.cat([_check_ref_logps(k, v, rows, _input) for k, v in given.items()])
    if ref_input is None or ref_weight is None:
        raise ValueError("use_ref_model=True needs ref_input and ref_weight (the reference "
                         f"model's hidden states and head), or precomputed {list(given)}")
    _check_batch(ref_input, target, paired=False, name="ref_input")
    with torch.no_grad():
        return _logps(ref_input, ref_weight, target, ref_bias, ignore_index=ignore_index,
                      average=average)[0]


def _logit_sums(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Per row, Σ over every position t and vocabulary entry v of the logits, in closed form:
    (Σ_t h_t) · (Σ_v W_v) + T · Σ_v b_v (no gradient, no logits built)."""
    with torch.no_grad():
        acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        sums = hidden.sum(dim=1, dtype=acc) @ weight.sum(dim=0, dtype=acc)
        if bias is not None:
            sums = sums + hidden.shape[1] * bias.sum(dtype=acc)
        return sums


def _chosen_nll(sums: Tensor, counts: Tensor, hidden: Tensor, weight: Tensor,
                bias: Tensor | None, nll_target: Tensor | None, *, ignore_index: int) -> Tensor:
    """NLL per scored chosen token (``nll_target``'s chosen half when given, else the target)."""
    half = hidden.shape[0] // 2
    if nll_target is not None:
        _check_batch(hidden, nll_target, paired=True, target_name="nll_target")
        _, sums, counts = _logps(hidden[:half], weight, nll_target[:half], bias,
                                 ignore_index=ignore_index, average=False)
        return pl.nll_loss(sums, chosen_num_tokens=counts)[0]
    return pl.nll_loss(sums[:half], chosen_num_tokens=counts[:half])[0]


def _paired_aux(logps: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                nll: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Aux:
    half, positions = hidden.shape[0] // 2, hidden.shape[1]
    logit_sums = _logit_sums(hidden, weight, bias)
    scale = half * positions * weight.shape[0]
    logps = logps.detach()
    return (logps[:half], logps[half:], logit_sums[:half].sum() / scale,
            logit_sums[half:].sum() / scale, nll.detach(), chosen_rewards.detach(),
            rejected_rewards.detach())


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
    Rewards are β · ρ. Returns ``(loss, aux)`` (see the module docstring).
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss, use_ref_model=use_ref_model,
                 average_log_prob=average_log_prob)
    alpha = check_weight("alpha", alpha)
    types, weights = dpo_loss_types(loss_type, loss_weights, label_smoothing, average_log_prob)
    _check_batch(_input, target, paired=True)
    half = _input.shape[0] // 2
    logps, sums, counts = _logps(_input, weight, target, bias, ignore_index=ignore_index,
                                 average=average_log_prob)
    ref = _ref_logps(use_ref_model, {"ref_chosen_logps": ref_chosen_logps,
                                     "ref_rejected_logps": ref_rejected_logps},
                     ref_input, ref_weight, ref_bias, target, _input,
                     ignore_index=ignore_index, average=average_log_prob)
    ref_c, ref_r = (None, None) if ref is None else (ref[:half], ref[half:])
    # Per-token normalizing types get the true counts for summed log-probs, 1 for averaged ones.
    n = torch.ones_like(counts) if average_log_prob else counts
    # ε per loss type: split the sigmoid term off when ε > 0 (it is not smoothed here).
    groups = [(types, weights, label_smoothing)]
    if label_smoothing and "sigmoid" in types:
        rest = [(t, w) for t, w in zip(types, weights) if t != "sigmoid"]
        plain = [w for t, w in zip(types, weights) if t == "sigmoid"]
        groups = [(["sigmoid"] * len(plain), plain, 0.0)]
        if rest:
            groups.append(([t for t, _ in rest], [w for _, w in rest], label_smoothing))
    outs = [preference_loss(logps[:half], logps[half:], ref_c, ref_r, loss_type=g_types,
                            loss_weights=g_weights, beta=beta, label_smoothing=eps,
                            discopop_tau=discopop_tau, reference_free=ref is None,
                            chosen_num_tokens=n[:half], rejected_num_tokens=n[half:])
            for g_types, g_weights, eps in groups]
    loss = outs[0].loss if len(outs) == 1 else outs[0].loss + outs[1].loss
    nll = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if compute_nll_loss:
        nll = _chosen_nll(sums, counts, _input, weight, bias, None, ignore_index=ignore_index)
        loss = loss + alpha * nll
    return loss, _paired_aux(logps, _input, weight, bias, nll, outs[0].chosen_rewards,
                             outs[0].rejected_rewards)


def fused_linear_orpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    nll_target: Tensor | None = None, *, ignore_index: int = -100, beta: float = 0.1,
    compute_nll_loss: bool = True, compiled: bool = True, chunk_size: int = 1,
) -> tuple[Tensor, Aux]:
    """ORPO from hidden states: NLL + β · mean_b −log σ(L[b]), with the log odds ratio

        L = log odds(π̄_c) − log odds(π̄_r),   log odds(a) = a − log(1 − eᵃ)

    of the per-token average log-probs (``pairwise.odds_ratio_loss``). The NLL (dropped
    with ``compute_nll_loss=False``) is over ``nll_target``'s chosen half when given ([2B, T],
    like ``target``), else over the target's. Rewards are β · π̄; aux adds mean log σ(L) and
    mean L.
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss)
    _check_batch(_input, target, paired=True)
    half = _input.shape[0] // 2
    logps, sums, counts = _logps(_input, weight, target, bias, ignore_index=ignore_index,
                                 average=True)
    ratio_loss, log_odds = pl.odds_ratio_loss(logps[:half], logps[half:])
    loss = beta * ratio_loss.mean()
    nll = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if compute_nll_loss:
        nll = _chosen_nll(sums, counts, _input, weight, bias, nll_target,
                          ignore_index=ignore_index)
        loss = loss + nll
    aux = _paired_aux(logps, _input, weight, bias, nll, beta * logps[:half], beta * logps[half:])
    return loss, (*aux, (-ratio_loss).detach().mean(), log_odds.detach().mean())


def _cpo_family(_input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, *,
                ignore_index: int, beta: float, alpha: float, label_smoothing: float,
                compute_nll_loss: bool, average_log_prob: bool, loss_type: str,
                gamma: float) -> tuple[Tensor, Aux]:
    _check_batch(_input, target, paired=True)
    if loss_type not in CPO_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {CPO_TYPES}")
    alpha = check_weight("alpha", alpha)
    half = _input.shape[0] // 2
    logps, sums, counts = _logps(_input, weight, target, bias, ignore_index=ignore_index,
                                 average=average_log_prob)
    n = torch.ones_like(counts) if average_log_prob else counts
    out = cpo_loss(logps[:half], logps[half:], chosen_num_tokens=n[:half],
                   rejected_num_tokens=n[half:], loss_type=loss_type, beta=beta,
                   label_smoothing=label_smoothing, cpo_alpha=0.0, simpo_gamma=gamma)
    loss = out.loss
    nll = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if compute_nll_loss:
        nll = _chosen_nll(sums, counts, _input, weight, bias, None, ignore_index=ignore_index)
        loss = loss + alpha * nll
    return loss, _paired_aux(logps, _input, weight, bias, nll, out.chosen_rewards,
                             out.rejected_rewards)


def fused_linear_cpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
    label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
    average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Aux]:
    """CPO from hidden states, reference-free: mean_b ℓ(r_c[b], r_r[b]) + α · NLL, with r = π
    (π̄ with ``average_log_prob``) and, by ``loss_type`` (``cpo_loss``'s):

        sigmoid  −(1 − ε) log σ(β(r_c − r_r)) − ε log σ(−β(r_c − r_r))
        hinge    max(0, 1 − β(r_c − r_r))
        ipo      (r_c/|y_c| − r_r/|y_r| − 1/(2β))²     (r per token)
        simpo    the sigmoid form on β(r_c/|y_c| − r_r/|y_r|) − γ,  γ = ``simpo_gamma``

    Rewards are β · r (r per token for ipo and simpo).
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob)
    return _cpo_family(_input, weight, target, bias, ignore_index=ignore_index, beta=beta,
                       alpha=alpha, label_smoothing=label_smoothing,
                       compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob,
                       loss_type=loss_type, gamma=simpo_gamma)


def fused_linear_simpo_loss(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
    label_smoothing: float = 0.0, compute_nll_loss: bool = False, compiled: bool = True,
    gamma: float = 0.5, chunk_size: int = 1,
) -> tuple[Tensor, Aux]:
    """SimPO from hidden states: mean_b [−(1 − ε) log σ(z) − ε log σ(−z)] + α · NLL with
    z = β(π̄_c − π̄_r) − γ on the per-token average log-probs; rewards β · π̄."""
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 compute_nll_loss=compute_nll_loss)
    return _cpo_family(_input, weight, target, bias, ignore_index=ignore_index, beta=beta,
                       alpha=alpha, label_smoothing=label_smoothing,
                       compute_nll_loss=compute_nll_loss, average_log_prob=True,
                       loss_type="simpo", gamma=gamma)


# ----------------------------------------------------------------------------------------------
# unpaired
# ----------------------------------------------------------------------------------------------
def fused_linear_kto_loss(
    _input: Tensor, weight: Tensor, target: Tensor, preference_labels: Tensor,
    bias: Tensor | None = None, ref_input: Tensor | None = None,
    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
    kl: Tensor | float | None = None, *, ignore_index: int = -100, beta: float = 0.1,
    compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
    chunk_size: int = 1, ref_logps: Tensor | None = None,
) -> tuple[Tensor, Aux]:
    """KTO from hidden states, mean over the N examples of

        desirable    1 − σ(β(ρ − z₀))        undesirable   1 − σ(β(z₀ − ρ))

    with ρ = π − π_ref (π̄ with ``average_log_prob``; π_ref = 0 with ``use_ref_model=False``)
    and z₀ = max(0, ``kl``) the KL reference point (a 0-d tensor or float, no gradient; 0 when
    None), as ``kto_loss`` computes it. ``preference_labels`` is bool [N], true for desirable.
    The reference is hidden states or precomputed ``ref_logps`` [N]. Rewards are β · ρ.
    """
    check_common(ignore_index=ignore_index, beta=beta, compiled=compiled, chunk_size=chunk_size,
                 use_ref_model=use_ref_model, average_log_prob=average_log_prob)
    _check_batch(_input, target, paired=False)
    if not isinstance(preference_labels, Tensor) or preference_labels.dtype != torch.bool:
        got = preference_labels.dtype if isinstance(preference_labels, Tensor) else type(
            preference_labels).__name__
        raise TypeError(f"preference_labels must be a bool tensor [N], got {got}")
    if tuple(preference_labels.shape) != (_input.shape[0],):
        raise ValueError(f"preference_labels must have shape ({_input.shape[0]},), one label per "
                         f"row of _input, got {tuple(preference_labels.shape)}")
    if preference_labels.device != _input.device:
        raise ValueError(f"preference_labels is on {preference_labels.device} but _input on "
                         f"{_input.device}")
    logps, _, _ = _logps(_input, weight, target, bias, ignore_index=ignore_index,
                         average=average_log_prob)
    ref = _ref_logps(use_ref_model, {"ref_logps": ref_logps}, ref_input, ref_weight, ref_bias,
                     target, _input, ignore_index=ignore_index, average=average_log_prob)
    if kl is None:
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    elif isinstance(kl, (int, float)) and not isinstance(kl, bool):
        kl = torch.tensor(float(kl), dtype=logps.dtype, device=logps.device)
    elif not isinstance(kl, Tensor) or kl.numel() != 1 or not kl.is_floating_point():
        raise ValueError(f"kl must be a float or a one-element floating tensor (the KL reference "
                         f"point), got {kl!r}")
    out = kto_loss(logps, torch.zeros_like(logps) if ref is None else ref, preference_labels,
                   beta=beta, kl=kl.detach().reshape(()).to(logps.device))
    desirable, undesirable = preference_labels, ~preference_labels
    logit_sums = _logit_sums(_input, weight, bias)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)

    def side_sum(values: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, values.detach(), zero.to(values.dtype)).sum()

    return out.loss, (side_sum(logps, desirable), side_sum(logps, undesirable),
                      side_sum(logit_sums, desirable), side_sum(logit_sums, undesirable),
                      side_sum(out.rewards, desirable), side_sum(out.rewards, undesirable))
