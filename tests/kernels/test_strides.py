"""Every backend of the from-logits op, on every stride pattern a user can pass, against float64.

Each case builds its logits as a view of a base tensor (a leaf, or for the in-place backward the
output of an op on the leaf, as model logits are), runs ``token_logps`` forward and backward, and
compares the result, the gradient w.r.t. the view and the gradient w.r.t. the base with the same
construction in float64 through ``log_softmax``. The in-place backward must write the gradient over
the logits when they do not overlap themselves, and must leave overlapping (expanded) logits alone
and still return the right gradient.
"""

from __future__ import annotations

import pytest
import torch

import fastpo.kernels as K
from fastpo.kernels import ops
from fastpo.kernels.logprobs_torch import token_logps_reference

B, T, V = 2, 3, 37
N = B * T
IGNORE = -100
# One unit in the last place of each dtype (the gradient is rounded once to it).
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}

# name -> (base shape, view of the base with the logits' shape, [B, T, V] or [N, V])
PATTERNS = {
    "contiguous": ((B, T, V), lambda x: x),
    "shifted_3d": ((B, T + 1, V), lambda x: x[:, :-1]),  # model(ids).logits[:, :-1]
    "sliced_vocab": ((B, T, V + 6), lambda x: x[..., :V]),
    "sliced_vocab_2d": ((N, V + 5), lambda x: x[:, 2:V + 2]),  # row stride > V, offset 2
    "transposed": ((V, T, B), lambda x: x.permute(2, 1, 0)),  # vocab stride T*B
    "transposed_2d": ((V, N), lambda x: x.t()),
    "expanded_batch": ((1, T, V), lambda x: x.expand(B, T, V)),  # stride 0 over the batch
    "expanded_rows_2d": ((1, V), lambda x: x.expand(N, V)),  # every row the same memory
    "offset_storage": ((7 + N * V,), lambda x: x[7:].view(B, T, V)),
}
OVERLAPPING = {"expanded_batch", "expanded_rows_2d"}




def _labels(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=gen)
    labels.view(-1)[::4] = IGNORE  # a quarter of the tokens are not scored
    labels.view(-1)[1] = V - 1
    return labels


def _reference(base, view, labels, grad_out, temperature):
    """float64 (logps, d/dview, d/dbase) through log_softmax of the same view of the same values."""
    leaf = base.detach().double().requires_grad_()
    x = view(leaf * 1)
    x.retain_grad()
    out = token_logps_reference(x, labels, ignore_index=IGNORE, temperature=temperature)
    (out * grad_out).sum().backward()
    return out.detach(), x.grad, leaf.grad


def _view_tolerance(base, view, ref_grad, grad_out, temperature, dtype):
    """Bound on |grad - reference| per logit: fp32 math on (x/T - lse) loses ~|x|/T ulps of the
    softmax term, then the gradient is rounded once to the logits' dtype."""
    x = view(base.double())
    x_scale = 1 + x.abs().amax(-1, keepdim=True) / temperature
    row = grad_out.abs().unsqueeze(-1) / temperature
    return 16 * 2**-23 * row * x_scale + EPS[dtype] * ref_grad.abs()


def _base_tolerance(base, view, tol_view, ref_base_grad, dtype):
    """The view's bound carried back to the base the way the gradient is (summed where the view
    repeats an element), plus one more rounding of the summed gradient to the dtype."""
    zero = torch.zeros(base.shape, dtype=torch.float64, requires_grad=True)
    (carried,) = torch.autograd.grad(view(zero), zero, tol_view)
    return carried + EPS[dtype] * ref_base_grad.abs()


def _run(backend, pattern, dtype, inplace, *, temperature=1.0, label_dtype=torch.int64, seed=0):
    base_shape, view = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    lead = view(base).shape[:-1]
    labels = _labels(lead, seed + 1)
    grad_out = torch.randn(lead, generator=gen, dtype=torch.float64)
    ref, ref_view_grad, ref_base_grad = _reference(base, view, labels, grad_out, temperature)

    leaf = base.clone().requires_grad_()
    x = view(leaf * 1) if inplace else view(leaf)
    x.retain_grad()
    before = x.detach().clone()
    out = K.token_logps(x, labels.to(label_dtype), ignore_index=IGNORE, temperature=temperature,
                        inplace_backward=inplace)
    assert out.dtype == torch.float32 and out.shape == lead
    (out * grad_out.float()).sum().backward()

    fwd_err = (out.double() - ref).abs()
    assert (fwd_err <= 64 * 2**-23 * (1 + ref.abs())).all(), \
        f"{backend}/{pattern}: forward error {fwd_err.max():.3g}"
    assert (out[labels == IGNORE] == 0).all()

    tol = _view_tolerance(base, view, ref_view_grad, grad_out, temperature, dtype)
    err = (x.grad.double() - ref_view_grad).abs()
    assert (err <= tol).all(), f"{backend}/{pattern}: d/dlogits error {(err - tol).max():.3g}"
    assert (x.grad[labels == IGNORE] == 0).all()
    tol_base = _base_tolerance(base, view, tol, ref_base_grad, dtype)
    err_base = (leaf.grad.double() - ref_base_grad).abs()
    assert (err_base <= tol_base).all(), \
        f"{backend}/{pattern}: d/dbase error {(err_base - tol_base).max():.3g}"

    if inplace and pattern not in OVERLAPPING:
        # the gradient was written over the logits' own memory
        assert torch.equal(x.detach(), x.grad)
    else:
        # out of place (asked for, or because expanded logits cannot hold their own gradient):
        # the logits are untouched
        assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fp32_every_stride_pattern(backend, pattern, inplace):
    _run(backend, pattern, torch.float32, inplace)


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize("pattern", ["shifted_3d", "transposed", "expanded_batch",
                                     "sliced_vocab_2d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_stride_patterns(backend, pattern, dtype, inplace):
    _run(backend, pattern, dtype, inplace, seed=3)


@pytest.mark.parametrize("pattern", ["shifted_3d", "expanded_rows_2d", "transposed_2d"])
def test_temperature_and_int32_labels_on_strided_logits(backend, pattern):
    _run(backend, pattern, torch.float32, True, temperature=0.7, label_dtype=torch.int32, seed=5)


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_one_word_vocabulary_with_odd_strides(backend, inplace):
    """V = 1: log-prob 0 and gradient 0 whatever the (meaningless) vocab stride; the logits are
    only overwritten when asked."""
    leaf = torch.randn(1, N, requires_grad=True)
    x = (leaf * 1 if inplace else leaf).t()  # [N, 1], strides (1, N): "contiguous" to torch
    assert x.stride() == (1, N)
    before = x.detach().clone()
    labels = torch.zeros(N, dtype=torch.long)
    labels[::2] = IGNORE
    out = K.token_logps(x, labels, inplace_backward=inplace)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(N)) and torch.equal(leaf.grad, torch.zeros(1, N))
    assert inplace or torch.equal(x.detach(), before)


def test_direct_inplace_op_refuses_overlapping_logits(backend):
    """The in-place backward op itself refuses logits that share memory between elements."""
    logits = torch.randn(1, V).expand(N, V)
    labels = _labels((N,), 9)
    _, lse, _ = torch.ops.fastpo.logps_forward(logits, labels, IGNORE, 1.0, False)
    with pytest.raises(ValueError, match=r"strides \(0, 1\)\) share memory between elements"):
        torch.ops.fastpo.logps_backward_(torch.ones(N), logits, labels, lse, IGNORE, 1.0)


def test_overlap_detection():
    overlaps = ops.overlaps_itself
    x = torch.randn(4, 6, 10)
    assert not overlaps(x) and not overlaps(x[:, :-1]) and not overlaps(x.transpose(0, 2))
    assert not overlaps(x[..., 2:7]) and not overlaps(x[1:].view(-1, 10)[3:])
    assert not overlaps(torch.randn(1, 10).expand(1, 10))  # size-1 dims never overlap
    assert overlaps(torch.randn(1, 6, 10).expand(4, 6, 10))
    assert overlaps(torch.randn(16).as_strided((4, 10), (1, 1)))
    assert overlaps(torch.randn(30).as_strided((3, 10), (8, 1)))  # rows overlap by 2
    assert not overlaps(torch.randn(30).as_strided((3, 10), (10, 1)))
