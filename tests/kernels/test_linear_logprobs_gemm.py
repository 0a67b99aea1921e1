"""The GEMM design of the fused linear op (``design="gemm"``) against the float64 reference.

On CPU tensors the GEMMs are plain torch matmuls; the row passes run in PyTorch ("torch") or in
the from-logits Triton kernels through Triton's interpreter ("triton", ``TRITON_INTERPRET=1``),
which is the code the CUDA path runs. Chunks are forced small so that every test crosses token
chunk and vocab slice boundaries; odd H and V throughout.
"""

from __future__ import annotations

import pytest
import torch
from test_linear_logprobs import (
    IGNORE,
    assert_matches,
    leaf,
    make_case,
    needs_interpreter,
    reference,
    run_both,
)

from fastpo.kernels import (
    linear_logprobs_gemm,
    linear_sequence_logps,
    linear_token_logps,
    use_cpu_backend,
)
from fastpo.kernels.linear_logprobs_gemm import (
    gemm_linear_logps_backward,
    gemm_linear_logps_forward,
)

ROWS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, temperature", [(True, 0.7), (False, 1.0)])
def test_gemm_matches_reference(rows, dtype, bias, temperature):
    hidden, weight, bias_t, labels = make_case(b=2, t=11, h=37, v=203, dtype=dtype, bias=bias)
    labels[1] = IGNORE  # a whole row of the batch ignored
    labels[0, 6], labels[0, 7] = 49, 50  # labels on both sides of a vocab slice boundary
    result = run_both(hidden, weight, bias_t, labels, temperature=temperature, backend=rows,
                      chunk_tokens=3, chunk_vocab=50, design="gemm")
    assert_matches(*result, dtype)
    assert torch.equal(result[0][1], torch.zeros(11))
    assert torch.equal(result[1][0].grad[1], torch.zeros(11, 37, dtype=dtype))


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_automatic_chunks_from_a_small_budget(rows, monkeypatch):
    hidden, weight, bias, labels = make_case(b=2, t=17, h=24, v=333)
    step, width = linear_logprobs_gemm.plan(hidden.reshape(-1, 24), weight, 28, 0, 0, True, True)
    assert (step, width) == (28, 333)  # the default budget holds the whole problem
    monkeypatch.setattr(linear_logprobs_gemm, "BUDGET_BYTES", 12_000)
    step, width = linear_logprobs_gemm.plan(hidden.reshape(-1, 24), weight, 28, 0, 0, True, True)
    assert step < 28 and width < 333  # several chunks and slices
    result = run_both(hidden, weight, bias, labels, backend=rows, design="gemm")
    assert_matches(*result, torch.float32)


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_minus_inf_logits(rows):
    hidden, weight, bias, labels = make_case(b=2, t=9, h=16, v=77)
    scored_labels = set(labels[labels != IGNORE].tolist())
    banned = [v for v in range(77) if v not in scored_labels][:20]
    bias[banned] = float("-inf")
    result = run_both(hidden, weight, bias, labels, backend=rows, chunk_tokens=4,
                      chunk_vocab=16, design="gemm")
    assert_matches(*result, torch.float32)
    assert torch.isfinite(result[1][1].grad).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_every_row_computed_gives_exact_zeros(rows, dtype):
    """``rows=None`` (CUDA without a host-known count): ignored rows are computed and zeroed."""
    hidden, weight, bias, labels = make_case(b=2, t=9, h=19, v=61, dtype=dtype)
    h2, flat = hidden.reshape(-1, 19), labels.reshape(-1)
    scored = (flat != IGNORE).nonzero().squeeze(1)
    grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(2))
    with use_cpu_backend(rows):
        triton_rows = rows == "triton"
        kw = {"triton_rows": triton_rows, "chunk_tokens": 5, "chunk_vocab": 20}
        all_f = gemm_linear_logps_forward(h2, weight, bias, flat, IGNORE, 0.9, rows=None, **kw)
        sel_f = gemm_linear_logps_forward(h2, weight, bias, flat, IGNORE, 0.9, rows=scored, **kw)
        args = (grad, h2, weight, bias, flat, sel_f[1], IGNORE, 0.9, True, True, True)
        all_b = gemm_linear_logps_backward(*args, rows=None, **kw)
        sel_b = gemm_linear_logps_backward(*args, rows=scored, **kw)
    ignored = flat == IGNORE
    for a, b in zip(all_f[:2], sel_f[:2]):  # (logps, lse; no statistics asked)
        assert torch.equal(a[ignored], torch.zeros(int(ignored.sum())))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert torch.equal(all_b[0][ignored], torch.zeros_like(all_b[0][ignored]))
    for a, b in zip(all_b, sel_b):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    want = reference(h2, weight, flat, bias, 0.9)
    torch.testing.assert_close(all_f[0].double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rows", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_gemm_all_masked_and_empty(rows):
    for tokens in (5, 0):
        hidden, weight, bias, _ = make_case(b=2, t=5, h=24, v=50, dtype=torch.bfloat16)
        hidden = hidden[:, :tokens]
        labels = torch.full((2, tokens), IGNORE)
        ins = [leaf(hidden), leaf(weight), leaf(bias)]
        with use_cpu_backend(rows):
            out = linear_sequence_logps(ins[0], ins[1], labels, bias=ins[2], design="gemm")
            out.logps.sum().backward()
        assert torch.equal(out.logps, torch.zeros(2))
        for t in ins:
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_gemm_float64_gradcheck():
    hidden, weight, bias, labels = make_case(b=2, t=3, h=5, v=7, dtype=torch.float64)
    labels[0, 0] = IGNORE

    def fn(h, w, b):
        return linear_token_logps(h, w, labels, bias=b, temperature=0.7, chunk_tokens=2,
                                  chunk_vocab=3, design="gemm")

    assert torch.autograd.gradcheck(fn, (leaf(hidden), leaf(weight), leaf(bias)))


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_tied_embedding_and_non_contiguous(rows):
    gen = torch.Generator().manual_seed(3)
    vocab, dim = 53, 17
    ids = torch.randint(0, vocab, (3, 10), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :3] = IGNORE
    embed0 = torch.randn(vocab, dim, generator=gen)

    def loss_of(embed, logps_fn):
        hidden = torch.tanh(embed[ids])[:, :-1]  # the shifted view: not contiguous
        assert not hidden.is_contiguous()
        return (logps_fn(hidden, embed) ** 2).sum()

    embed = torch.nn.Parameter(embed0.clone())
    with use_cpu_backend(rows):
        loss_of(embed, lambda h, w: linear_token_logps(
            h, w, labels[:, :-1], chunk_tokens=4, chunk_vocab=16, design="gemm")).backward()
    embed_d = leaf(embed0.double())
    loss_of(embed_d, lambda h, w: reference(h, w, labels[:, :-1])).backward()
    torch.testing.assert_close(embed.grad.double(), embed_d.grad, rtol=1e-5,
                               atol=1e-5 * float(embed_d.grad.abs().max()))


# --------------------------------------------------------------------------- determinism, choice


@needs_interpreter
def test_deterministic_routes_to_gemm_and_is_bit_identical(monkeypatch):
    hidden, weight, bias, labels = make_case(b=2, t=8, h=20, v=90)
    calls = []
    real = linear_logprobs_gemm.gemm_linear_logps_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import fastpo.kernels.linear_logprobs as lin

    monkeypatch.setattr(lin, "gemm_linear_logps_backward", spy)
    grads = []
    for _ in range(2):
        ins = [leaf(hidden), leaf(weight), leaf(bias)]
        with use_cpu_backend("triton"):
            out = linear_token_logps(ins[0], ins[1], labels, bias=ins[2], deterministic=True)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads.append([t.grad for t in ins])
    assert len(calls) == 2  # the tile backward (atomics) was not used
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    want = reference(hidden, weight, labels, bias)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)


def test_design_argument_errors():
    hidden, weight, _bias, labels = make_case(b=1, t=4, h=6, v=11)
    with pytest.raises(ValueError, match="unknown design 'fast'"):
        linear_token_logps(hidden, weight, labels, design="fast")
    with pytest.raises(ValueError, match="cannot be deterministic"):
        linear_token_logps(hidden, weight, labels, design="tile", deterministic=True)
    with use_cpu_backend("torch"), pytest.raises(ValueError, match="needs the Triton backend"):
        linear_token_logps(hidden, weight, labels, design="tile")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        linear_token_logps(hidden, weight, labels, deterministic=1)


@pytest.mark.parametrize("rows", ROWS)
def test_gemm_bf16_logits_gradient_within_its_rounding_bound(rows):
    """The CUDA path rounds the logits gradient G to bf16 (the tensor-core operand dtype): every
    gradient element stays within one bf16 rounding of each G term (|G|·|W| summed, times the
    rounding step) plus the final cast, against the float64 reference. The step is 2⁻⁸ for
    round-to-nearest (PyTorch; Triton on a GPU) and 2⁻⁷ under Triton's interpreter, whose
    fp32 → bf16 conversion truncates (checked in the test below)."""
    hidden, weight, bias, labels = make_case(b=2, t=9, h=29, v=131, dtype=torch.bfloat16)
    h2, flat = hidden.reshape(-1, 29), labels.reshape(-1)
    grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(4))
    scored = (flat != IGNORE).nonzero().squeeze(1)
    kw = {"triton_rows": rows == "triton", "chunk_tokens": 5, "chunk_vocab": 40}
    with use_cpu_backend(rows):
        _, lse, _ = gemm_linear_logps_forward(h2, weight, bias, flat, IGNORE, 0.8, rows=scored,
                                              **kw)
        got = gemm_linear_logps_backward(grad, h2, weight, bias, flat, lse, IGNORE, 0.8, True,
                                         True, True, rows=scored, grad_dtype=torch.bfloat16, **kw)
    hd, wd, bd = (x.double() for x in (h2, weight, bias))
    z = (hd @ wd.t() + bd) / 0.8
    keep = (flat != IGNORE).double().unsqueeze(1)
    onehot = torch.nn.functional.one_hot(flat.clamp(min=0), 131).double()
    g_ref = keep * grad.double().unsqueeze(1) * (onehot - torch.softmax(z, -1)) / 0.8
    want = (g_ref @ wd, g_ref.t() @ hd, g_ref.sum(0))
    step = 2**-7 if rows == "triton" else 2**-8
    bounds = (step * (g_ref.abs() @ wd.abs()), step * (g_ref.abs().t() @ hd.abs()),
              step * g_ref.abs().sum(0))
    for name, ours, ref, bound in zip(("hidden", "weight", "bias"), got, want, bounds):
        assert ours.dtype == torch.bfloat16
        err = (ours.double() - ref).abs()
        limit = bound + 2**-8 * ref.abs() + 1e-7
        assert (err <= limit).all(), f"grad {name}: worst excess {float((err - limit).max())}"
    assert torch.equal(got[0][flat == IGNORE], torch.zeros_like(got[0][flat == IGNORE]))


@needs_interpreter
def test_interpreter_bf16_conversion_truncates():
    """Why the interpreter's rounding step above is 2⁻⁷: its fp32 → bf16 store truncates."""
    from fastpo.kernels.logprobs_triton import triton_logps_backward

    logits = torch.tensor([[0.0, 0.0, 0.0]])
    out = torch.empty(1, 3, dtype=torch.bfloat16)
    # g (onehot − 1/3) with g = 3·(1 + 2⁻⁸ + 2⁻¹⁰): the exact value is not a bf16 number
    g = torch.tensor([3.0 * (1 + 2**-8 + 2**-10)])
    triton_logps_backward(g, logits, torch.tensor([5]), torch.log(torch.tensor([3.0])), -100,
                          1.0, out)
    exact = -g / 3
    assert out[0, 0] != exact.bfloat16()[0]  # not round-to-nearest
    assert abs(float(out[0, 0]) - float(exact)) < 2**-7 * abs(float(exact))


# --------------------------------------------------------------------------- rows: every row / hint


def _gemm_run(hidden, weight, bias, labels, rows, **kw):
    ins = [leaf(hidden), leaf(weight), leaf(bias)]
    with use_cpu_backend(rows):
        out = linear_token_logps(ins[0], ins[1], labels, bias=ins[2], temperature=0.8,
                                 chunk_tokens=4, chunk_vocab=24, design="gemm", **kw)
        out.backward(torch.linspace(-1, 2, out.numel()).reshape(out.shape))
    return out, ins


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_with_and_without_the_num_scored_hint(rows, dtype, monkeypatch):
    """Default: every row is computed (no host count, no sync); ``num_scored``: the scored rows
    compacted on the device. Both against float64, with -inf logits (a banned-token bias) and
    ignored rows whose hidden states are NaN / inf: exact zeros there, nothing leaks into the
    weight and bias gradients."""
    import fastpo.kernels.linear_logprobs as lin

    hidden, weight, bias, labels = make_case(b=2, t=9, h=21, v=97, dtype=dtype)
    scored_labels = set(labels[labels != IGNORE].tolist())
    bias[[v for v in range(97) if v not in scored_labels][:15]] = float("-inf")
    seen = []
    real = lin.gemm_linear_logps_backward

    def spy(*args, rows=None, **kwargs):
        seen.append(rows)
        return real(*args, rows=rows, **kwargs)

    monkeypatch.setattr(lin, "gemm_linear_logps_backward", spy)
    ignored = labels == IGNORE
    count = int((~ignored).sum())
    ref_in = [leaf(x.double()) for x in (hidden, weight, bias)]
    want = reference(*ref_in[:2], labels, ref_in[2], 0.8)
    want.backward(torch.linspace(-1, 2, want.numel(), dtype=torch.float64).reshape(want.shape))
    results = {}
    for hint in (None, count):
        got, ins = _gemm_run(hidden, weight, bias, labels, rows, num_scored=hint)
        assert_matches(got, ins, want, ref_in, dtype)
        assert torch.equal(got[ignored], torch.zeros(int(ignored.sum())))
        assert torch.equal(ins[0].grad[ignored], torch.zeros_like(ins[0].grad[ignored]))
        results[hint] = (got, [t.grad for t in ins])
    assert seen[0] is None  # no hint: every row
    assert torch.equal(seen[1], (~ignored).reshape(-1).nonzero().squeeze(1))  # the scored rows

    poisoned = hidden.clone()
    poisoned[0, 1] = float("nan")  # prompt positions: ignored
    poisoned[1, -1] = float("inf")  # padding
    assert ignored[0, 1] and ignored[1, -1]
    for hint in (None, count):
        got, ins = _gemm_run(poisoned, weight, bias, labels, rows, num_scored=hint)
        for a, b in zip((got, *(t.grad for t in ins)), (results[hint][0], *results[hint][1])):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("design", ["gemm", "auto"])
def test_a_wrong_num_scored_hint_is_refused(design):
    hidden, weight, bias, labels = make_case(b=2, t=6, h=8, v=30)
    count = int((labels != IGNORE).sum())
    for hint in (count - 1, count + 1, 0):
        with pytest.raises(ValueError, match=rf"num_scored={hint} does not match the labels: "
                                             rf"{count} of 12 labels are scored"):
            linear_token_logps(hidden, weight, labels, bias=bias, num_scored=hint, design=design)
    for bad in (-1, 13, 2.0, True):
        with pytest.raises(ValueError, match=r"num_scored must be None or an int in \[0, 12\]"):
            linear_token_logps(hidden, weight, labels, num_scored=bad)
    out = linear_sequence_logps(hidden, weight, labels, num_scored=count, design=design)
    want = reference(hidden, weight, labels).sum(-1)
    torch.testing.assert_close(out.logps.double(), want, rtol=1e-5, atol=1e-4)
