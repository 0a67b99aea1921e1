"""Triton kernels for label log-probabilities straight from hidden states and the lm_head weight.

Per scored token n (hidden row h_n, label y_n) and vocabulary entry v:

    z[n, v] = (h_n · W_v + b_v) / T                    (T the temperature)
    lse_n   = log Σ_v exp(z[n, v])
    logp_n  = z[n, y_n] − lse_n

The ``[N, V]`` logits never exist: programs own ``BLOCK_N × BLOCK_V`` tiles, build each tile with
``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension (fp32 accumulator), and keep only
per-token scalars.

Token order. Ignored tokens (``labels == ignore_index``) are dropped before any compute without a
host synchronization: ``order`` lists the scored token indices first (a stable sort of the
"ignored" flag, done on the device) and ``count`` (a 1-element device tensor) says how many there
are. The grid is sized for all N tokens; a program whose token tile starts at or past ``count``
does nothing, so prompt and padding cost one idle program each, never a matmul.

Forward (``_linear_logps_fwd_kernel``, grid = token tiles × vocab splits). A program walks its
share of the vocab tiles keeping an online (max m, sum-exp s) per token:

    m' = max(m, max_v z),   s' = s·exp(m − m') + Σ_v exp(z − m')

and picks up z[n, y_n] when y_n falls in the current tile. Each split writes its partial
(m, s, label logit); the launcher combines the splits (``lse = M + log Σ_k s_k exp(m_k − M)``).

Backward. With p = softmax(z_n) = exp(z − lse) and an upstream gradient g_n:

    ∂logp_n/∂z[n, v] = onehot(y_n)_v − p_v
    dlogits[n, v]    = g_n (onehot(y_n)_v − p_v) / T     (through z = logits / T)
    grad_h_n  = Σ_v dlogits[n, v] W_v      grad_W_v = Σ_n dlogits[n, v] h_n
    grad_b_v  = Σ_n dlogits[n, v]

``_linear_logps_bwd_kernel`` (grid = token tiles × vocab tiles) recomputes its logit tile from
the saved lse (no softmax was stored), forms the dlogits tile in registers, then walks the hidden
dimension in ``BLOCK_H`` slices: ``dlogits @ W[tile, slice]`` is this tile's share of grad_h and
``dlogitsᵀ @ h[tile, slice]`` its share of grad_W. Every output element of grad_h receives one
share per vocab tile and every element of grad_W one share per token tile, so the shares are
added with fp32 atomics into fp32 buffers (cast once to the parameter dtype by the launcher).
Neither a grad_h program looping over the vocabulary nor a grad_W program looping over tokens can
hold its ``BLOCK × H`` accumulator in registers for H in the thousands without recomputing each
logit tile H/BLOCK_H times; the atomics avoid that recompute. Consequence: the order of the fp32
additions (and so the last bits of grad_h and grad_W) is not deterministic on a GPU.

Logit transforms (``s`` the logit scale, ``c`` a soft-cap). Without a cap the tile is scaled by
s/T (``inv_temperature``). With one (``HAS_SOFTCAP``, a constexpr: the uncapped kernels compile
as without it) the tile u = a·s/c becomes z = (c/T)·tanh(u) (``cap_scale`` = c/T), and the
backward multiplies dlogits by 1 − tanh²(u) with g·s/T as the row factor. ``tanh`` is written with
one ``exp`` (exact ±1 where it saturates, an absolute error of a few fp32 ulps near 0):
libdevice's does not run in Triton's interpreter.

Memory of the backward beyond its outputs. The launcher walks the vocabulary in chunks, one launch
each; a chunk's grad_W rows are complete when its launch ends, so a bf16/fp16 weight needs an fp32
accumulator for one chunk only (≤ 256 MiB by default), cast into the output before the next
chunk; an fp32 weight accumulates in its output. grad_h stays an fp32 ``[N, H]`` buffer across
the chunks. At the Llama-3-8B head (H 4096, V 128256) with 32k tokens in bf16 that is
256 MiB + 512 MiB, where a whole-vocabulary fp32 grad_W would hold 2 GiB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs_launch import blocks, dot_dtype, interpreting, precision_of

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# fp32 weight-gradient accumulator of one backward launch (half-precision weights): 256 MiB,
# e.g. 16384 vocab rows at H = 4096
WEIGHT_GRAD_CHUNK_BYTES = 256 * 2**20


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h, stride_w,
                inv_temperature, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """z = (h[rows] @ W[cols]ᵀ + b[cols]) / T as a fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _tanh(u):
    """tanh(u) = 2 / (1 + exp(−2u)) − 1: exactly 1 once exp(−2u) underflows and −1 once it
    overflows to +inf (2 / inf = 0); no abs / select, so the capped backward fits its registers."""
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _token_tile(order_ptr, labels_ptr, count, pid_n, BLOCK_N: tl.constexpr):
    """(rows, row_ok, labels) of token tile ``pid_n``: its scored token indices, in ``order``."""
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = pos < count
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    return rows, row_ok, labels


@triton.jit
def _linear_logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
    part_max_ptr, part_sum_ptr, part_label_ptr,
    n_rows, vocab, hidden, stride_h, stride_w, inv_temperature, cap_scale, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N < count:
        rows, row_ok, labels = _token_tile(order_ptr, labels_ptr, count, pid_n, BLOCK_N)
        run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_N,), tl.float32)
        label_logit = tl.zeros((BLOCK_N,), tl.float32)
        n_vtiles = tl.cdiv(vocab, BLOCK_V)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, n_vtiles)
        for vt in range(first, last):
            # int64 columns: cols · stride_w (≤ V·H) may pass 2^31
            cols = vt * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
            col_ok = cols < vocab
            z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h,
                            stride_w, inv_temperature, HAS_BIAS, DOT, PRECISION,
                            BLOCK_N, BLOCK_V, BLOCK_H)
            if HAS_SOFTCAP:
                z = cap_scale * _tanh(z)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            # Shift by 0 while a row has seen only -inf: exp(-inf - 0) = 0, not exp(-inf + inf).
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]),
                                                                 axis=1)
            run_max = new_max
        out = split.to(tl.int64) * n_rows + rows
        tl.store(part_max_ptr + out, run_max, mask=row_ok)
        tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
        tl.store(part_label_ptr + out, label_logit, mask=row_ok)


@triton.jit
def _linear_logps_bwd_kernel(
    grad_ptr, h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, order_ptr, count_ptr,
    grad_h_ptr, grad_w_ptr, grad_b_ptr,
    vocab, col0, hidden, stride_h, stride_w, inv_temperature, cap_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N < count:
        rows, row_ok, labels = _token_tile(order_ptr, labels_ptr, count, pid_n, BLOCK_N)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # g·s/T per token, 0 on the padding rows of the tile so that they add nothing.
        scale = tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * inv_temperature
        if HAS_SOFTCAP:  # inv_temperature is s/c here, cap_scale c/T
            scale = scale * cap_scale
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < vocab
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h,
                        stride_w, inv_temperature, HAS_BIAS, DOT, PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_H)
        # w_ptr, b_ptr and the gradient pointers start at vocab entry col0 (a vocab chunk)
        onehot = tl.where(cols[None, :] + col0 == labels[:, None], 1.0, 0.0)
        if HAS_SOFTCAP:  # z holds u: t = tanh(u), dz/du ∝ 1 − t²
            z = _tanh(z)
            onehot = (onehot - tl.exp(cap_scale * z - lse[:, None])) * (1.0 - z * z)
            dlogits = scale[:, None] * onehot
        else:
            dlogits = scale[:, None] * (onehot - tl.exp(z - lse[:, None]))
        dlogits = tl.where(row_ok[:, None] & col_ok[None, :], dlogits, 0.0)
        if NEED_B:
            tl.atomic_add(grad_b_ptr + cols, tl.sum(dlogits, axis=0), mask=col_ok, sem="relaxed")
        d = dlogits.to(DOT)
        for k0 in range(0, hidden, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < hidden
            if NEED_H:
                w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
                share_h = tl.dot(d, w, input_precision=PRECISION)
                tl.atomic_add(grad_h_ptr + rows[:, None] * hidden + ks[None, :], share_h,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_W:
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
                share_w = tl.dot(tl.trans(d), h, input_precision=PRECISION)
                tl.atomic_add(grad_w_ptr + cols[:, None] * hidden + ks[None, :], share_w,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------- launchers


def _scales(temperature: float, logit_scale: float, softcap: float) -> tuple[float, float]:
    """(inv_temperature, cap_scale) of the kernels: (s/T, 1) without a cap, (s/c, c/T) with."""
    if softcap > 0:
        return logit_scale / softcap, softcap / temperature
    return logit_scale / temperature, 1.0


def _scored_order(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored token indices first (device-side stable sort) and their count, no host sync."""
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    count = (~ignored).sum().reshape(1)
    return order, count


def _operands(hidden, weight, bias):
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return hidden, weight, bias


def triton_linear_logps_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    splits: int = 0,
    *,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, lse), float32 ``[N]``, of 2-D ``hidden [N, H]``; 0 at ignored tokens.

    ``splits`` vocab splits run in parallel per token tile (0: chosen from the grid size);
    ``softcap`` 0: none.
    """
    hidden, weight, bias = _operands(hidden, weight, bias)
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    logps = torch.zeros(n, dtype=torch.float32, device=device)
    lse = torch.zeros(n, dtype=torch.float32, device=device)
    if n == 0 or vocab == 0:
        return logps, lse
    labels = labels.contiguous()
    dot = dot_dtype(hidden, weight)
    block_n, block_v, block_h, warps, stages = blocks(device, dot, "forward", softcap > 0)
    n_tiles = triton.cdiv(n, block_n)
    v_tiles = triton.cdiv(vocab, block_v)
    if splits <= 0:
        if interpreting(device):
            splits = 1
        else:  # enough programs for about two waves over the streaming multiprocessors
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(v_tiles, triton.cdiv(2 * sms, n_tiles)))
    splits = min(splits, v_tiles)
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    order, count = _scored_order(labels, ignore_index)
    parts = torch.empty((3, splits, n), dtype=torch.float32, device=device)
    _linear_logps_fwd_kernel[(n_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, labels, order, count,
        parts[0], parts[1], parts[2],
        n, vocab, h_dim, hidden.stride(0), weight.stride(0), *_scales(temperature, logit_scale,
                                                                      softcap),
        tiles_per_split, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        DOT=_TL_DTYPES[dot], PRECISION=precision_of(dot),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps, num_stages=stages,
    )
    part_max, part_sum, part_label = parts
    top = part_max.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (part_sum * torch.exp(part_max - shift)).sum(dim=0)
    scored = labels != ignore_index
    row_lse = shift + torch.log(total)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    torch.where(scored, part_label.sum(dim=0) - row_lse, zero, out=logps)
    torch.where(scored, row_lse, zero, out=lse)
    return logps, lse


def weight_grad_chunk(vocab: int, hidden: int, requested: int = 0,
                      budget_bytes: int = WEIGHT_GRAD_CHUNK_BYTES) -> int:
    """Vocab rows per backward launch: ``requested`` if > 0, else as many as fit an fp32
    ``[rows, hidden]`` accumulator in ``budget_bytes`` (at least one row, at most ``vocab``)."""
    if requested > 0:
        return min(requested, vocab)
    return max(1, min(vocab, budget_bytes // (4 * hidden)))


def triton_linear_logps_backward(
    grad_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    vocab_chunk: int = 0,
    *,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; None where not needed.

    The vocabulary is walked in chunks of ``vocab_chunk`` rows (0: ``weight_grad_chunk``), one
    launch each. grad_W of a chunk is complete after its launch (every token tile has added its
    share), so a half-precision weight needs an fp32 accumulator of one chunk only, cast into
    the output before the next; an fp32 weight's gradient is accumulated in the output itself.
    grad_h (fp32 ``[N, H]``) and grad_b (fp32 ``[V]``) accumulate across the chunks.
    """
    hidden, weight, bias = _operands(hidden, weight, bias)
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    f32 = {"dtype": torch.float32, "device": device}
    grad_h = torch.zeros((n, h_dim), **f32) if need_hidden else None
    launch = bool(n and vocab and (need_hidden or need_weight or need_bias))
    # an fp32 weight's gradient is accumulated in place; a half-precision one is written chunk
    # by chunk from the fp32 accumulator, every row once
    new_w = torch.empty if launch and weight.dtype != torch.float32 else torch.zeros
    grad_w = new_w((vocab, h_dim), dtype=weight.dtype, device=device) if need_weight else None
    grad_b = torch.zeros((vocab,), **f32) if need_bias else None
    if launch:
        dot = dot_dtype(hidden, weight)
        block_n, block_v, block_h, warps, stages = blocks(device, dot, "backward", softcap > 0)
        labels = labels.contiguous()
        order, count = _scored_order(labels, ignore_index)
        grad_logps, lse = grad_logps.contiguous(), lse.contiguous()
        if vocab_chunk <= 0 and weight.dtype == torch.float32:
            vocab_chunk = vocab  # accumulated in the output: no buffer to bound
        width = weight_grad_chunk(vocab, h_dim, vocab_chunk)
        w_acc = torch.empty((width, h_dim), **f32) \
            if need_weight and weight.dtype != torch.float32 else None
        dummy = lse
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            chunk_w = None
            if grad_w is not None:
                chunk_w = grad_w[v0:v1] if w_acc is None else w_acc[:v1 - v0].zero_()
            _linear_logps_bwd_kernel[(triton.cdiv(n, block_n), triton.cdiv(v1 - v0, block_v))](
                grad_logps, hidden, weight[v0:v1],
                bias[v0:v1] if bias is not None else hidden, labels, lse, order, count,
                grad_h if grad_h is not None else dummy,
                chunk_w if chunk_w is not None else dummy,
                grad_b[v0:v1] if grad_b is not None else dummy,
                v1 - v0, v0, h_dim, hidden.stride(0), weight.stride(0),
                *_scales(temperature, logit_scale, softcap),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, NEED_H=need_hidden,
                NEED_W=need_weight, NEED_B=need_bias, DOT=_TL_DTYPES[dot],
                PRECISION=precision_of(dot),
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps,
                num_stages=stages,
            )
            if w_acc is not None:
                grad_w[v0:v1].copy_(w_acc[:v1 - v0])  # the chunk's fp32 sums, cast once
    return (
        grad_h.to(hidden.dtype) if grad_h is not None else None,
        grad_w,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )
