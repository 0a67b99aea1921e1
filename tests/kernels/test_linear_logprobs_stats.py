"""Per-token statistics from the fused linear op's own pass (``linear_logprobs_stats``) against a
float64 reference on the full logits: entropy, mean logit, top-1 (ties: the first maximum, also
across vocab slices), log Σ p²; the log-probs and their gradients unchanged by asking for them.
Every design: the chunked CPU path (PyTorch and native tiles), the gemm design (PyTorch and
Triton row passes) and the tile design, whose forward gives way to gemm for the statistics."""

from __future__ import annotations

import pytest
import torch
from test_linear_logprobs import IGNORE, make_case, needs_interpreter, needs_native

from fastpo.kernels import linear_token_logps, use_cpu_backend
from fastpo.kernels.linear_logprobs_stats import linear_token_logps_with_statistics
from fastpo.kernels.logit_transform import transform_logits

CASES = [  # (backend, design)
    ("torch", "auto"),
    pytest.param("native", "auto", marks=needs_native),
    ("torch", "gemm"),
    pytest.param("triton", "gemm", marks=needs_interpreter),
    pytest.param("triton", "tile", marks=needs_interpreter),
]


def reference_stats(hidden, weight, bias, labels, *, temperature, logit_scale, softcap):
    a = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t()
    if bias is not None:
        a = a + bias.double()
    z = transform_logits(a, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logp = z.log_softmax(-1)
    flat = labels.reshape(-1)
    scored = flat != IGNORE
    out = {"entropy": -(logp.exp() * logp).sum(-1), "mean_logits": z.mean(-1),
           "is_top1": z.argmax(-1) == flat.clamp(min=0),
           "log_sum_sq_probs": torch.logsumexp(2 * logp, -1)}
    return {k: torch.where(scored, v, torch.zeros_like(v)).view(labels.shape)
            for k, v in out.items()}


@pytest.mark.parametrize(("backend", "design"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "logit_scale", "softcap"),
                         [(1.0, 1.0, None), (0.7, 1.3, 4.0)])
def test_statistics_match_float64(backend, design, dtype, temperature, logit_scale, softcap):
    hidden, weight, bias, labels = make_case(b=3, t=11, h=37, v=203, dtype=dtype)
    labels[1] = IGNORE  # a whole row ignored
    # a tie across a vocab slice boundary (columns 10 and 150): the first maximum is the top-1
    weight = weight.clone()
    weight[150] = weight[10]
    if bias is not None:
        bias = bias.clone()
        bias[150] = bias[10]
    hidden = hidden.clone()
    hidden[0, 5] = weight[10].float().to(dtype) * 3  # row (0, 5): 10 and 150 tie at the top
    labels[0, 5], labels[0, 6] = 150, 10
    hidden[0, 6] = hidden[0, 5]
    kw = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
              chunk_tokens=4, chunk_vocab=64, design=design)
    with use_cpu_backend(backend):
        h = hidden.clone().requires_grad_(True)
        logps, stats = linear_token_logps_with_statistics(h, weight, labels, **kw)
        logps.sum().backward()
        h_plain = hidden.clone().requires_grad_(True)
        plain = linear_token_logps(h_plain, weight, labels, **kw)
        plain.sum().backward()
    # asking for the statistics changes neither the log-probs nor their gradient: the same
    # numbers (a policy and its reference must agree whether or not one of them asks); the
    # tile design's forward is gemm's with them, equal to fp32 round-off
    if design == "tile":
        torch.testing.assert_close(logps, plain, rtol=1e-6, atol=1e-5)
        error = (h.grad.double() - h_plain.grad.double()).norm() / h_plain.grad.double().norm()
        assert error < 1e-5
    else:
        assert torch.equal(logps, plain) and torch.equal(h.grad, h_plain.grad)
    want = reference_stats(hidden, weight, bias, labels, temperature=temperature,
                           logit_scale=logit_scale, softcap=softcap)
    assert stats.is_top1.dtype == torch.bool and stats.entropy.shape == labels.shape
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        got = getattr(stats, name)
        assert got.requires_grad is False
        # bf16 inputs are computed in fp32 from the bf16 values: the reference takes the same
        # values, so only fp32 round-off separates them
        torch.testing.assert_close(got.double(), want[name], rtol=1e-5, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(stats.is_top1, want["is_top1"])
    assert not stats.is_top1[0, 5] and stats.is_top1[0, 6]  # the tie goes to column 10
    assert torch.equal(stats.entropy[1], torch.zeros(11))  # ignored row: zeros


def test_all_ignored_and_empty_inputs_give_zero_statistics():
    hidden, weight, bias, labels = make_case(b=2, t=5, h=9, v=31)
    labels[:] = IGNORE
    logps, stats = linear_token_logps_with_statistics(hidden, weight, labels, bias=bias)
    assert torch.equal(logps, torch.zeros(2, 5))
    for value in stats:
        assert not value.any()


@pytest.mark.parametrize("design", ["auto", "gemm"])
def test_masked_vocabulary_entries_with_minus_inf_bias(design):
    """A −inf bias (a vocabulary entry a model never predicts): p = 0 there, the entropy and
    log Σ p² stay finite, the mean logit is −inf, as on the full logits."""
    hidden, weight, bias, labels = make_case(b=2, t=7, h=13, v=97)
    bias = bias.clone()
    bias[[0, 40, 96]] = float("-inf")
    labels[labels == 40] = 41
    labels[labels == 0] = 1
    labels[labels == 96] = 95
    _, stats = linear_token_logps_with_statistics(hidden, weight, labels, bias=bias,
                                                  chunk_vocab=32, design=design)
    logp = (hidden.double() @ weight.double().t() + bias.double()).log_softmax(-1)
    scored = labels != IGNORE
    entropy = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)
    torch.testing.assert_close(stats.entropy[scored].double(), entropy[scored], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(stats.log_sum_sq_probs[scored].double(),
                               torch.logsumexp(2 * logp, -1)[scored], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(stats.entropy).all()
    assert (stats.mean_logits[scored] == float("-inf")).all()
