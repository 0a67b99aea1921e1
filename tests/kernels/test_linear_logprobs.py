"""The fused linear logprob op (hidden states + lm_head weight) against a float64 reference.

Reference: ``hidden @ weightᵀ (+ bias)`` → ``/ T`` → ``log_softmax`` → gather, in float64 on the
same input values, differentiated by autograd. The CPU (chunked matmul) path runs with tiles forced
small so that every test crosses several token chunks and vocab slices; the Triton kernels run
through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in ``tests/conftest.py``)
with small shapes. Their GPU compilation is held by ``test_compile_gates.py``.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from fastpo.kernels import native, use_cpu_backend
from fastpo.kernels.linear_logprobs import (
    TILE_BYTES,
    choose_chunks,
    linear_sequence_logps,
    linear_token_logps,
)

IGNORE = -100
BF16_RTOL = 2.0**-7  # two bf16 rounding steps: the inputs are exact, the gradient is cast once

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton kernels on CPU need TRITON_INTERPRET=1")
needs_native = pytest.mark.skipif(
    not native.AVAILABLE, reason=f"native CPU kernel not built: {native.UNAVAILABLE_REASON}")
# The chunked CPU path computes its tiles' log-sum-exp and dlogits with the native row kernels
# ("native") or with PyTorch ops ("torch").
CPU_TILES = ["torch", pytest.param("native", marks=needs_native)]


def make_case(b=3, t=13, h=40, v=299, *, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype)
    bias_t = torch.randn(v, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :4] = IGNORE  # prompt
    labels[-1, -3:] = IGNORE  # padding
    labels[0, t - 1] = v - 1  # the last vocab entry, in the last (partial) vocab slice
    return hidden, weight, bias_t, labels


def reference(hidden, weight, labels, bias=None, temperature=1.0):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z / temperature, dim=-1)
    scored = labels != IGNORE
    picked = logp.gather(-1, torch.where(scored, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def run_both(hidden, weight, bias, labels, *, temperature=1.0, backend="torch", **chunks):
    """(ours: logps + grads, reference: logps + grads) for one upstream gradient."""
    ours_in = [leaf(hidden), leaf(weight), leaf(bias)]
    ref_in = [leaf(x.double()) if x is not None else None for x in (hidden, weight, bias)]
    with use_cpu_backend(backend):
        got = linear_token_logps(ours_in[0], ours_in[1], labels, bias=ours_in[2],
                                 temperature=temperature, **chunks)
        upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
        got.backward(upstream)
    want = reference(ref_in[0], ref_in[1], labels, ref_in[2], temperature)
    want.backward(upstream.double())
    return got, ours_in, want, ref_in


def assert_matches(got, ours_in, want, ref_in, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The forward is computed in fp32 from the exact input values, whatever their dtype.
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=2e-5)
    for name, ours, ref in zip(("hidden", "weight", "bias"), ours_in, ref_in):
        if ours is None:
            continue
        assert ours.grad is not None and ours.grad.dtype == dtype, name
        rtol, atol = (BF16_RTOL, 1e-6) if dtype == torch.bfloat16 else (1e-5, 2e-6)
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# --------------------------------------------------------------------------- CPU path


@pytest.mark.parametrize("tiles", CPU_TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cpu_matches_reference(dtype, bias, temperature, tiles):
    hidden, weight, bias_t, labels = make_case(dtype=dtype, bias=bias)
    result = run_both(hidden, weight, bias_t, labels, temperature=temperature, backend=tiles,
                      chunk_tokens=7, chunk_vocab=50)
    assert_matches(*result, dtype)


def test_cpu_automatic_chunks_and_int32_labels_and_2d_input():
    hidden, weight, bias, labels = make_case(b=1, t=33, h=17, v=1001)
    result = run_both(hidden[0], weight, bias, labels[0].to(torch.int32))
    assert result[0].shape == (33,)
    assert_matches(*result, torch.float32)


def test_cpu_non_contiguous_inputs():
    hidden, weight, bias, labels = make_case(t=14)
    shifted = hidden[:, :-1]  # the usual shifted view, not contiguous
    weight_t = weight.t().contiguous().t()  # strides (1, V)
    assert not shifted.is_contiguous() and not weight_t.is_contiguous()
    result = run_both(shifted, weight_t, bias, labels[:, :-1], chunk_tokens=5, chunk_vocab=64)
    assert_matches(*result, torch.float32)


def test_gradcheck_float64():
    hidden, weight, bias, labels = make_case(b=2, t=3, h=4, v=7, dtype=torch.float64)
    labels[0, 0] = IGNORE

    def fn(h, w, b):
        return linear_token_logps(h, w, labels, bias=b, temperature=0.7, chunk_tokens=2,
                                  chunk_vocab=3)

    assert torch.autograd.gradcheck(fn, (leaf(hidden), leaf(weight), leaf(bias)))


@pytest.mark.parametrize("tiles", [*CPU_TILES, pytest.param("triton", marks=needs_interpreter)])
def test_minus_inf_logits_and_nan_propagation(tiles):
    hidden, weight, bias, labels = make_case(b=2, t=9, h=16, v=77)
    scored_labels = set(labels[labels != IGNORE].tolist())
    banned = [v for v in range(77) if v not in scored_labels][:20]
    bias[banned] = float("-inf")  # logits of -inf (a banned-token mask folded into the bias)
    result = run_both(hidden, weight, bias, labels, backend=tiles, chunk_tokens=4,
                      chunk_vocab=16)
    assert_matches(*result, torch.float32)
    assert torch.isfinite(result[1][1].grad).all()

    assert labels[1, 5] != IGNORE
    hidden[1, 5, 3] = float("nan")
    with use_cpu_backend(tiles):
        got = linear_token_logps(hidden, weight, labels, bias=bias, chunk_tokens=4,
                                 chunk_vocab=16)
    assert torch.isnan(got[1, 5]) and torch.isfinite(got[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [*CPU_TILES, pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("tokens", [5, 0])
def test_all_masked_batch(backend, dtype, tokens):
    hidden, weight, bias, _ = make_case(b=2, t=5, h=24, v=50, dtype=dtype)
    hidden = hidden[:, :tokens]
    labels = torch.full((2, tokens), IGNORE)
    ins = [leaf(hidden), leaf(weight), leaf(bias)]
    with use_cpu_backend(backend):
        out = linear_sequence_logps(ins[0], ins[1], labels, bias=ins[2], reduction="mean")
        out.logps.sum().backward()
    assert torch.equal(out.logps, torch.zeros(2)) and torch.equal(out.num_tokens, torch.zeros(2,
                                                                                    dtype=torch.long))
    for t in ins:
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


# --------------------------------------------------------------------------- Triton (interpreter)


@needs_interpreter
def test_triton_fp32_bias_temperature_non_contiguous():
    hidden, weight, bias, labels = make_case(b=2, t=11, h=24, v=100)
    hidden = hidden[:, :-1]
    weight = weight.t().contiguous().t()
    result = run_both(hidden, weight, bias, labels[:, :-1], temperature=0.7, backend="triton")
    assert_matches(*result, torch.float32)


@needs_interpreter
def test_triton_bf16_no_bias():
    hidden, weight, _, labels = make_case(b=2, t=10, h=40, v=70, dtype=torch.bfloat16,
                                          bias=False)
    result = run_both(hidden, weight, None, labels, backend="triton")
    assert_matches(*result, torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_forward_vocab_splits(splits):
    from fastpo.kernels.linear_logprobs_triton import triton_linear_logps_forward

    hidden, weight, bias, labels = make_case(b=1, t=19, h=20, v=150)
    logps, lse = triton_linear_logps_forward(hidden[0], weight, bias, labels[0], IGNORE, 1.3,
                                             splits=splits)
    want = reference(hidden[0], weight, labels[0], bias, 1.3)
    torch.testing.assert_close(logps.double(), want, rtol=1e-5, atol=2e-5)
    z = (hidden[0].double() @ weight.double().t() + bias.double()) / 1.3
    want_lse = torch.where(labels[0] != IGNORE, torch.logsumexp(z, -1), 0.0)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_in_vocab_chunks(dtype):
    """The backward in launches of 40 vocab rows (tiles of 32: chunks end inside a tile, the last
    chunk is short); a bf16 weight goes through the per-chunk fp32 accumulator."""
    hidden, weight, bias, labels = make_case(b=2, t=9, h=24, v=100, dtype=dtype)
    labels[0, 5], labels[1, 6] = 39, 40  # labels on both sides of a chunk boundary
    result = run_both(hidden, weight, bias, labels, backend="triton", chunk_vocab=40)
    assert_matches(*result, dtype)


def test_weight_grad_chunk():
    from fastpo.kernels.linear_logprobs_triton import weight_grad_chunk

    assert weight_grad_chunk(128256, 4096) == 16384  # 256 MiB of fp32 rows
    assert weight_grad_chunk(1000, 4096) == 1000
    assert weight_grad_chunk(128256, 4096, requested=500) == 500
    assert weight_grad_chunk(300, 16, requested=500) == 300
    assert weight_grad_chunk(10, 2**30) == 1


def test_launch_config_per_architecture():
    from fastpo.kernels.linear_logprobs_launch import arch_of, launch_config

    assert [arch_of(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0))] == [80, 80, 80, 90, 90]
    # sm_80 half backward: 16 warps (mma.sync accumulators in registers); sm_90: 8 on wgmma
    assert launch_config("backward", torch.bfloat16, "ieee", 80) == (128, 128, 32, 16, 2)
    assert launch_config("backward", torch.float16, "ieee", 90) == (128, 128, 32, 8, 3)
    assert launch_config("forward", torch.float32, "ieee", 90)[2] == 16  # FMA: BLOCK_H 16
    assert launch_config("backward", torch.float32, "tf32", 86) == \
        launch_config("backward", torch.float32, "tf32", 80)
    with pytest.raises(ValueError, match=r"no launch configuration.*float64"):
        launch_config("forward", torch.float64, "ieee", 90)


# --------------------------------------------------------------------------- autograd behaviour


def test_no_grad_forward_saves_nothing():
    hidden, weight, _, labels = make_case(b=2, t=6, h=8, v=30)
    hidden, weight = leaf(hidden), leaf(weight)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            out = linear_token_logps(hidden, weight, labels)
        assert out.grad_fn is None and packed == []
        frozen = linear_token_logps(hidden.detach(), weight.detach(), labels)
        assert frozen.grad_fn is None and packed == []
        trained = linear_token_logps(hidden, weight, labels)  # control: this one saves
        assert trained.grad_fn is not None and len(packed) >= 3
    # Nothing holds the inputs after a no-grad forward.
    probe = torch.randn(12, 8)
    ref = weakref.ref(probe)
    with torch.no_grad():
        linear_token_logps(probe, weight, labels.reshape(-1))
    del probe
    gc.collect()
    assert ref() is None


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, _, labels = make_case(b=2, t=8, h=12, v=45)
    h, w = leaf(hidden), weight.clone()
    linear_token_logps(h, w, labels, chunk_tokens=3, chunk_vocab=20).sum().backward()
    hd = leaf(hidden.double())
    reference(hd, weight, labels).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-5, atol=2e-6)

    w = leaf(weight)
    linear_token_logps(hidden, w, labels).sum().backward()
    wd = leaf(weight.double())
    reference(hidden, wd, labels).sum().backward()
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_tied_embedding_gradients_add_up(backend):
    gen = torch.Generator().manual_seed(3)
    vocab, dim = 53, 16
    ids = torch.randint(0, vocab, (3, 10), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :3] = IGNORE
    embed0 = torch.randn(vocab, dim, generator=gen)
    mix0 = torch.randn(dim, dim, generator=gen) / dim**0.5

    def loss_of(embed, mix, logps_fn):
        hidden = torch.tanh(embed[ids] @ mix)
        logps = logps_fn(hidden, embed)
        return -torch.nn.functional.logsigmoid(logps[0] - logps[1]) + logps[2] ** 2 / 100

    embed, mix = torch.nn.Parameter(embed0.clone()), torch.nn.Parameter(mix0.clone())
    with use_cpu_backend(backend):
        loss_of(embed, mix, lambda h, w: linear_sequence_logps(
            h, w, labels, chunk_tokens=4, chunk_vocab=16).logps).backward()
    embed_d, mix_d = leaf(embed0.double()), leaf(mix0.double())
    loss_of(embed_d, mix_d, lambda h, w: reference(h, w, labels).sum(-1)).backward()
    # The model part (gather, matmul, tanh) runs in fp32 here and in fp64 in the reference.
    for got, want in ((embed.grad, embed_d.grad), (mix.grad, mix_d.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))
    # Both uses contribute: rows of tokens absent from the input get only the lm_head gradient.
    absent = torch.ones(vocab, dtype=torch.bool)
    absent[ids.unique()] = False
    assert absent.any() and embed.grad[absent].abs().sum() > 0


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = make_case(b=2, t=7, h=12, v=40)

    def loss_fn(h, w, b):
        out = linear_sequence_logps(h, w, labels, bias=b, temperature=0.9)
        return -torch.nn.functional.logsigmoid(out.logps[0] - out.logps[1])

    eager_in = [leaf(x) for x in (hidden, weight, bias)]
    compiled_in = [leaf(x) for x in (hidden, weight, bias)]
    loss_fn(*eager_in).backward()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- sequence API


def test_sequence_reductions_logits_sum_and_packed():
    hidden, weight, bias, labels = make_case(b=3, t=9, h=10, v=33)
    labels[1] = IGNORE
    per_token = reference(hidden, weight, labels, bias)
    scored = labels != IGNORE
    counts = scored.sum(-1)
    out = linear_sequence_logps(hidden, weight, labels, bias=bias, with_logits_sum=True)
    torch.testing.assert_close(out.logps.double(), per_token.sum(-1), rtol=1e-5, atol=1e-4)
    assert torch.equal(out.num_tokens, counts)
    logits = hidden.double() @ weight.double().t() + bias.double()
    want_sum = (logits.sum(-1) * scored).sum(-1)
    torch.testing.assert_close(out.logits_sum.double(), want_sum, rtol=1e-5, atol=1e-3)
    mean = linear_sequence_logps(hidden, weight, labels, bias=bias, reduction="mean")
    torch.testing.assert_close(mean.logps.double(), per_token.sum(-1) / counts.clamp(min=1),
                               rtol=1e-5, atol=2e-5)
    assert mean.logps[1] == 0 and not torch.isnan(mean.logps).any()
    # Packed: the three rows as one, told apart by sequence ids.
    ids = torch.arange(3).repeat_interleave(9).reshape(1, 27)
    packed = linear_sequence_logps(hidden.reshape(1, 27, 10), weight, labels.reshape(1, 27),
                                   bias=bias, sequence_ids=ids, num_sequences=3)
    torch.testing.assert_close(packed.logps, out.logps, rtol=1e-6, atol=1e-5)


def test_choose_chunks():
    tokens, cols = choose_chunks(4096, 49152)
    assert tokens * cols * 4 <= TILE_BYTES and tokens >= 512 and cols % 64 == 0
    assert choose_chunks(10, 7) == (10, 7)
    assert choose_chunks(100, 1000, chunk_tokens=30, chunk_vocab=200) == (30, 200)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must be float"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError,
     r"expected weight of shape \[V, 6\]"),
    (lambda a: a.update(weight=torch.empty(0)), ValueError, "weight must have shape"),
    (lambda a: a.update(labels=a["labels"][:, :-1]), ValueError, "labels shape"),
    (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels must be int64"),
    (lambda a: a.update(bias=torch.zeros(3)), ValueError, "bias shape"),
    (lambda a: a.update(temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda a: a.update(chunk_tokens=-1), ValueError, "chunk_tokens must be an int"),
    (lambda a: a["labels"].__setitem__((1, 2), 11), ValueError, r"label 11 at position \(1, 2\)"),
    (lambda a: a.update(reduction="max"), ValueError, "unknown reduction"),
])
def test_bad_input(change, error, match):
    hidden, weight, bias, labels = make_case(b=2, t=4, h=6, v=11)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias}
    change(args)
    with pytest.raises(error, match=match):
        linear_sequence_logps(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
