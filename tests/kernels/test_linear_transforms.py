"""Logit transforms inside the fused linear op: logit scale s, soft-cap c, temperature T.

    z = c · tanh((h Wᵀ + b) · s / c) / T        (without a cap: (h Wᵀ + b) · s / T)

Every design (the chunked CPU path with PyTorch or native tiles, the Triton tile kernels under
Triton's interpreter, the GEMM design with PyTorch or Triton row passes) against a float64
reference that builds the whole logits with the transform, forward and gradients for hidden,
weight and bias, in fp32 and bf16; saturated tanh; ignored rows exact zeros; bad arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from test_linear_logprobs import (
    BF16_RTOL,
    IGNORE,
    leaf,
    make_case,
    needs_interpreter,
    needs_native,
)

from fastpo.kernels import linear_sequence_logps, linear_token_logps, use_cpu_backend
from fastpo.kernels.linear_logprobs_triton import _tanh

# (backend of use_cpu_backend, design)
PATHS = [
    pytest.param(("torch", "auto"), id="chunked-torch"),
    pytest.param(("native", "auto"), id="chunked-native", marks=needs_native),
    pytest.param(("triton", "tile"), id="tile", marks=needs_interpreter),
    pytest.param(("torch", "gemm"), id="gemm-torch-rows"),
    pytest.param(("triton", "gemm"), id="gemm-triton-rows", marks=needs_interpreter),
]
# (softcap, logit_scale, temperature)
TRANSFORMS = [(2.5, 1.7, 0.6), (None, 1.7, 0.6), (3.0, 0.4, 1.3), (2.0, 1.0, 1.0)]


def reference(hidden, weight, labels, bias, *, softcap, logit_scale, temperature):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    scored = labels != IGNORE
    picked = logp.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def run(path, hidden, weight, bias, labels, transform, **kw):
    backend, design = path
    softcap, scale, temperature = transform
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    refs = [leaf(x.double()) if x is not None else None for x in (hidden, weight, bias)]
    with use_cpu_backend(backend):
        got = linear_token_logps(ours[0], ours[1], labels, bias=ours[2], softcap=softcap,
                                 logit_scale=scale, temperature=temperature, design=design,
                                 **kw)
        upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
        got.backward(upstream)
    want = reference(refs[0], refs[1], labels, refs[2], softcap=softcap, logit_scale=scale,
                     temperature=temperature)
    want.backward(upstream.double())
    return got, ours, want, refs


def check(got, ours, want, refs, dtype, atol=2e-6):
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=2e-5)
    for name, mine, ref in zip(("hidden", "weight", "bias"), ours, refs):
        if mine is None:
            continue
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        rtol, tol = (BF16_RTOL, 1e-6) if dtype == torch.bfloat16 else (1e-5, atol)
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=rtol, atol=tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_matches_float64(path, transform, dtype):
    hidden, weight, bias, labels = make_case(b=2, t=9, h=24, v=97, dtype=dtype)
    labels[1, 2:] = IGNORE
    got, ours, want, refs = run(path, hidden, weight, bias, labels, transform,
                                chunk_tokens=4, chunk_vocab=40)
    check(got, ours, want, refs, dtype)
    ignored = labels == IGNORE
    assert torch.equal(got[ignored], torch.zeros_like(got[ignored]))
    assert torch.equal(ours[0].grad[ignored], torch.zeros_like(ours[0].grad[ignored]))


@pytest.mark.parametrize("path", PATHS)
def test_saturated_softcap(path):
    """Logits of a few hundred under a cap of 5: tanh is ±1 to fp32 precision on most entries
    (no overflow in any tanh form), the gradient flows only through the unsaturated ones."""
    hidden, weight, bias, labels = make_case(b=1, t=8, h=16, v=70)
    weight = weight * 60.0
    weight[:5] = weight[:5] / 600.0  # a few vocab rows stay inside the cap's linear range
    labels[0, 4:] = torch.tensor([0, 2, 50, 69])
    got, ours, want, refs = run(path, hidden, weight, bias, labels, (5.0, 1.5, 0.9),
                                chunk_tokens=3, chunk_vocab=32)
    assert torch.isfinite(got).all()
    check(got, ours, want, refs, torch.float32, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_sequence_logps_with_transform_and_hidden_nan_at_padding(path):
    """Per-sequence sums take the transform; a NaN hidden state at an ignored position leaks
    into nothing (the capped GEMM backward multiplies G by its slope)."""
    hidden, weight, bias, labels = make_case(b=2, t=7, h=12, v=45)
    hidden[1, 0] = float("nan")
    labels[1, 0] = IGNORE
    backend, design = path
    h = leaf(hidden)
    with use_cpu_backend(backend):
        out = linear_sequence_logps(h, weight, labels, bias=bias, softcap=4.0, logit_scale=0.5,
                                    temperature=0.8, design=design, chunk_tokens=4,
                                    chunk_vocab=16)
        out.logps.sum().backward()
    clean = hidden.clone()
    clean[1, 0] = 0.0
    want = reference(clean, weight, labels, bias, softcap=4.0, logit_scale=0.5,
                     temperature=0.8).sum(-1)
    torch.testing.assert_close(out.logps.double(), want, rtol=1e-5, atol=2e-5)
    assert torch.isfinite(h.grad[labels != IGNORE]).all()
    assert torch.equal(h.grad[1, 0], torch.zeros(12))


def test_no_transform_is_the_plain_op():
    hidden, weight, bias, labels = make_case(b=2, t=6, h=10, v=33)
    with use_cpu_backend("torch"):
        plain = linear_token_logps(hidden, weight, labels, bias=bias, temperature=0.7)
        explicit = linear_token_logps(hidden, weight, labels, bias=bias, temperature=0.7,
                                      softcap=None, logit_scale=1.0)
    assert torch.equal(plain, explicit)


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _tanh(tl.load(x_ptr + offs)))


@needs_interpreter
def test_triton_tanh_against_float64():
    x = torch.tensor([-1e30, -1e4, -60.0, -9.0, -1.0, -1e-3, -1e-30, 0.0, 1e-7, 2e-4, 0.3, 4.0,
                      15.0, 88.0, 1e4, float("inf")])
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, N=16)
    want = torch.tanh(x.double())
    assert torch.isfinite(y).all()
    assert ((y.double() - want).abs() <= 2.5e-7).all(), (y.double() - want)
    assert float(y[0]) == -1.0 and float(y[-1]) == 1.0 and float(y[7]) == 0.0


@pytest.mark.parametrize("name, value, error", [
    ("softcap", 0.0, ValueError), ("softcap", -2.0, ValueError),
    ("softcap", float("inf"), ValueError), ("softcap", float("nan"), ValueError),
    ("softcap", True, TypeError), ("softcap", "30", TypeError),
    ("logit_scale", 0.0, ValueError), ("logit_scale", -0.5, ValueError),
    ("logit_scale", math.inf, ValueError), ("logit_scale", None, TypeError),
])
def test_bad_transform_arguments(name, value, error):
    hidden, weight, _bias, labels = make_case(b=1, t=4, h=8, v=11)
    with pytest.raises(error, match=name):
        linear_token_logps(hidden, weight, labels, **{name: value})
    with pytest.raises(error, match=name):
        linear_sequence_logps(hidden, weight, labels, **{name: value})
