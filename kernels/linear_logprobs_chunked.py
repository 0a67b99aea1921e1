"""The chunked CPU path of the fused linear logprob op: matmul tiles of scored tokens × vocab.

The path taken by CPU tensors outside the Triton backend, and by float64 anywhere (see
``linear_logprobs``). The scored tokens are gathered (``nonzero`` on the labels: one host
synchronization for their count, free on a CPU) and walked in chunks of ``chunk_tokens``; for each
chunk the vocabulary is walked in slices of ``chunk_vocab``. One fp32 ``[chunk_tokens,
chunk_vocab]`` tile of logits exists at a time (a matmul writes it into a reused buffer):

    forward   tile = h_c W_sᵀ + b_s (h_c pre-scaled by s/T); lse_c = logaddexp over slices of the
              tile's log-sum-exp; the label logit is gathered from the tile that holds it.
    backward  the tile is recomputed and turned in place into dlogits = g (onehot − exp(z − lse))s/T
              (only the saved lse is needed); then grad_h_c += dlogits W_s,
              grad_W_s += dlogitsᵀ h_c, grad_b_s += Σ_n dlogits.

Logit transforms (``s`` the logit scale, ``T`` the temperature, ``c`` the soft-cap): without a cap
the scale folds into the pre-scale (z = a·s/T); with one the tile holds u = a·s/c, and in place
t = tanh(u), z = (c/T)·t, and the backward multiplies dlogits by dz/da / (s/T) = 1 − t², kept in
a second tile buffer (the soft-capped path only).

The tile's log-sum-exp and dlogits run in the native row kernels where they are built (fp32 tiles,
``use_cpu_backend("native")``), else in PyTorch ops. bf16/fp16 inputs are computed in fp32 (bf16
matmuls are slow on CPUs without bf16 units), so the results are fp32-accurate; grad_W and grad_b
accumulate in fp32 and are cast to the parameter dtype once. Memory beyond the outputs: one tile
(8 MiB by default), a few ``[chunk_tokens, H]`` fp32 buffers and an fp32 grad_W accumulator when
the weight is not fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops as _ops
from .dtypes import accumulation_dtype
from .linear_logprobs_stats import RowStatistics

# Bytes of one fp32 logits tile of the CPU path, and the most tokens in one chunk.
TILE_BYTES = 8 * 2**20
MAX_CHUNK_TOKENS = 1024
_VOCAB_ALIGN = 64


def choose_chunks(n_tokens: int, vocab: int, *, chunk_tokens: int = 0,
                  chunk_vocab: int = 0) -> tuple[int, int]:
    """(tokens, vocab entries) per CPU tile; a non-positive argument means "choose"."""
    tokens = chunk_tokens if chunk_tokens > 0 else min(max(n_tokens, 1), MAX_CHUNK_TOKENS)
    if chunk_vocab > 0:
        cols = chunk_vocab
    else:
        cols = max(_VOCAB_ALIGN, TILE_BYTES // (4 * tokens) // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return max(1, min(tokens, max(n_tokens, 1))), max(1, min(cols, max(vocab, 1)))


def _scored_rows(labels: Tensor, ignore_index: int) -> Tensor:
    # nonzero: the one host synchronization of the chunked path (the count of scored tokens).
    return (labels != ignore_index).nonzero().squeeze(1)


def _native_tiles(acc: torch.dtype, device: torch.device) -> bool:
    """Whether the tile math runs in the native row kernels (fp32 CPU tiles, kernel built)."""
    return (acc == torch.float32 and device.type == "cpu"
            and _ops.resolve_backend(device) == "native")


def _tile_lse(tile: Tensor, col: Tensor, native: bool) -> Tensor:
    """Per-row log-sum-exp of a tile; the tile may be overwritten.

    ``col`` (any in-range column per row) only feeds the native kernel's label read.
    """
    if native:  # one streaming pass over each row
        return torch.ops.fastpo_native.logps_forward(tile, col, -1, 1.0, False)[1]
    top = tile.amax(dim=1)
    # A row of only -inf is shifted by 0 (exp(-inf) = 0, lse = -inf); +inf or NaN stay NaN/inf.
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    tile.sub_(shift.unsqueeze(1)).exp_()
    return shift + torch.log(tile.sum(dim=1))


def _tile_dlogits_(tile: Tensor, row_lse: Tensor, scale: Tensor, col: Tensor, inside: Tensor,
                   native: bool) -> None:
    """Turn a tile of z into dlogits = scale · (onehot − exp(z − lse)) in place.

    ``scale`` is g/T per row; the one-hot column ``col`` counts only where ``inside``.
    """
    if native:  # one pass; it adds the one-hot at ``col`` on every row, removed where outside
        torch.ops.fastpo_native.logps_backward(scale, tile, col, row_lse, -1, 1.0, True)
        tile.scatter_add_(1, col.unsqueeze(1), torch.where(inside, 0.0, -scale).unsqueeze(1))
        return
    tile.sub_(row_lse.unsqueeze(1)).exp_().mul_(scale.unsqueeze(1).neg())
    tile.scatter_add_(1, col.unsqueeze(1), torch.where(inside, scale, 0.0).unsqueeze(1))


def tile_scales(temperature: float, logit_scale: float, softcap: float
                ) -> tuple[float, float | None, float]:
    """(pre, post, grad) of the transform z = post·tanh(pre·a) (post None: z = pre·a) of the raw
    logits a, where z = c·tanh(a·s/c)/T with a soft-cap c > 0 (``softcap`` 0: none) or a·s/T;
    ``grad`` = s/T, the factor of dz/da beside 1 − tanh² (1 without a cap)."""
    if softcap > 0:
        return logit_scale / softcap, softcap / temperature, logit_scale / temperature
    return logit_scale / temperature, None, logit_scale / temperature


def _chunk_inputs(hidden, labels, rows, acc, inv_t):
    """(h_c, h_c · pre, labels_c) of one chunk of scored rows, in the accumulation dtype."""
    h = hidden.index_select(0, rows).to(acc)
    scaled = h if inv_t == 1.0 else h * inv_t
    return h, scaled, labels.index_select(0, rows).to(torch.int64)


def _label_cols(lab: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    """Column of each label inside the slice ``[start, start + width)`` (clamped) and a mask."""
    local = lab - start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside


def _logit_tile(h_scaled: Tensor, weight: Tensor, bias_t: Tensor | None, v0: int, width: int,
                buffer: Tensor) -> tuple[Tensor, Tensor]:
    """(the weight slice, the logit tile ``h·W[v0:v0+width]ᵀ/T + b/T``) of a chunk's scaled
    hidden rows, the tile written into ``buffer`` (in the accumulation dtype of ``h_scaled``)."""
    w = weight[v0:v0 + width].to(h_scaled.dtype)
    tile = buffer[:h_scaled.shape[0] * w.shape[0]].view(h_scaled.shape[0], w.shape[0])
    torch.mm(h_scaled, w.t(), out=tile)
    if bias_t is not None:
        tile.add_(bias_t[v0:v0 + width])
    return w, tile


def chunked_linear_logps_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                 labels: Tensor, ignore_index: int, temperature: float,
                                 chunk_tokens: int = 0, chunk_vocab: int = 0, *,
                                 logit_scale: float = 1.0, softcap: float = 0.0,
                                 statistics: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(logps, lse, stats) of 2-D ``hidden [N, H]`` with the chunked matmul path (module doc);
    stats ``[4, N]`` (``linear_logprobs_stats``) with ``statistics``, else empty."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden, weight, bias)
    logps = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    stats = torch.zeros((4, n) if statistics else (0,), dtype=acc, device=hidden.device)
    rows_all = _scored_rows(labels, ignore_index)
    if rows_all.numel() == 0 or vocab == 0:
        return logps, lse, stats
    step, width = choose_chunks(rows_all.numel(), vocab, chunk_tokens=chunk_tokens,
                                chunk_vocab=chunk_vocab)
    inv_t, post, _ = tile_scales(temperature, logit_scale, softcap)
    bias_t = None if bias is None else bias.to(acc) * inv_t
    buffer = torch.empty(step * width, dtype=acc, device=hidden.device)
    native = _native_tiles(acc, hidden.device)
    for start in range(0, rows_all.numel(), step):
        rows = rows_all[start:start + step]
        _, h_scaled, lab = _chunk_inputs(hidden, labels, rows, acc, inv_t)
        running = torch.full((rows.numel(),), float("-inf"), dtype=acc, device=hidden.device)
        picked = torch.zeros(rows.numel(), dtype=acc, device=hidden.device)
        row_stats = RowStatistics(rows.numel(), acc, hidden.device) if statistics else None
        for v0 in range(0, vocab, width):
            w, tile = _logit_tile(h_scaled, weight, bias_t, v0, width, buffer)
            if post is not None:
                tile.tanh_().mul_(post)
            col, inside = _label_cols(lab, v0, w.shape[0])
            picked += torch.where(inside, tile.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)
            if row_stats is not None:  # before the log-sum-exp, which may overwrite the tile
                row_stats.update(tile, v0)
            running = torch.logaddexp(running, _tile_lse(tile, col, native))
        if row_stats is not None:
            stats[:, rows] = row_stats.finish(lab, vocab)
        logps[rows] = picked - running
        lse[rows] = running
    return logps, lse, stats


def chunked_linear_logps_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor,
                                  bias: Tensor | None, labels: Tensor, lse: Tensor,
                                  ignore_index: int, temperature: float, chunk_tokens: int,
                                  chunk_vocab: int, need_hidden: bool, need_weight: bool,
                                  need_bias: bool, *, logit_scale: float = 1.0,
                                  softcap: float = 0.0) -> tuple[Tensor | None, ...]:
    """(grad_hidden, grad_weight, grad_bias) with the chunked path; None where not needed."""
    vocab, h_dim = weight.shape
    acc = accumulation_dtype(hidden, weight, bias)
    device = hidden.device
    need_bias = need_bias and bias is not None
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_w = torch.zeros((vocab, h_dim), dtype=acc, device=device) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_bias else None
    rows_all = _scored_rows(labels, ignore_index)
    if rows_all.numel() and vocab and (need_hidden or need_weight or need_bias):
        step, width = choose_chunks(rows_all.numel(), vocab, chunk_tokens=chunk_tokens,
                                    chunk_vocab=chunk_vocab)
        inv_t, post, grad_scale = tile_scales(temperature, logit_scale, softcap)
        bias_t = None if bias is None else bias.to(acc) * inv_t
        buffer = torch.empty(step * width, dtype=acc, device=device)
        slope = torch.empty(step * width, dtype=acc, device=device) if post is not None else None
        native = _native_tiles(acc, device)
        for start in range(0, rows_all.numel(), step):
            rows = rows_all[start:start + step]
            h, h_scaled, lab = _chunk_inputs(hidden, labels, rows, acc, inv_t)
            scale = grad_logps.index_select(0, rows).to(acc) * grad_scale  # g·s/T
            row_lse = lse.index_select(0, rows).to(acc)
            acc_h = torch.zeros((rows.numel(), h_dim), dtype=acc, device=device) \
                if need_hidden else None
            for v0 in range(0, vocab, width):
                w, tile = _logit_tile(h_scaled, weight, bias_t, v0, width, buffer)
                d = None
                if slope is not None:  # t = tanh(u), d = 1 − t², z = post·t
                    d = slope[:tile.numel()].view_as(tile)
                    torch.mul(tile.tanh_(), tile, out=d).neg_().add_(1.0)
                    tile.mul_(post)
                col, inside = _label_cols(lab, v0, w.shape[0])
                _tile_dlogits_(tile, row_lse, scale, col, inside, native)
                if d is not None:
                    tile.mul_(d)
                if acc_h is not None:
                    acc_h.addmm_(tile, w)
                if grad_w is not None:
                    grad_w[v0:v0 + width].addmm_(tile.t(), h)
                if grad_b is not None:
                    grad_b[v0:v0 + width] += tile.sum(dim=0)
            if acc_h is not None:
                grad_h.index_copy_(0, rows, acc_h.to(grad_h.dtype))
    return (grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)
