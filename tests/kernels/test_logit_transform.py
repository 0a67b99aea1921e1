"""The logit transform and log Σ p² against their definitions in float64, forward and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastpo.kernels.logit_transform import (
    config_logit_transform,
    log_sum_sq_probs,
    transform_logits,
)


@pytest.mark.parametrize("scale, cap, temperature", [(1.0, None, 1.0), (0.0625, None, 0.7),
                                                     (1.0, 30.0, 1.0), (2.0, 5.0, 0.5)])
def test_transform_matches_its_definition(scale, cap, temperature):
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(6, 50, generator=gen, dtype=torch.float64) * 20).requires_grad_()
    expected = a * scale
    if cap is not None:
        expected = cap * torch.tanh(expected / cap)
    expected = expected / temperature
    z = transform_logits(a.float(), logit_scale=scale, softcap=cap, temperature=temperature)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), expected.detach(), rtol=1e-6, atol=1e-5)
    if cap is not None:  # the cap bounds the logits
        assert z.abs().max() <= cap / temperature
    assert torch.autograd.gradcheck(
        lambda x: transform_logits(x, logit_scale=scale, softcap=cap, temperature=temperature),
        (a,))


def test_log_sum_sq_probs_matches_its_definition():
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(5, 7, 40, generator=gen, dtype=torch.float64) * 8).requires_grad_()
    expected = torch.log((z.softmax(-1) ** 2).sum(-1))
    got = log_sum_sq_probs(z.float())
    assert got.shape == (5, 7)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    lse = torch.logsumexp(z, -1)
    torch.testing.assert_close(log_sum_sq_probs(z, lse), expected)
    assert torch.autograd.gradcheck(log_sum_sq_probs, (z[0, :2],))
    # one-hot limit: log Σ p² → 0; uniform: log(1/V)
    assert log_sum_sq_probs(torch.tensor([[0.0, -1e4, -1e4]])).abs().max() < 1e-6
    uniform = torch.log(torch.tensor([1 / 8]))
    torch.testing.assert_close(log_sum_sq_probs(torch.zeros(1, 8)), uniform)


def test_a_config_names_its_scale_and_cap():
    def read(**attributes):
        return config_logit_transform(SimpleNamespace(**attributes), "TinyLM")

    assert read() == (1.0, None)
    assert read(logit_scale=0.25, final_logit_softcapping=30.0) == (0.25, 30.0)
    assert read(logits_scaling=4.0) == (0.25, None)  # Granite divides
    assert read(final_logit_softcapping=0.0) == (1.0, None)  # 0: no cap
    text = SimpleNamespace(lm_head_multiplier=2.0, get_text_config=lambda: text)
    outer = SimpleNamespace(get_text_config=lambda: text)
    assert config_logit_transform(outer) == (2.0, None)
    for bad in ({"logit_scale": float("nan")}, {"logits_scaling": 0},
                {"final_logit_softcapping": -1.0}, {"logit_scale": True}):
        with pytest.raises(ValueError, match=r"TinyLM: config\.\w+=.* is not a finite number"):
            read(**bad)
