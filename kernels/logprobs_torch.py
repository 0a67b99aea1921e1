"""The from-logits log-probability op in plain PyTorch (no Triton, no native code).

Two roles:
- ``token_logps_reference`` is the float64 test oracle every kernel is compared against.
- ``chunked_logps_forward`` / ``chunked_logps_backward`` are the ``"torch"`` CPU backend of
  ``ops.py``: the memory-lean CPU fallback used when the native kernel is not built: rows are
  processed in chunks so that at most one chunk of float32 temporaries exists at a time. They
  select the scored rows with ``nonzero`` (which reads the labels on the host): CPU tensors only;
  CUDA tensors always run the Triton kernels.

Math, per row n with x = logits[n] / T and label y:
    lse    = log Σ_j exp(x_j)
    logp   = x_y − lse
    ∂logp/∂logits_j = (onehot(y)_j − softmax(x)_j) / T
"""

from __future__ import annotations

import torch

from .dtypes import accumulation_dtype

# Bytes of float32 temporaries one chunk may hold in the CPU fallback.
CHUNK_BYTES = 64 * 2**20


def token_logps_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log_softmax(logits / T)[label] in float64, exactly 0 where ``label == ignore_index``."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    scored = labels != ignore_index
    safe = torch.where(scored, labels, torch.zeros_like(labels)).long()
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def _scored_row_chunks(labels: torch.Tensor, ignore_index: int, vocab: int):
    """Index tensors of scored rows, a chunk at a time: ignored rows cost nothing."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    step = _chunk_rows(vocab)
    for start in range(0, rows.numel(), step):
        yield rows[start:start + step]


def chunked_logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    temperature: float,
    with_logits_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, lse, logits_sum) of 2-D ``[N, V]`` logits, one chunk of scored rows at a time."""
    n, vocab = logits.shape
    acc = accumulation_dtype(logits)
    logps = torch.zeros(n, dtype=acc, device=logits.device)
    lse = torch.zeros(n, dtype=acc, device=logits.device)
    logits_sum = torch.zeros(n if with_logits_sum else 0, dtype=acc, device=logits.device)
    for rows in _scored_row_chunks(labels, ignore_index, vocab):
        raw = logits.index_select(0, rows).to(acc)
        x = raw / temperature
        # max-shifted log-sum-exp written out (not torch.logsumexp, which maps a +inf logit to
        # lse = +inf and so a finite -inf logp): a +inf or NaN logit makes the row NaN, as in
        # log_softmax and the kernels.
        row_max = x.amax(dim=-1, keepdim=True)
        shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
        row_lse = (shift + torch.log(torch.exp(x - shift).sum(-1, keepdim=True))).squeeze(-1)
        picked = x.gather(1, labels.index_select(0, rows).long().unsqueeze(1)).squeeze(1)
        logps[rows] = picked - row_lse
        lse[rows] = row_lse
        if with_logits_sum:
            logits_sum[rows] = raw.sum(-1)
    return logps, lse, logits_sum


def chunked_logps_backward(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``grad · (onehot − softmax) / T`` into ``out`` (which may be ``logits`` itself).

    Each chunk is read into a float32 temporary before ``out`` is written, so ``out is logits``
    (the in-place backward) is safe. Ignored rows are set to exactly 0.
    """
    vocab = logits.shape[1]
    acc = accumulation_dtype(logits)
    for rows in _scored_row_chunks(labels, ignore_index, vocab):
        x = logits.index_select(0, rows).to(acc) / temperature
        g = (grad_logps.index_select(0, rows).to(acc) / temperature).unsqueeze(1)
        d = torch.exp(x - lse.index_select(0, rows).to(acc).unsqueeze(1)).mul_(-g)
        d.scatter_add_(1, labels.index_select(0, rows).long().unsqueeze(1), g)
        out.index_copy_(0, rows, d.to(out.dtype))
    # ignored rows: exact zeros (an empty index is a no-op, no test of the mask on the host)
    out.index_fill_(0, (labels == ignore_index).nonzero().squeeze(1), 0)
    return out
