"""Losses and metrics over rankings of K ≥ 2 completions of one prompt, from per-sequence logps.

    out = plackett_luce_loss(policy_logps, ref_logps, order, beta=0.1)   # one loss per item
    metrics = ranking_metrics(rewards, better, worse, item, num_items)

The Plackett–Luce form of DPO (the DPO paper's ranking objective): with implicit rewards
``r_k = β·(log π(c_k|x) − log π_ref(c_k|x))`` and the ranking ``τ`` (best first), an item's loss is

    ℓ = − Σ_{k=1}^{K−1} [ r_τ(k) − log Σ_{j ≥ k} exp r_τ(j) ]

— the negative log-likelihood of the ranking under the Plackett–Luce model of the rewards; for
K = 2 it is DPO's sigmoid loss. The loss is the mean over items. The pairwise alternative (the
mean of any DPO pair loss over the pairs a pair rule picks, every pair weighted equally) is
``preference_loss`` on the per-sequence values gathered by pair index.

``order`` ``[I, K_max]`` holds each item's sequence indices best first, ``-1`` past its K (items
of different K in one batch). Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastpo.kernels.dtypes import accumulation_dtype

from .inputs import check_logps
from .options import OptionError


class ListwiseOutput(NamedTuple):
    """``loss`` (the mean of ``losses``), per-item ``losses`` ``[I]``, detached per-sequence
    ``rewards`` ``[S]`` and the metrics."""

    loss: Tensor
    losses: Tensor
    rewards: Tensor
    metrics: dict[str, Tensor]


def plackett_luce_losses(rewards: Tensor, order: Tensor) -> Tensor:
    """Per-item Plackett–Luce negative log-likelihood ``[I]`` of the rankings ``order`` under
    the scores ``rewards`` ``[S]`` (any dtype; computed in it)."""
    if order.dim() != 2 or order.dtype != torch.long:
        raise TypeError(f"order must be an int64 [items, K] tensor, got {order.dtype} "
                        f"{tuple(order.shape)}")
    valid = order >= 0
    r = torch.where(valid, rewards[order.clamp(min=0)], rewards.new_zeros(()))  # [I, K]
    k = order.shape[1]
    pos = torch.arange(k, device=order.device)
    # suffix [I, k, j]: the items j ≥ k still to place; a padding position sees only itself (a
    # finite 0, so no -inf enters the log-sum-exp or its gradient), and its term is dropped
    suffix = (pos[None, :] >= pos[:, None])[None] & (valid[:, None, :]
                                                      | torch.eye(k, dtype=torch.bool,
                                                                  device=order.device)[None])
    scores = r[:, None, :].expand(-1, k, -1).masked_fill(~suffix, float("-inf"))
    terms = r - torch.logsumexp(scores, dim=-1)
    return -(terms * valid).sum(-1)


def plackett_luce_loss(policy_logps: Tensor, ref_logps: Tensor | None, order: Tensor, *,
                       beta: float = 0.1) -> ListwiseOutput:
    """DPO's Plackett–Luce ranking loss over the items of ``order`` (see the module docstring);
    ``ref_logps`` None is reference-free (``r = β·log π``)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise OptionError("beta", f"beta must be a positive number, got {beta!r}")
    like = check_logps("policy_logps", policy_logps)
    if ref_logps is not None:
        check_logps("ref_logps", ref_logps, like=like)
    dtype = accumulation_dtype(policy_logps, ref_logps)
    ratio = policy_logps.to(dtype)
    if ref_logps is not None:
        ratio = ratio - ref_logps.to(dtype)
    rewards = beta * ratio
    losses = plackett_luce_losses(rewards, order.to(rewards.device))
    metrics = {"logps/mean": policy_logps.detach().to(dtype).mean()}
    return ListwiseOutput(losses.mean(), losses, rewards.detach(), metrics)


def ranking_metrics(rewards: Tensor, better: Tensor, worse: Tensor, item: Tensor,
                    num_items: int) -> dict[str, Tensor]:
    """Per-item ranking metrics (detached, on the device) over every strictly ordered pair
    ``(better[q], worse[q])`` of item ``item[q]``:

    ``rewards/ranking_accuracy``   fraction of items whose rewards order all their pairs right
    ``rewards/pair_accuracy``      fraction of all strictly ordered pairs ordered right
    """
    rewards = rewards.detach()
    wrong = (rewards[better] <= rewards[worse]).to(rewards.dtype)
    per_item = rewards.new_zeros(num_items).index_add_(0, item, wrong)
    return {"rewards/ranking_accuracy": (per_item == 0).to(rewards.dtype).mean(),
            "rewards/pair_accuracy": 1.0 - wrong.mean() if wrong.numel()
            else rewards.new_ones(())}
