"""The from-logits log-probability op against a float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch

import fastpo.kernels as K
from fastpo.kernels import ops
from fastpo.kernels.logprobs_torch import token_logps_reference

BACKENDS = ["triton", "torch", "native"]
# One unit in the last place, relative: the rounding bound of a result stored in that dtype (one
# ulp rather than half: Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest).
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 2**-52}




def make_inputs(shape, vocab, dtype, *, seed=0, masked_fraction=0.3, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < masked_fraction] = -100
    return logits, labels


def reference_and_grad(logits, labels, grad_out, **kw):
    x = logits.detach().double().requires_grad_()
    out = token_logps_reference(x, labels, **kw)
    (out * grad_out.double()).sum().backward()
    # autograd through torch.where sends NaN from a NaN row into ignored rows; they get exactly 0
    scored = (labels != kw.get("ignore_index", -100)).unsqueeze(-1)
    return out, torch.where(scored, x.grad, torch.zeros_like(x.grad))


def assert_close_to_reference(ours, ref, *, what):
    """fp32 accumulation and a float32 result: a few dozen fp32 ulps of the value's scale."""
    ours = ours.double()
    tol = 64 * 2**-23 * (1 + ref.abs())
    bad = ~((ours - ref).abs() <= tol) & ~(ours.isnan() & ref.isnan()) & ~(ours == ref)
    assert not bad.any(), f"{what}: max err {(ours - ref).abs()[bad].max()} at {bad.nonzero()[0]}"


def check_op(logits, labels, *, temperature=1.0, inplace=False, seed=1):
    dtype = logits.dtype
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    ref, ref_grad = reference_and_grad(logits, labels, grad_out, temperature=temperature)
    leaf = logits.detach().clone().requires_grad_()
    work = leaf * 1 if inplace else leaf  # in-place backward needs a non-leaf it may overwrite
    out = K.token_logps(work, labels, temperature=temperature, inplace_backward=inplace)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == labels.shape
    assert_close_to_reference(out, ref, what="forward")
    assert (out[labels == -100] == 0).all()
    (out * grad_out.to(out.dtype)).sum().backward()
    # fp32 math on (x - lse) loses ~|x| ulps; the result is then rounded to the logits' dtype.
    grad = leaf.grad.double()
    row_scale = grad_out.double().abs().unsqueeze(-1) / temperature
    x_scale = 1 + logits.double().abs().nan_to_num(posinf=0, neginf=0).amax(-1, keepdim=True)
    tol = 16 * 2**-23 * row_scale * x_scale / temperature + EPS[dtype] * ref_grad.abs()
    err = (grad - ref_grad).abs()
    assert (err <= tol).all(), f"grad err {(err - tol).max()} above tolerance"
    assert (leaf.grad[labels == -100] == 0).all()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_matches_reference_2d_and_3d(backend, dtype, vocab):
    rows = 5 if vocab > 5000 else 9
    logits, labels = make_inputs((rows,), vocab, dtype, seed=vocab)
    check_op(logits, labels)
    logits3, labels3 = make_inputs((2, 3), vocab, dtype, seed=vocab + 1)
    check_op(logits3, labels3)


def test_temperature_and_inplace(backend):
    logits, labels = make_inputs((2, 4), 301, torch.float32, seed=3)
    check_op(logits, labels, temperature=0.7)
    work = logits.clone().requires_grad_(False)
    leaf = work.clone().requires_grad_()
    nonleaf = leaf * 1
    storage = nonleaf.data_ptr()
    out = K.token_logps(nonleaf, labels, temperature=1.3, inplace_backward=True)
    out.sum().backward()
    _, ref_grad = reference_and_grad(logits, labels, torch.ones(labels.shape), temperature=1.3)
    assert torch.allclose(leaf.grad.double(), ref_grad, atol=1e-6)
    # the gradient was written over the logits themselves: their storage now holds it
    assert torch.allclose(torch.as_strided(nonleaf.detach(), nonleaf.shape, nonleaf.stride()),
                          leaf.grad) and nonleaf.data_ptr() == storage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_bf16_and_fp32(backend, dtype):
    logits, labels = make_inputs((3, 5), 777, dtype, seed=11)
    check_op(logits, labels, inplace=True)


def test_all_masked_rows_and_sequences(backend):
    logits, labels = make_inputs((3, 6), 50, torch.float32, seed=4)
    labels[1] = -100
    logits[1, 2] = float("nan")  # ignored positions never leak into results, even NaN
    out, grad = check_op(logits, labels)
    assert (out[1] == 0).all() and (grad[1] == 0).all()
    x = logits.clone().requires_grad_()
    seq = K.sequence_logps(x, labels, reduction="mean")
    assert seq.num_tokens[1] == 0 and seq.logps[1] == 0
    seq.logps.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


def test_neg_inf_logits(backend):
    logits, labels = make_inputs((8,), 97, torch.float32, seed=5)
    logits[:, ::3] = float("-inf")        # masked-out vocabulary entries
    labels[0] = 3                          # label logit is -inf -> logp -inf, finite gradient
    labels[1] = 4
    out, grad = check_op(logits, labels)
    assert out[0] == float("-inf") and torch.isfinite(grad[0]).all()
    # a scored row of only -inf has no distribution: NaN like torch.log_softmax, never finite
    logits[2] = float("-inf")
    labels[2] = 5
    assert torch.isnan(K.token_logps(logits, labels)[2])


def test_nan_and_inf_propagate(backend):
    logits, labels = make_inputs((4,), 33, torch.float32, seed=6, masked_fraction=0.0)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    out = K.token_logps(logits, labels)
    assert torch.isnan(out[1]) and torch.isnan(out[2])
    assert torch.isfinite(out[[0, 3]]).all()


def test_non_contiguous_inputs(backend):
    logits, labels = make_inputs((2, 7), 129, torch.float32, seed=7)
    check_op(logits[:, :-1], labels[:, 1:])                      # shifted view of [B, T, V]
    wide, _ = make_inputs((6,), 200, torch.float32, seed=8)
    check_op(wide[:, 10:139], labels[0, :6].clamp(max=128))       # row stride > V
    tr = logits[0].t().contiguous().t()                           # vocab stride != 1
    assert tr.stride(-1) != 1
    check_op(tr, labels[0])
    check_op(logits[0], labels[0].to(torch.int32))               # int32 labels


def test_gradcheck_float64(backend):
    logits, labels = make_inputs((1, 3), 6, torch.float64, seed=9)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: K.token_logps(x, labels, temperature=0.9), (logits,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda x: K.sequence_logps(x, labels, reduction="mean").logps, (logits,))


def test_sequence_logps_reductions_and_logits_sum(backend):
    logits, labels = make_inputs((3, 5), 61, torch.float32, seed=10)
    labels[2, :] = -100
    ref = token_logps_reference(logits, labels)
    scored = labels != -100
    seq = K.sequence_logps(logits, labels, with_logits_sum=True)
    assert torch.allclose(seq.logps.double(), ref.sum(-1), atol=1e-5)
    assert seq.num_tokens.tolist() == scored.sum(-1).tolist()
    expected_sum = (logits.double().sum(-1) * scored).sum(-1)
    assert torch.allclose(seq.logits_sum.double(), expected_sum, atol=1e-4)
    mean = K.sequence_logps(logits, labels, reduction="mean")
    assert torch.allclose(mean.logps.double(), ref.sum(-1) / scored.sum(-1).clamp(min=1),
                          atol=1e-6)
    # packed: the same sequences laid out in one row, found again through sequence_ids
    packed_logits = logits.reshape(1, 15, 61)
    packed_labels = labels.reshape(1, 15)
    seq_ids = torch.arange(3).repeat_interleave(5).reshape(1, 15)
    packed = K.sequence_logps(packed_logits, packed_labels, sequence_ids=seq_ids, num_sequences=3)
    assert torch.allclose(packed.logps, seq.logps, atol=1e-6)
    assert packed.num_tokens.tolist() == seq.num_tokens.tolist()


def test_large_offsets_beyond_int32(backend):
    """N·V > 2^31 elements: rows past the 2^31-th element are read at the right place."""
    vocab = 2**20 + 3
    rows = 2**31 // vocab + 2
    logits = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    labels = torch.full((rows,), -100)
    last = rows - 1
    logits[last, 5] = 4.0
    logits[last, vocab - 1] = -2.0
    labels[last] = 5
    labels[last - 1] = vocab - 1
    assert logits[last].data_ptr() - logits.data_ptr() > 2**31 * 2
    logps = K.token_logps(logits, labels)
    expected_last = 4.0 - torch.logsumexp(logits[last].double(), 0)
    expected_prev = -torch.log(torch.tensor(float(vocab), dtype=torch.float64))
    assert abs(logps[last].item() - expected_last.item()) < 1e-5
    assert abs(logps[last - 1].item() - expected_prev.item()) < 1e-5
    assert (logps[: last - 1] == 0).all()


def test_torch_compile_fullgraph():
    logits, labels = make_inputs((2, 6), 67, torch.float32, seed=12)

    def loss_fn(x):
        seq = K.sequence_logps(x, labels, reduction="sum")
        return -(seq.logps[0] - seq.logps[1])

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    compiled(x1).backward()
    loss_fn(x2).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-7)
    assert torch.allclose(compiled(logits), loss_fn(logits))


def test_bad_inputs():
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) does not match logits shape"):
        K.token_logps(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be float32, bfloat16, float16 or float64"):
        K.token_logps(torch.zeros(2, 3, 10, dtype=torch.long), labels)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        K.token_logps(logits, labels.float())
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"label 10 at position \(1, 2\) is outside \[0, 10\)"):
        K.token_logps(logits, bad)
    bad[1, 2] = -5
    with pytest.raises(ValueError, match=r"label -5 at position \(1, 2\)"):
        K.token_logps(logits, bad)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        K.sequence_logps(logits, labels, reduction="max")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        K.token_logps(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        K.sequence_logps(logits, labels, temperature=-1.0)
    with pytest.raises(ValueError, match=r"must have shape \[N, V\] or \[B, T, V\]"):
        K.token_logps(torch.randn(10), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match="unknown CPU backend"):
        ops.set_cpu_backend("fortran")


def test_backend_info_names_each_device():
    info = K.backend_info()
    assert set(info) == {"cpu", "cuda"}
    assert info["cpu"]
