"""Listwise losses (fastpo.engine.losses.listwise): DPO's Plackett–Luce ranking loss and the
per-item ranking metrics against scalar float64 references, forward and gradients, on ragged
rankings (K varying per item), large rewards and float32 inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fastpo.engine.losses.listwise import (
    plackett_luce_loss,
    plackett_luce_losses,
    ranking_metrics,
)
from fastpo.engine.losses.options import OptionError


def ref_plackett_luce(rewards: list[float], ranking: list[int]) -> float:
    """−log P(ranking) under Plackett–Luce with scores ``rewards`` (scalar float64)."""
    total = 0.0
    for k in range(len(ranking) - 1):
        rest = [rewards[j] for j in ranking[k:]]
        top = max(rest)
        lse = top + math.log(sum(math.exp(r - top) for r in rest))
        total -= rewards[ranking[k]] - lse
    return total


def ragged_order(rankings: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rankings)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rankings])


RANKINGS = [[2, 0, 3, 1], [5, 4], [6, 8, 7], [9, 12, 10, 11]]


@pytest.mark.parametrize("scale", [1.0, 60.0], ids=["moderate", "large-rewards"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plackett_luce_matches_the_scalar_reference(scale, dtype):
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(13, generator=g, dtype=torch.float64) * scale).to(dtype)
    ref = (torch.randn(13, generator=g, dtype=torch.float64) * scale).to(dtype)
    policy.requires_grad_(True)
    beta = 0.3
    out = plackett_luce_loss(policy, ref, ragged_order(RANKINGS), beta=beta)
    rewards = [beta * (p - r) for p, r in zip(policy.double().tolist(), ref.double().tolist())]
    expected = [ref_plackett_luce(rewards, r) for r in RANKINGS]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                           "atol": 1e-4}
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64),
                               **tol)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out.loss.backward()
    # float64 autograd reference on the explicit per-item sums
    p64 = policy.detach().double().requires_grad_(True)
    r = beta * (p64 - ref.double())
    loss = torch.stack([-sum(r[rk[k]] - torch.logsumexp(r[rk[k:]], 0)
                             for k in range(len(rk) - 1)) for rk in RANKINGS]).mean()
    loss.backward()
    torch.testing.assert_close(policy.grad.double(), p64.grad, **tol)
    assert not torch.isnan(policy.grad).any()


def test_two_completions_are_dpo_and_reference_free():
    policy = torch.tensor([-3.0, -5.0, -2.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-4.0, -4.5, -2.5, -0.5], dtype=torch.float64)
    order = torch.tensor([[0, 1], [3, 2]])
    out = plackett_luce_loss(policy, ref, order, beta=0.5)
    margins = 0.5 * torch.tensor([(-3 + 4) - (-5 + 4.5), (-1 + 0.5) - (-2 + 2.5)],
                                 dtype=torch.float64)
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(margins))
    free = plackett_luce_loss(policy, None, order, beta=0.5)
    torch.testing.assert_close(free.rewards, 0.5 * policy)


def test_padding_never_leaks_nan_and_bad_options_are_named():
    rewards = torch.tensor([0.0, 1000.0, -1000.0], requires_grad=True)
    losses = plackett_luce_losses(rewards, torch.tensor([[1, 0, -1, -1], [2, -1, -1, -1]]))
    assert losses[1].item() == 0.0  # a single completion: nothing to rank
    losses.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    with pytest.raises(OptionError, match="beta must be a positive number"):
        plackett_luce_loss(rewards, None, torch.tensor([[0, 1]]), beta=0)
    with pytest.raises(TypeError, match="order must be an int64"):
        plackett_luce_losses(rewards, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="policy_logps must be a floating tensor"):
        plackett_luce_loss(torch.tensor([1, 2]), None, torch.tensor([[0, 1]]))


def test_ranking_metrics_per_item():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.7], dtype=torch.float64)
    # item 0: 0 > 2 > 1 (right), item 1: 3 > 4 (wrong)
    better, worse = torch.tensor([0, 0, 2, 3]), torch.tensor([2, 1, 1, 4])
    item = torch.tensor([0, 0, 0, 1])
    m = ranking_metrics(rewards, better, worse, item, 2)
    assert m["rewards/ranking_accuracy"].item() == 0.5
    assert m["rewards/pair_accuracy"].item() == 0.75
