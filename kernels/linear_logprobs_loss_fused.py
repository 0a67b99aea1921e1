"""The loss-fused design: a sequence-level loss and its gradients from hidden states, in one pass.

The op of ``linear_logprobs`` returns log-probs; the gradient that flows back into them is known
only after the caller's loss has run, so its backward recomputes the logits (8·N·V·H of matmul
work per step for the 6·N·V·H a step needs). Here the loss is inside: the caller supplies
``chunk_loss``, a function of the summed log-probs of a chunk's sequences, and every gradient is
computed in the forward while the chunk's logits are held:

    for each chunk of whole sequences (paired: chosen rows i..j and rejected rows i..j)
        L  = h_c Wᵀ (+ b)                         one GEMM, [C, V] fp32 (every row of the chunk)
        lse, logp_n = L[n, y_n] / T − lse_n       one row pass (0 where y_n is ignored)
        π_s = Σ_{n ∈ s} logp_n                    per sequence of the chunk
        ℓ   = chunk_loss(π of the chunk)          caller's, on tiny tensors
        dπ  = ∂ℓ/∂π                               torch.autograd.grad on those tensors
        G   = dπ_{s(n)} (onehot − exp(L / T − lse)) / T     written over L (or beside it)
        grad_h[c] = G W    grad_W += Gᵀ h_c    grad_b += Σ_n G    three GEMMs / a sum

6·N·V·H of matmul work, nothing of size N·V kept beyond one chunk. The autograd function returns
Σ ℓ (the loss) and the detached per-sequence log-probs; its backward scales the stored gradients
by the upstream gradient in place (they are handed out once: a second backward is refused).

Exactness. The chunks' losses add up to the batch's loss only for a loss that is a sum over pairs
(or sequences) with batch-level constants: ``chunk_loss`` must divide by the batch's own divisors
(the number of pairs, the batch's scored chosen tokens), which the caller computes on the device
before the call (``num_tokens`` of the whole batch is :func:`sequence_token_counts`). A loss that
sorts or normalizes across the batch cannot be fused this way.

Contract (that of the op): fp32 accumulation (fp64 for fp64 inputs), exact zeros for ignored
tokens (their softmax-gradient rows are zeros, and their hidden rows are zeroed in the chunk's copy
before the GEMMs, so a non-finite hidden state at a padding position cannot leak into grad_W),
temperature and ``logit_scale`` (folded into T), bias, tied weights (autograd adds the two uses),
no host synchronization (loops sized from shapes; the divisors stay on the device). Precision as
in the gemm design: G in the operand dtype on CUDA, grad_h rows complete per chunk in fp32 and cast
once, grad_W accumulated over the chunks in fp32 and cast once; the backward's scaling by the
upstream gradient rounds once more (exact for 1 and powers of two). The chunk comes from a memory
budget (``linear_logprobs_cost.loss_fused_plan``), at least one pair: a pair's logits are needed
whole. Memory beyond the returned gradients: the ``[C, V]`` tiles, and for half-precision weights
the fp32 grad_W (4·V·H bytes: 2 GiB at the Llama-3-8B head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import checks
from .dtypes import accumulation_dtype
from .linear_logprobs import uses_triton
from .linear_logprobs_cost import GEMM_BUDGET_BYTES, loss_fused_plan
from .linear_logprobs_gemm import matmul_into, operand_dtype, softmax_grad_rows

# Working memory of one call beyond its inputs, returned gradients and grad_W accumulator.
BUDGET_BYTES = GEMM_BUDGET_BYTES

__all__ = ["ChunkLoss", "LossFusedOutput", "SequenceChunk", "loss_fused_linear",
           "sequence_token_counts"]


@dataclass(frozen=True)
class SequenceChunk:
    """What ``chunk_loss`` receives: ``logps`` the summed log-probs of the chunk's sequences (a
    leaf that requires grad; paired: the chosen ones of pairs ``start..stop-1``, then their
    rejected ones), ``num_tokens`` their scored-token counts (int64), ``start``/``stop`` the
    chunk's first and past-the-last unit (pair, or sequence when unpaired)."""

    logps: Tensor
    num_tokens: Tensor
    start: int
    stop: int


ChunkLoss = Callable[[SequenceChunk], Tensor]


class LossFusedOutput(NamedTuple):
    """``loss`` (0-d, differentiable), ``logps`` [R] summed log-probs per sequence and
    ``num_tokens`` [R] their scored-token counts (both detached)."""

    loss: Tensor
    logps: Tensor
    num_tokens: Tensor


def sequence_token_counts(labels: Tensor, ignore_index: int) -> Tensor:
    """Scored tokens per row of ``labels [R, T]`` (int64, on the device)."""
    return (labels != ignore_index).sum(dim=1)


def _row_logps(tile: Tensor, lab: Tensor, scored: Tensor, ignore_index: int, temperature: float,
               triton_rows: bool) -> tuple[Tensor, Tensor]:
    """(logp, lse) per row of ``tile / T``; the tile is left as it was."""
    if triton_rows:
        from .logprobs_triton import triton_logps_forward

        logps, lse, _ = triton_logps_forward(tile, lab, ignore_index, temperature, False)
        return logps, lse
    z = tile if temperature == 1.0 else tile / temperature
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, torch.where(scored, lab, 0).unsqueeze(1)).squeeze(1)
    return torch.where(scored, picked - lse, torch.zeros((), dtype=z.dtype, device=z.device)), lse


def _sequence_ranges(start: int, stop: int, units: int, paired: bool) -> list[tuple[int, int]]:
    """Sequence (row) ranges of units ``start..stop-1``: the chosen rows, then the rejected."""
    if paired:
        return [(start, stop), (units + start, units + stop)]
    return [(start, stop)]


def _run(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
         chunk_loss: ChunkLoss, paired: bool, ignore_index: int, temperature: float,
         chunk_units: int, needs: tuple[bool, bool, bool]
         ) -> tuple[LossFusedOutput, tuple[Tensor | None, ...]]:
    """The chunk loop: (loss, logps, counts) and (grad_hidden, grad_weight, grad_bias)."""
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    rows, seq, h_dim = hidden.shape
    vocab = weight.shape[0]
    op = operand_dtype(hidden, weight)
    acc = accumulation_dtype(op)
    device = hidden.device
    triton_rows = uses_triton(hidden, weight)
    grad_dtype = op if device.type == "cuda" else acc
    units = rows // 2 if paired else rows
    unit_tokens = seq * (2 if paired else 1)
    step = chunk_units or loss_fused_plan(rows * seq, h_dim, vocab, op.itemsize, unit_tokens,
                                          need_hidden=need_h, need_weight=need_w,
                                          budget_bytes=BUDGET_BYTES)
    step = max(1, min(step, max(units, 1)))
    flat_h = hidden.reshape(rows * seq, h_dim)
    flat_lab = labels.reshape(-1).to(torch.int64)
    counts = sequence_token_counts(labels, ignore_index)
    scored_all = flat_lab != ignore_index
    logps = torch.zeros(rows, dtype=acc, device=device)
    loss = None  # in the chunk losses' dtype (float64 when the caller's constants are)
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    w = weight.to(op)
    bias_acc = None if bias is None else bias.to(acc)
    max_tokens = step * unit_tokens
    buffer = torch.empty(max_tokens * vocab, dtype=acc, device=device)
    grad_buffer = None if grad_dtype == acc else torch.empty(max_tokens * vocab, dtype=grad_dtype,
                                                             device=device)
    rows_h = torch.empty((max_tokens, h_dim), dtype=acc, device=device) if need_h else None
    for start in range(0, units, step):
        stop = min(units, start + step)
        ranges = _sequence_ranges(start, stop, units, paired)
        tokens = [(a * seq, b * seq) for a, b in ranges]
        lab = torch.cat([flat_lab[a:b] for a, b in tokens])
        scored = torch.cat([scored_all[a:b] for a, b in tokens])
        size = lab.shape[0]
        h_c = torch.where(scored.unsqueeze(1), torch.cat([flat_h[a:b] for a, b in tokens]).to(op),
                          torch.zeros((), dtype=op, device=device))
        tile = buffer[:size * vocab].view(size, vocab)
        matmul_into(tile, h_c, w.t(), accumulate=False)
        if bias_acc is not None:
            tile.add_(bias_acc)
        token_logps, lse = _row_logps(tile, lab, scored, ignore_index, temperature, triton_rows)
        sums = token_logps.view(-1, seq).sum(dim=1)
        chunk_counts = torch.cat([counts[a:b] for a, b in ranges])
        offset = 0
        for a, b in ranges:
            logps[a:b] = sums[offset:offset + b - a]
            offset += b - a
        leaf = sums.detach().requires_grad_(True)
        with torch.enable_grad():
            part = chunk_loss(SequenceChunk(leaf, chunk_counts, start, stop))
            if not isinstance(part, Tensor) or part.dim() != 0:
                shape = tuple(part.shape) if isinstance(part, Tensor) else ""
                raise TypeError("chunk_loss must return a 0-d tensor (the chunk's share of the "
                                f"loss), got {type(part).__name__} {shape}")
            d_logps = None
            if (need_h or need_w or need_b) and part.requires_grad:
                (d_logps,) = torch.autograd.grad(part, leaf, allow_unused=True)
        loss = part.detach() if loss is None else loss + part.detach()
        if not (need_h or need_w or need_b):
            continue
        if d_logps is None:  # the chunk's loss does not depend on its log-probs
            d_logps = torch.zeros_like(leaf)
        g = d_logps.to(acc).unsqueeze(1).expand(-1, seq).reshape(-1)
        grads = tile if grad_buffer is None else grad_buffer[:size * vocab].view(size, vocab)
        softmax_grad_rows(tile, grads, lab, scored, g, lse, 0, ignore_index, temperature,
                          triton_rows)
        if need_h:
            part_h = rows_h[:size]
            matmul_into(part_h, grads, w, accumulate=False)
            offset = 0
            for a, b in tokens:
                grad_h.view(-1, h_dim)[a:b] = part_h[offset:offset + b - a]
                offset += b - a
        if need_w:
            matmul_into(grad_w, grads.t(), h_c, accumulate=True)
        if need_b:
            grad_b += grads.sum(dim=0, dtype=acc)
    if loss is None:
        loss = torch.zeros((), dtype=acc, device=device)
    out = LossFusedOutput(loss, logps, counts)
    return out, (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))


class _LossFusedLinear(torch.autograd.Function):
    """(loss, logps, num_tokens) with every gradient computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_loss, options):
        paired, ignore_index, temperature, chunk_units, needs = options
        out, grads = _run(hidden, weight, bias, labels, chunk_loss, paired, ignore_index,
                          temperature, chunk_units, needs)
        ctx.grads = grads
        ctx.mark_non_differentiable(out.logps, out.num_tokens)
        return out.loss, out.logps, out.num_tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logps, _grad_counts):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the loss-fused linear loss computed its gradients in the forward "
                               "and hands them out once: call backward once per forward (no "
                               "retain_graph re-use)")
        ctx.grads = None
        scaled = tuple(None if g is None else g.mul_(grad_loss) for g in grads)
        return (*scaled, None, None, None)


def loss_fused_linear(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_loss: ChunkLoss,
    *,
    bias: Tensor | None = None,
    paired: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    chunk_units: int = 0,
) -> LossFusedOutput:
    """Σ over chunks of ``chunk_loss``, with the gradients of hidden, weight and bias.

    Args:
        hidden: final hidden states ``[R, T, H]``; paired: ``R = 2B``, the B chosen sequences
            first, then the B rejected ones in the same order.
        weight, bias: the lm_head ``[V, H]`` (may be the tied embedding) and ``[V]``.
        labels: ``[R, T]`` shifted labels, ``ignore_index`` where not scored.
        chunk_loss: the chunk's share of the loss from a :class:`SequenceChunk` (see the module
            doc: batch-level divisors come from outside the chunk); a 0-d tensor.
        temperature, logit_scale: z = logits · s / T.
        chunk_units: pairs (sequences when unpaired) per chunk; 0: from the memory budget.

    Returns :class:`LossFusedOutput`: the loss (in the chunk losses' dtype: float32, or float64
    for float64 inputs or constants) and the detached per-sequence summed log-probs (float32;
    float64 for float64 inputs) and scored-token counts.
    """
    checks.check_linear_inputs(hidden, weight, labels, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [R, T, H], got {tuple(hidden.shape)}")
    checks.check_temperature(temperature)
    checks.check_ignore_index(ignore_index)
    checks.check_logit_transform(logit_scale, None)
    if not callable(chunk_loss):
        raise TypeError(f"chunk_loss must be callable, got {type(chunk_loss).__name__}")
    if paired and hidden.shape[0] % 2:
        raise ValueError(f"hidden has {hidden.shape[0]} rows: a paired loss needs 2B rows, the "
                         "B chosen sequences first, then the B rejected ones")
    if isinstance(chunk_units, bool) or not isinstance(chunk_units, int) or chunk_units < 0:
        raise ValueError(f"chunk_units must be an int >= 0 (0: automatic), got {chunk_units!r}")
    checks.check_label_range(labels, weight.shape[0], ignore_index)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    options = (paired, ignore_index, float(temperature) / float(logit_scale), chunk_units, needs)
    return LossFusedOutput(*_LossFusedLinear.apply(hidden, weight, bias, labels, chunk_loss,
                                                   options))
