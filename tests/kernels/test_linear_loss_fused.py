"""The loss-fused design (``kernels/linear_logprobs_loss_fused.py``) against float64 references.

A sequence-level loss (a sigmoid DPO loss with a reference and an NLL term over the batch's scored
chosen tokens: the batch-level divisors of the fused-linear losses) is computed from hidden states
with every gradient made in the forward, chunk by chunk. Checked against the same loss evaluated
in float64 through autograd: loss, per-sequence log-probs, gradients of hidden, weight and bias,
on odd shapes (V not a power of two), all-masked sequences, half-precision inputs, temperature,
bias, and chunks that split the batch; rows in PyTorch ("torch") or in the from-logits Triton
kernels under Triton's interpreter ("triton", the code CUDA tensors run).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sync_counter import SyncCounter
from test_linear_logprobs import BF16_RTOL, IGNORE, leaf, needs_interpreter, reference

from fastpo.kernels import linear_logprobs_cost as cost
from fastpo.kernels import linear_logprobs_loss_fused as lf
from fastpo.kernels import use_cpu_backend
from fastpo.kernels.linear_logprobs_loss_fused import loss_fused_linear, sequence_token_counts

ROWS = ["torch", pytest.param("triton", marks=needs_interpreter)]
BETA, ALPHA = 0.3, 0.5


def make_pairs(pairs=3, t=9, h=21, v=203, *, dtype=torch.float32, seed=0):
    """2·pairs sequences (chosen, then rejected): prompts, padding, one fully masked sequence."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype)
    bias = (torch.randn(v, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, v, (2 * pairs, t), generator=gen)
    for row in range(2 * pairs):
        labels[row, : 1 + row % 4] = IGNORE
    labels[-1, 5:] = IGNORE  # padding
    labels[1] = IGNORE  # a chosen sequence with no scored token
    labels[0, -1] = v - 1  # the last vocabulary entry
    ref = torch.randn(2 * pairs, generator=gen) * 3
    return hidden, weight, bias, labels, ref


def dpo_terms(logps, ref, total_chosen, num_pairs):
    """Σ_b −log σ(β(ρ_c − ρ_r)) / B + α · (−Σ_b π_c / #chosen tokens) over the given pairs
    (chosen log-probs first): a chunk's share when ``num_pairs`` and ``total_chosen`` are the
    batch's."""
    k = logps.shape[0] // 2
    rho = logps - ref
    margin = BETA * (rho[:k] - rho[k:])
    return (-F.logsigmoid(margin)).sum() / num_pairs + ALPHA * (-logps[:k].sum() / total_chosen)


def fused_loss(hidden, weight, bias, labels, ref, **options):
    pairs = labels.shape[0] // 2
    total = sequence_token_counts(labels, IGNORE)[:pairs].sum().clamp(min=1).to(torch.float32)

    def chunk_loss(chunk):
        index = torch.cat([torch.arange(chunk.start, chunk.stop),
                           pairs + torch.arange(chunk.start, chunk.stop)])
        return dpo_terms(chunk.logps, ref[index], total, pairs)

    return loss_fused_linear(hidden, weight, labels, chunk_loss, bias=bias, paired=True,
                             ignore_index=IGNORE, **options)


def reference_loss(hidden, weight, bias, labels, ref, temperature=1.0):
    token = reference(hidden, weight, labels, bias, temperature)
    logps = token.sum(dim=1)
    pairs = labels.shape[0] // 2
    total = (labels[:pairs] != IGNORE).sum().clamp(min=1).double()
    return dpo_terms(logps, ref.double(), total, pairs), logps


def run_both(hidden, weight, bias, labels, ref, *, rows="torch", temperature=1.0, **options):
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    refs = [leaf(x.double()) if x is not None else None for x in (hidden, weight, bias)]
    with use_cpu_backend(rows):
        out = fused_loss(*ours, labels, ref, temperature=temperature, **options)
        out.loss.backward()
    want, want_logps = reference_loss(*refs, labels, ref, temperature)
    want.backward()
    return out, ours, want, want_logps, refs


def assert_close_to_reference(out, ours, want, want_logps, refs, dtype):
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert not out.logps.requires_grad
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logps.double(), want_logps.detach(), rtol=1e-5, atol=3e-5)
    for name, got, exp in zip(("hidden", "weight", "bias"), ours, refs):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == dtype, name
        rtol, atol = (BF16_RTOL, 1e-6) if dtype != torch.float32 else (1e-5, 2e-6)
        torch.testing.assert_close(got.grad.double(), exp.grad, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_units", [1, 2, 0])
def test_matches_float64_reference(rows, dtype, chunk_units):
    """Chunks of one pair, two pairs (the last chunk partial), or one from the budget."""
    hidden, weight, bias, labels, ref = make_pairs(dtype=dtype)
    result = run_both(hidden, weight, bias, labels, ref, rows=rows, chunk_units=chunk_units)
    assert_close_to_reference(*result, dtype)
    out, ours = result[0], result[1]
    assert torch.equal(out.logps[1], torch.zeros((), dtype=torch.float32))  # all masked
    assert torch.equal(ours[0].grad[1], torch.zeros_like(ours[0].grad[1]))
    assert torch.equal(ours[0].grad[0, 0], torch.zeros_like(ours[0].grad[0, 0]))  # a prompt token


@pytest.mark.parametrize("rows", ROWS)
def test_temperature_logit_scale_and_no_bias(rows):
    hidden, weight, _, labels, ref = make_pairs(pairs=2, t=7, h=16, v=97, seed=3)
    result = run_both(hidden, weight, None, labels, ref, rows=rows, temperature=0.7 / 1.3,
                      chunk_units=1)
    assert_close_to_reference(*result, torch.float32)
    ours = [leaf(hidden), leaf(weight)]
    scaled = fused_loss(*ours, None, labels, ref, temperature=0.7, logit_scale=1.3, chunk_units=1)
    torch.testing.assert_close(scaled.loss, result[0].loss, rtol=1e-6, atol=1e-6)


def test_unpaired_chunks_and_a_non_finite_padding_state():
    """Unpaired units (one sequence each); a NaN hidden state where the label is ignored reaches
    neither the loss nor any gradient."""
    hidden, weight, bias, labels, _ = make_pairs(pairs=2, t=6, h=12, v=51, seed=5)
    hidden[2, 0] = float("nan")  # a prompt position
    target = torch.randn(4, generator=torch.Generator().manual_seed(1))
    ours = [leaf(hidden), leaf(weight), leaf(bias)]

    def chunk_loss(chunk):
        return ((chunk.logps - target[chunk.start:chunk.stop]) ** 2).sum() / 4

    out = loss_fused_linear(*ours[:2], labels, chunk_loss, bias=ours[2], chunk_units=3)
    out.loss.backward()
    refs = [leaf(x.double()) for x in (hidden, weight, bias)]
    refs_clean = refs[0].detach().clone()
    refs_clean[2, 0] = 0.0
    refs[0] = refs_clean.requires_grad_(True)
    logps = reference(refs[0], refs[1], labels, refs[2]).sum(dim=1)
    want = ((logps - target.double()) ** 2).sum() / 4
    want.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for got, exp in zip(ours, refs):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), exp.grad, rtol=1e-5, atol=2e-6)


def test_tied_weights_and_upstream_gradient_scaling():
    """The head tied to the embedding that made the hidden states: autograd adds both uses; the
    stored gradients are scaled by the upstream gradient (here 2.5), once."""
    hidden, weight, _bias, labels, ref = make_pairs(pairs=2, t=5, h=8, v=29, seed=2)
    ids = torch.randint(0, 29, hidden.shape[:2], generator=torch.Generator().manual_seed(4))
    grads = []
    for dtype in (torch.float32, torch.float64):
        w = leaf(weight.to(dtype))
        h = torch.tanh(w[ids] * 2.0)
        if dtype == torch.float32:
            loss = fused_loss(h, w, None, labels, ref, chunk_units=1).loss
        else:
            loss = reference_loss(h, w, None, labels, ref)[0]
        (2.5 * loss).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-5, atol=2e-6)


def test_backward_is_handed_out_once_and_no_grad_computes_only_the_loss():
    hidden, weight, _bias, labels, ref = make_pairs(pairs=2, t=5, h=8, v=29)
    h, w = leaf(hidden), leaf(weight)
    out = fused_loss(h, w, None, labels, ref)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        out.loss.backward()
    with torch.no_grad():
        quiet = fused_loss(h, w, None, labels, ref)
    assert quiet.loss.grad_fn is None
    torch.testing.assert_close(quiet.loss, out.loss.detach())


def test_bad_input():
    hidden, weight, _bias, labels, _ref = make_pairs(pairs=1, t=4, h=8, v=29)
    with pytest.raises(ValueError, match="2B rows"):
        loss_fused_linear(hidden[:1], weight, labels[:1], lambda c: c.logps.sum(), paired=True)
    with pytest.raises(TypeError, match="0-d tensor"):
        loss_fused_linear(hidden, weight, labels, lambda c: c.logps)
    with pytest.raises(ValueError, match=r"\[R, T, H\]"):
        loss_fused_linear(hidden[0], weight, labels[0], lambda c: c.logps.sum())
    with pytest.raises(ValueError, match="chunk_units"):
        loss_fused_linear(hidden, weight, labels, lambda c: c.logps.sum(), chunk_units=-1)


@pytest.mark.parametrize("rows", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_the_call_does_not_synchronize(rows):
    """Forward + backward, batch divisors included: no scalar read, no copy to the host, no
    output size read from the device."""
    hidden, weight, bias, labels, ref = make_pairs(pairs=3, t=6, h=12, v=51)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)

    def run():
        fused_loss(h, w, b, labels, ref, chunk_units=2).loss.backward()

    with use_cpu_backend(rows):
        run()
        with SyncCounter(data_dependent=True) as counter:
            run()
    assert counter.hits == [], counter.hits


def test_cost_model_executes_six_nvh_and_plans_whole_pairs():
    shape = cost.Shape(32768, 4096, 128256, unit_tokens=2048)
    both = cost.predict(cost.LOSS_FUSED, "fwd+bwd", shape, cost.H100)
    assert both.flops == pytest.approx(6.0 * 32768 * 4096 * 128256)
    assert both.model_flops == both.flops
    gemm = cost.best_plan(cost.Shape(32768, 4096, 128256), cost.H100)[2]
    # past the 3/4 of the GEMM ceiling (80 % of peak) that recomputing the logits allows
    ceiling = 100 * cost.H100.gemm_efficiency
    assert both.time_s < gemm.time_s
    assert both.model_pct_peak > 0.75 * ceiling > gemm.model_pct_peak
    # one 2048-token pair's logits exceed the budget: the chunk is that one pair
    assert cost.loss_fused_plan(32768, 4096, 128256, 2, 2048) == 1
    assert cost.loss_fused_plan(4096, 576, 49152, 2, 512) > 1
    assert cost.loss_fused_plan(64, 8, 29, 4, 10) == 7  # everything in one chunk
    assert lf.BUDGET_BYTES == cost.GEMM_BUDGET_BYTES
