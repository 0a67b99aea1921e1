"""Triton kernels for masked per-token log-probabilities straight from logits.

For row n with x = logits[n] / T (T the temperature) and label y:

    lse_n  = log Σ_j exp(x_j)                      (one streaming pass, online max / sum-exp)
    logp_n = x_y − lse_n                           (0 where y == ignore_index)

Gradient. With p = softmax(x) = exp(x − lse):
    ∂logp/∂x_j      = onehot(y)_j − p_j
    ∂logp/∂logits_j = (onehot(y)_j − p_j) / T      (chain rule through x = logits / T)
so for an upstream gradient g_n the backward writes

    dlogits[n, j] = g_n · (onehot(y_n)_j − exp(logits[n, j] / T − lse_n)) / T

from the saved lse alone: the forward keeps N floats, never the [N, V] softmax. Ignored rows get
an exact 0 (and are skipped in the forward). The backward may write into the logits' own storage
(``inplace``): each program reads its block before writing it, and no other program touches it.

Rows address a 2-D ``[N, V]`` or 3-D ``[B, T, V]`` tensor through its strides (vocab stride 1), so
the common shifted view ``logits[:, :-1]`` needs no copy. Offsets are int64: N·V may exceed 2^31.
Accumulation is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dtypes import accumulation_dtype

MAX_BLOCK_V = 4096


@triton.jit
def _row_offset(row, rows_per_batch, stride_b, stride_t):
    return (row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t


@triton.jit
def _logps_forward_kernel(
    logits_ptr,
    labels_ptr,
    logps_ptr,
    lse_ptr,
    logits_sum_ptr,
    vocab,
    rows_per_batch,
    stride_b,
    stride_t,
    ignore_index,
    temperature,
    WITH_LOGITS_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logps_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_LOGITS_SUM:
            tl.store(logits_sum_ptr + row, 0.0)
    else:
        base = logits_ptr + _row_offset(row, rows_per_batch, stride_b, stride_t)
        cols = tl.arange(0, BLOCK_V)
        running_max = tl.full((), float("-inf"), ACC)
        running_sum = tl.zeros((), ACC)
        raw_sum = tl.zeros((BLOCK_V,), ACC)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            raw = tl.load(base + offs, mask=in_row, other=float("-inf")).to(ACC)
            x = raw / temperature
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # A row (or prefix) of only -inf has max -inf; shift by 0 then so that
            # exp(-inf - shift) is 0 instead of exp(-inf + inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
                tl.exp(x - shift), axis=0
            )
            running_max = new_max
            if WITH_LOGITS_SUM:
                raw_sum += tl.where(in_row, raw, 0.0)
        shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        lse = shift + tl.log(running_sum)
        # The label logit is one scalar read; a label outside [0, V) (rejected on the host) reads
        # NaN instead of memory past the row.
        in_range = (label >= 0) & (label < vocab)
        label_logit = tl.load(base + label, mask=in_range, other=float("nan")).to(ACC)
        tl.store(logps_ptr + row, label_logit / temperature - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_LOGITS_SUM:
            tl.store(logits_sum_ptr + row, tl.sum(raw_sum, axis=0))


@triton.jit
def _logps_backward_kernel(
    grad_ptr,
    logits_ptr,
    labels_ptr,
    lse_ptr,
    out_ptr,
    vocab,
    rows_per_batch,
    stride_b,
    stride_t,
    out_stride_b,
    out_stride_t,
    ignore_index,
    temperature,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = offs < vocab
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = out_ptr + _row_offset(row, rows_per_batch, out_stride_b, out_stride_t)
    if label == ignore_index:
        tl.store(out + offs, tl.zeros((BLOCK_V,), ACC).to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        base = logits_ptr + _row_offset(row, rows_per_batch, stride_b, stride_t)
        x = tl.load(base + offs, mask=in_row, other=float("-inf")).to(ACC) / temperature
        lse = tl.load(lse_ptr + row).to(ACC)
        scale = tl.load(grad_ptr + row).to(ACC) / temperature
        onehot = tl.where(offs == label, 1.0, 0.0)
        dlogits = scale * (onehot - tl.exp(x - lse))
        tl.store(out + offs, dlogits.to(out_ptr.dtype.element_ty), mask=in_row)


def _layout(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, rows_per_batch, stride_b, stride_t) of a [N, V] or [B, T, V] tensor."""
    if logits.dim() == 2:
        return logits.shape[0], max(logits.shape[0], 1), 0, logits.stride(0)
    b, t, _ = logits.shape
    return b * t, max(t, 1), logits.stride(0), logits.stride(1)


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtype(dtype: torch.dtype):
    """The kernels' ``ACC`` constant: :func:`accumulation_dtype` as a Triton dtype."""
    return _TL_ACC[accumulation_dtype(dtype)]


def _block(vocab: int) -> int:
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))


def triton_logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    with_logits_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, lse, logits_sum) with the leading shape of ``labels``; logits' vocab stride is 1."""
    rows, rows_per_batch, stride_b, stride_t = _layout(logits)
    vocab = logits.shape[-1]
    out_dtype = accumulation_dtype(logits)
    labels = labels.contiguous()
    logps = torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
    lse = torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
    logits_sum = torch.empty(labels.shape if with_logits_sum else (0,), dtype=out_dtype,
                             device=logits.device)
    if rows:
        block = _block(vocab)
        _logps_forward_kernel[(rows,)](
            logits, labels, logps, lse, logits_sum,
            vocab, rows_per_batch, stride_b, stride_t, ignore_index, float(temperature),
            WITH_LOGITS_SUM=with_logits_sum, BLOCK_V=block, ACC=_acc_dtype(logits.dtype),
            num_warps=8 if block >= 2048 else 4,
        )
    return logps, lse, logits_sum


def triton_logps_backward(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the gradient w.r.t. ``logits`` into ``out`` (same shape; may be ``logits`` itself)."""
    rows, rows_per_batch, stride_b, stride_t = _layout(logits)
    _, _, out_stride_b, out_stride_t = _layout(out)
    vocab = logits.shape[-1]
    if rows and vocab:
        block = _block(vocab)
        grid = (rows, triton.cdiv(vocab, block))
        _logps_backward_kernel[grid](
            grad_logps.contiguous(), logits, labels.contiguous(), lse.contiguous(), out,
            vocab, rows_per_batch, stride_b, stride_t, out_stride_b, out_stride_t,
            ignore_index, float(temperature),
            BLOCK_V=block, ACC=_acc_dtype(logits.dtype),
            num_warps=8 if block >= 2048 else 4,
        )
    return out
