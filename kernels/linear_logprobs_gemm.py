"""The GEMM design of the fused linear logprob op: cuBLAS matmuls on token chunks × vocab slices.

For a chunk of ``C`` token rows ``h_c`` and a slice of ``S`` vocabulary rows ``W_s`` (one
``[C, S]`` fp32 logits buffer, reused):

    forward   L = h_c W_sᵀ (+ b_s)                          one GEMM, fp32 output
              lse_c = logaddexp over slices of the row log-sum-exp of L / T
              logp_c = L[n, y_n] / T − lse_c                 (the label's slice holds it)
    backward  L recomputed (one GEMM), then in one row pass
              G = g (onehot − exp(L / T − lse)) / T          written in the GEMM operand dtype
              grad_h[c] += G W_s        grad_W[s] += Gᵀ h_c  grad_b[s] += Σ_n G
              (two GEMMs accumulating into fp32 buffers)

Loop order. The forward walks token chunks outside and vocab slices inside (an online lse per
row). The backward walks vocab slices outside: a slice's grad_W rows are complete after its inner
loop over the tokens, so a half-precision weight needs an fp32 accumulator of one slice only
(cast into the output once), while the fp32 grad_h rows of the scored tokens stay for the whole
backward. Token-outer would instead need an fp32 accumulator of the whole grad_W (2 GiB at the
Llama-3-8B head, twice the budget).

Precision. The GEMMs take the inputs' dtype (bf16 tensor cores for bf16) and accumulate in fp32
(``out_dtype=float32`` on CUDA; on CPU the half operands are upcast exactly and the GEMM runs in
fp32), so the logits, their log-sum-exp and the logps are fp32-accurate: logits in bf16 would
round every logit to 8 bits of mantissa (±0.06 at a logit of 16), an error no user of logps
accepts, for half the buffer. On CUDA the softmax gradient G is rounded once to the operand dtype
(bf16 for a bf16 model, as the tile kernels and every fused-linear implementation do: a bf16
tensor-core GEMM takes bf16 operands); the error this adds to grad_h / grad_W is ~2⁻⁹ of the
gradient's scale (not of each element: elements that cancel to ~0 keep an absolute error of that
size). On CPU the GEMMs run in fp32 anyway, so G stays fp32 there (``grad_dtype`` overrides).
Both gradient GEMMs sum in fp32 (cuBLAS ``beta = 1`` into the fp32 accumulator, no separate add
pass); grad_W and grad_h are cast to the parameter dtype once.

Row passes. On CUDA (and under Triton's interpreter) the log-sum-exp and G come from the
from-logits Triton kernels of ``logprobs_triton.py`` (G written straight into its own buffer in
the operand dtype, or in place over the logits for fp32 operands); on CPU from PyTorch ops.

Which rows. ``None`` computes every row in order (the default of the op: the loops are sized on
the host, and the scored count is a device value, so nothing waits for it); ``rows`` lists the
token rows to compute (the scored ones, compacted on the device from a host-known count, see
``linear_logprobs``), and the others are never read. With every row computed the ignored ones
come out exactly zero: logp and lse by a select, G by the row kernel (it writes zeros for an
ignored label, whatever the logits), so their grad_h rows (G W) are zeros and they add nothing to
grad_b; for grad_W (Gᵀ h) the hidden rows of ignored tokens are also masked to zero in the
chunk's copy (0 · NaN is NaN: a non-finite hidden state at a padding position must not leak into
the weight gradient). That copy is what the ``rows`` path pays for its gather: the same traffic.

Logit transforms (``s`` the logit scale, ``c`` a soft-cap). Without a cap the scale folds into
the temperature (T/s). With one, the tile of raw logits L becomes c·tanh(L·s/c) in place before
the row pass (which divides by T), and the backward chains dz/dL = s·(1 − (z/c)²) after it, into
G: the row kernel then writes G into its own buffer (an fp32 one for fp32 operands, the one extra
``[C, S]`` tile of the capped backward, counted by the plan), and the freed logits tile holds
the factor. For half operands G is rounded to the operand dtype by the row pass and again after
the factor (two roundings of ≤ 2⁻⁹ where the uncapped design has one).

Determinism: no atomics; every sum has a fixed order (cuBLAS GEMMs are bit-reproducible on one
GPU model for the same shapes and stream), so ``deterministic=True`` is free here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dtypes import accumulation_dtype
from .linear_logprobs_cost import GEMM_BUDGET_BYTES, device_spec, gemm_plan
from .linear_logprobs_stats import RowStatistics

# Working memory of one call beyond its inputs and returned gradients (read at each call).
BUDGET_BYTES = GEMM_BUDGET_BYTES


def operand_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """Dtype of the GEMM operands: the inputs' common dtype."""
    return torch.promote_types(hidden.dtype, weight.dtype)


def matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` computed in ``out``'s dtype (fp32 accumulation of half operands)."""
    if out.device.type == "cuda" and a.dtype != out.dtype:  # half operands of one dtype
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    a, b = a.to(out.dtype), b.to(out.dtype)  # CPU: exact upcasts, no mixed-dtype GEMM there
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def plan(hidden: Tensor, weight: Tensor, rows: int, chunk_tokens: int, chunk_vocab: int,
         need_hidden: bool, need_weight: bool, budget_bytes: int = 0,
         softcap: bool = False) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab): the requested sizes where > 0, else the cost model's plan
    for ``budget_bytes`` (0: ``BUDGET_BYTES``); ``softcap``: the capped backward's own G tile."""
    vocab, h_dim = weight.shape
    name = torch.cuda.get_device_name(hidden.device) if hidden.device.type == "cuda" else None
    auto = gemm_plan(max(rows, 1), h_dim, vocab, operand_dtype(hidden, weight).itemsize,
                     need_hidden=need_hidden, need_weight=need_weight,
                     budget_bytes=budget_bytes or BUDGET_BYTES, spec=device_spec(name),
                     softcap=softcap)
    tokens = chunk_tokens if chunk_tokens > 0 else auto[0]
    cols = chunk_vocab if chunk_vocab > 0 else auto[1]
    return max(1, min(tokens, max(rows, 1))), max(1, min(cols, vocab))


def _label_cols(lab: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    local = lab - start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside


def _softcap_(tile: Tensor, logit_scale: float, softcap: float) -> None:
    """Raw logits L -> c·tanh(L·s/c) in place (the row pass then divides by T)."""
    tile.mul_(logit_scale / softcap).tanh_().mul_(softcap)


def _softcap_slope_(tile: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """Capped logits z -> dz/dL = s·(1 − (z/c)²) in place."""
    return tile.mul_(1.0 / softcap).square_().neg_().add_(1.0).mul_(logit_scale)


def _rows_lse(tile: Tensor, temperature: float, triton_rows: bool, any_col: Tensor) -> Tensor:
    """Row log-sum-exp of ``tile / T`` (the tile may be overwritten)."""
    if triton_rows:
        from .logprobs_triton import triton_logps_forward

        # every row is computed (label 0 is never the ignore index -1 given here)
        return triton_logps_forward(tile, any_col[:tile.shape[0]], -1, temperature, False)[1]
    if temperature != 1.0:
        tile.mul_(1.0 / temperature)
    top = tile.amax(dim=1)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    tile.sub_(shift.unsqueeze(1)).exp_()
    return shift + torch.log(tile.sum(dim=1))


def softmax_grad_rows(tile: Tensor, out: Tensor, lab: Tensor, scored: Tensor, g: Tensor,
                      row_lse: Tensor, v0: int, ignore_index: int, temperature: float,
                      triton_rows: bool) -> None:
    """``out = g (onehot − exp(tile / T − lse)) / T``, exact zeros on rows that are not scored;
    ``out`` may be ``tile`` itself."""
    width = tile.shape[1]
    col, inside = _label_cols(lab, v0, width)
    if triton_rows:
        from .logprobs_triton import triton_logps_backward

        outside = width if width != ignore_index else width + 1  # matches no column
        local = torch.where(scored, torch.where(inside, col, outside), ignore_index)
        triton_logps_backward(g, tile, local, row_lse, ignore_index, temperature, out)
        return
    scale = torch.where(scored, g / temperature, 0.0)
    safe_lse = torch.where(scored, row_lse, float("inf"))  # exp(z − inf) = 0 on ignored rows
    if temperature != 1.0:
        tile.mul_(1.0 / temperature)
    tile.sub_(safe_lse.unsqueeze(1)).exp_().mul_(scale.neg().unsqueeze(1))
    tile.masked_fill_(~scored.unsqueeze(1), 0.0)  # exact zeros even where z is NaN / +inf
    tile.scatter_add_(1, col.unsqueeze(1), torch.where(inside, scale, 0.0).unsqueeze(1))
    if out is not tile:
        out.copy_(tile)


def _chunk(hidden: Tensor, rows: Tensor | None, start: int, size: int, op: torch.dtype,
           keep: Tensor | None = None) -> Tensor:
    """Hidden rows ``[start, start + size)`` of ``rows`` (None: of every row) in the operand
    dtype; with ``keep`` (a bool per row of the chunk) the others are zeroed in a fresh copy."""
    h = hidden[start:start + size] if rows is None else hidden.index_select(0, rows[start:start
                                                                                    + size])
    if keep is not None:
        return torch.where(keep.unsqueeze(1), h.to(op), torch.zeros((), dtype=op,
                                                                    device=h.device))
    return h.to(op)


def gemm_linear_logps_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                              labels: Tensor, ignore_index: int, temperature: float, *,
                              rows: Tensor | None, triton_rows: bool, chunk_tokens: int = 0,
                              chunk_vocab: int = 0, logit_scale: float = 1.0,
                              softcap: float = 0.0, statistics: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(logps, lse) ``[N]`` of 2-D ``hidden [N, H]``, 0 at rows not computed or ignored;
    ``softcap`` 0: none (the logit scale then folds into the temperature); and with
    ``statistics`` the ``[4, N]`` statistics of ``linear_logprobs_stats`` (else empty), from
    the same tiles (in PyTorch, beside the row pass, which is unchanged)."""
    if softcap <= 0:
        temperature, logit_scale = temperature / logit_scale, 1.0
    n, vocab = hidden.shape[0], weight.shape[0]
    op = operand_dtype(hidden, weight)
    acc = accumulation_dtype(op)
    device = hidden.device
    logps = torch.zeros(n, dtype=acc, device=device)
    lse = torch.zeros(n, dtype=acc, device=device)
    stats = torch.zeros((4, n) if statistics else (0,), dtype=acc, device=device)
    m = n if rows is None else rows.numel()
    if m == 0:
        return logps, lse, stats
    step, width = plan(hidden, weight, m, chunk_tokens, chunk_vocab, False, False)
    bias_acc = None if bias is None else bias.to(acc)
    buffer = torch.empty(step * width, dtype=acc, device=device)
    any_col = torch.zeros(step, dtype=torch.int64, device=device)
    labels = labels.to(torch.int64)
    for start in range(0, m, step):
        h_c = _chunk(hidden, rows, start, step, op)
        size = h_c.shape[0]
        lab = labels[start:start + size] if rows is None else labels.index_select(
            0, rows[start:start + size])
        running = torch.full((size,), float("-inf"), dtype=acc, device=device)
        picked = torch.zeros(size, dtype=acc, device=device)
        row_stats = RowStatistics(size, acc, device) if statistics else None
        for v0 in range(0, vocab, width):
            w = weight[v0:v0 + width].to(op)
            tile = buffer[:size * w.shape[0]].view(size, w.shape[0])
            matmul_into(tile, h_c, w.t(), accumulate=False)
            if bias_acc is not None:
                tile.add_(bias_acc[v0:v0 + width])
            if softcap > 0:
                _softcap_(tile, logit_scale, softcap)
            col, inside = _label_cols(lab, v0, w.shape[0])
            picked += torch.where(inside, tile.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)
            if row_stats is not None:  # z = tile / T, before the lse may overwrite the tile
                row_stats.update(tile, v0, scale=1.0 / temperature)
            running = torch.logaddexp(running, _rows_lse(tile, temperature, triton_rows, any_col))
        scored = lab != ignore_index
        zero = torch.zeros((), dtype=acc, device=device)
        out_stats = None
        if row_stats is not None:
            out_stats = torch.where(scored, row_stats.finish(lab, vocab), zero)
        out_logps = torch.where(scored, picked / temperature - running, zero)
        out_lse = torch.where(scored, running, zero)
        index = torch.arange(start, start + size, device=device) if rows is None \
            else rows[start:start + size]
        logps.index_copy_(0, index, out_logps)
        lse.index_copy_(0, index, out_lse)
        if out_stats is not None:
            stats.index_copy_(1, index, out_stats)
    return logps, lse, stats


def gemm_linear_logps_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor,
                               bias: Tensor | None, labels: Tensor, lse: Tensor,
                               ignore_index: int, temperature: float, need_hidden: bool,
                               need_weight: bool, need_bias: bool, *, rows: Tensor | None,
                               triton_rows: bool, chunk_tokens: int = 0, chunk_vocab: int = 0,
                               grad_dtype: torch.dtype | None = None, logit_scale: float = 1.0,
                               softcap: float = 0.0
                               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; None where not needed.
    ``grad_dtype``: dtype of the logits gradient fed to the GEMMs (None: the operand dtype on
    CUDA, the accumulation dtype on CPU); ``softcap`` 0: none."""
    capped = softcap > 0
    if not capped:
        temperature, logit_scale = temperature / logit_scale, 1.0
    n = hidden.shape[0]
    vocab, h_dim = weight.shape
    op = operand_dtype(hidden, weight)
    acc = accumulation_dtype(op)
    device = hidden.device
    if grad_dtype is None:
        grad_dtype = op if device.type == "cuda" else acc
    need_bias = need_bias and bias is not None
    m = n if rows is None else rows.numel()
    work = bool(m and (need_hidden or need_weight or need_bias))
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    # every row of grad_W is written by its slice's first chunk when there is work
    new_w = torch.empty if work else torch.zeros
    grad_w = new_w((vocab, h_dim), dtype=weight.dtype, device=device) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_bias else None
    if work:
        step, width = plan(hidden, weight, m, chunk_tokens, chunk_vocab, need_hidden, need_weight,
                           softcap=capped)

        def per_row(t: Tensor) -> Tensor:
            return t if rows is None else t.index_select(0, rows)

        lab_all = per_row(labels).to(torch.int64)
        g_all, lse_all = per_row(grad_logps).to(acc), per_row(lse).to(acc)
        scored_all = lab_all != ignore_index
        acc_h = torch.empty((m, h_dim), dtype=acc, device=device) if need_hidden else None
        acc_w = torch.empty((width, h_dim), dtype=acc, device=device) \
            if need_weight and weight.dtype != acc else None
        bias_acc = None if bias is None else bias.to(acc)
        buffer = torch.empty(step * width, dtype=acc, device=device)
        # G in its own buffer: half operands, or a cap (the logits tile then holds dz/dL)
        grad_buffer = torch.empty(step * width, dtype=grad_dtype, device=device) \
            if grad_dtype != acc or capped else None
        for v0 in range(0, vocab, width):
            w = weight[v0:v0 + width].to(op)
            ws = w.shape[0]
            target_w = None
            if grad_w is not None:
                target_w = grad_w[v0:v0 + ws] if acc_w is None else acc_w[:ws]
            for start in range(0, m, step):
                sl = slice(start, start + step)
                # every row computed: ignored rows' hidden zeroed for the grad_W GEMM (see doc)
                keep = scored_all[sl] if rows is None and target_w is not None else None
                h_c = _chunk(hidden, rows, start, step, op, keep)
                size = h_c.shape[0]
                sl = slice(start, start + size)
                tile = buffer[:size * ws].view(size, ws)
                grads = tile if grad_buffer is None else grad_buffer[:size * ws].view(size, ws)
                matmul_into(tile, h_c, w.t(), accumulate=False)
                if bias_acc is not None:
                    tile.add_(bias_acc[v0:v0 + ws])
                slope = None
                if capped:  # the PyTorch row pass overwrites the tile: its slope first
                    _softcap_(tile, logit_scale, softcap)
                    if not triton_rows:
                        slope = _softcap_slope_(tile.clone(), logit_scale, softcap)
                softmax_grad_rows(tile, grads, lab_all[sl], scored_all[sl], g_all[sl], lse_all[sl],
                              v0, ignore_index, temperature, triton_rows)
                if capped:
                    if slope is None:  # the Triton row pass left the tile as it was
                        slope = _softcap_slope_(tile, logit_scale, softcap)
                    # ignored rows (their hidden may be non-finite) stay exact zeros
                    grads.mul_(slope.masked_fill_(~scored_all[sl].unsqueeze(1), 0.0))
                first = start == 0
                if acc_h is not None:  # the first slice writes, the later ones add
                    matmul_into(acc_h[sl], grads, w, accumulate=v0 > 0)
                if target_w is not None:
                    matmul_into(target_w, grads.t(), h_c, accumulate=not first)
                if grad_b is not None:
                    grad_b[v0:v0 + ws] += grads.sum(dim=0, dtype=acc)
            if acc_w is not None:
                grad_w[v0:v0 + ws].copy_(acc_w[:ws])  # the slice's fp32 sums, cast once
        if grad_h is not None:
            if rows is None:
                grad_h.copy_(acc_h)
            else:
                grad_h.index_copy_(0, rows, acc_h.to(grad_h.dtype))
    return (grad_h, grad_w, grad_b.to(bias.dtype) if grad_b is not None else None)
