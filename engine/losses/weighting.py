"""The two reweightings of ``preference_loss``'s inputs: WPO's per-pair weights
(``use_weighting``) and LD-DPO's weight α on the log-probs beyond the pair's shared length
(``ld_alpha``), with the tails that LD-DPO reads.

Pure functions of per-sequence (or, for the tails, per-token) log-probs; nothing here reads a
tensor on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import at_least_fp32, check_unit_interval
from .pairwise import per_token


def wpo_weights(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    chosen_log_sum_sq_probs: Tensor,
    rejected_log_sum_sq_probs: Tensor,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
) -> Tensor:
    """WPO pair weight w(x, y_c) · w(x, y_r), detached (Zhou et al., 2024, "WPO",
    arXiv:2406.11827, Eq. 2, with the paper's alignment of the sampling distribution):

        w(x, y) = exp( (1/|y|) Σ_t [ log π(y_t | ·) − log Σ_v π(v | ·)² ] )

    ``*_log_sum_sq_probs`` is, per sequence, Σ_t log Σ_v π(v | ·)² over its scored tokens
    (= Σ_t logsumexp(2 · log_softmax(logits_t))).
    """
    chosen = per_token(at_least_fp32(chosen_logps) - chosen_log_sum_sq_probs, chosen_num_tokens)
    rejected = per_token(
        at_least_fp32(rejected_logps) - rejected_log_sum_sq_probs, rejected_num_tokens
    )
    return torch.exp(chosen + rejected).detach()


def ld_logps(logps: Tensor, tail_logps: Tensor, *, ld_alpha: float) -> Tensor:
    """LD-DPO length-desensitized log-prob: shared + α · tail = logps − (1 − α) · tail (Liu et
    al., 2024, "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411).
    ``tail_logps`` is the part of ``logps`` beyond the pair's shared length (see
    ``shared_length_tail_logps``)."""
    check_unit_interval("ld_alpha", ld_alpha)
    logps = at_least_fp32(logps)
    return logps - (1.0 - ld_alpha) * tail_logps.to(logps.dtype)


def shared_length_tail_logps(
    chosen_token_logps: Tensor,
    rejected_token_logps: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """Sum of the token log-probs beyond the pair's shared length, for ``ld_alpha``.

    Per pair, ℓ = min(|y_c|, |y_r|) completion tokens are shared; the tail of each completion is
    its completion tokens after the ℓ-th (counted in order along the sequence, whatever padding
    or prompt sits between). Inputs are ``[B, T_c]`` / ``[B, T_r]`` token log-probs (e.g. from
    ``fastpo.kernels.token_logps``) and masks that are true on completion tokens. Returns the
    ``[B]`` tail sums of the chosen and of the rejected completions (0 for the shorter one).
    """
    for name, value in (
        ("chosen_token_logps", chosen_token_logps),
        ("rejected_token_logps", rejected_token_logps),
        ("chosen_mask", chosen_mask),
        ("rejected_mask", rejected_mask),
    ):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got {tuple(value.shape)}")
    for side, logps, mask in (
        ("chosen", chosen_token_logps, chosen_mask),
        ("rejected", rejected_token_logps, rejected_mask),
    ):
        if logps.shape != mask.shape:
            raise ValueError(
                f"{side}_mask shape {tuple(mask.shape)} does not match {side}_token_logps shape "
                f"{tuple(logps.shape)}"
            )
    if chosen_token_logps.shape[0] != rejected_token_logps.shape[0]:
        raise ValueError(
            f"chosen_token_logps has {chosen_token_logps.shape[0]} rows but rejected_token_logps "
            f"has {rejected_token_logps.shape[0]}"
        )
    chosen_mask, rejected_mask = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)).unsqueeze(1)

    def tail(token_logps: Tensor, mask: Tensor) -> Tensor:
        token_logps = at_least_fp32(token_logps)
        beyond = mask & (mask.cumsum(dim=1) > shared)
        return torch.where(beyond, token_logps, torch.zeros_like(token_logps)).sum(dim=1)

    return tail(chosen_token_logps, chosen_mask), tail(rejected_token_logps, rejected_mask)
