"""Label log-probabilities from final hidden states and the lm_head weight, logits never built.

    a[n]           = (hidden[n] @ weightᵀ + bias) · s              (one row of logits, never whole)
    z[n]           = c · tanh(a[n] / c) / T    with a soft-cap c,  else a[n] / T
    token_logps[n] = z[n, labels[n]] − logsumexp(z[n])             (0 where labels[n] == ignore)
    sequence_logps = Σ_t token_logps (``reduction="sum"``) or that / #scored (``"mean"``)

``s`` is ``logit_scale`` (Cohere's), ``c`` is ``softcap`` (Gemma-2's ``final_logit_softcapping``)
and ``T`` the temperature, applied in that order, as the models do; every design applies them on
its tile (the soft-cap's derivative 1 − tanh²(a/c) chained in its backward).

This is the from-logits op of ``logprobs.py`` fused with the lm_head matmul, so that the
``[N, V]`` logits of a large vocabulary (32k tokens × 128k × 4 bytes = 16 GB) never exist. This
module holds the public API, the autograd wiring and the choice of a design; the designs live in
``linear_logprobs_triton.py`` (tile), ``linear_logprobs_gemm.py`` (gemm) and
``linear_logprobs_chunked.py`` (the CPU path); the logits-sum metric in ``linear_logits_sum.py``.

Designs. Where the Triton backend runs (CUDA tensors; CPU tensors under
``use_cpu_backend("triton")`` and Triton's interpreter, how the GPU code is tested without a GPU)
two designs exist, chosen per call and per phase by the roofline model of
``linear_logprobs_cost.py`` (``design="auto"``) or forced with ``design="tile"`` / ``"gemm"``:

    tile   the fused Triton kernels of ``linear_logprobs_triton.py``: a forward that never writes
           a logit (the model's pick for the forward: no-grad reference passes, small N) and a
           backward that adds tile shares with fp32 atomics (atomic-bound at large N); ignored
           tokens are dropped on the device (a sort and a count, no host synchronization);
    gemm   ``linear_logprobs_gemm.py``: cuBLAS GEMMs on token chunks × vocab slices from a memory
           budget (1 GiB beyond the returned gradients at the Llama-3-8B head × 32k tokens), a
           Triton row kernel for the log-sum-exp and the softmax gradient, grad_h / grad_W as GEMMs
           with fp32 accumulation; the model's pick for the backward at every anchor shape.

``deterministic=True`` rules out atomics: the backward takes the gemm design (``"tile"`` with it is
an error); the forward of both designs has none. Other CPU tensors (and float64 anywhere) run the
chunked path of ``linear_logprobs_chunked.py`` unless ``design="gemm"`` asks for the GEMM design
(its row passes then in PyTorch); ``"tile"`` needs the Triton backend.

Scored tokens and the ``num_scored`` hint. No op call waits for the device (no host
synchronization). The GEMM loops are sized on the host, and the number of scored tokens is a
device value, so by default the gemm design computes every one of the N rows: ignored rows come
out exactly zero (logp, lse, their grad_h rows) and add nothing to grad_W / grad_b (their softmax
gradient rows are exact zeros and, in the backward, their hidden rows are masked to zero before
the grad_W GEMM, so even a non-finite hidden state at a padding position cannot leak in). A
caller that knows the count on the host (a trainer whose labels were built on the CPU) passes it
as ``num_scored``: the gemm design then compacts the scored rows on the device with
``torch.nonzero_static(..., size=num_scored)`` (sync-free on CUDA by design: the output size is
the host's) and skips the ignored ones, and the cost model is told the true row count. A wrong
hint is refused, never turned into a wrong number: the device count is compared with it by
``torch._assert_async`` (queued on a GPU; at once on CPU, as a ``ValueError``). The chunked CPU
path gathers the scored rows with ``nonzero`` (free on a CPU) and needs no hint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .dtypes import accumulation_dtype
from .labels import prepare_labels
from .linear_logits_sum import linear_logits_sum
from .linear_logprobs_checks import check_linear_call, uses_triton
from .linear_logprobs_chunked import (
    MAX_CHUNK_TOKENS,
    TILE_BYTES,
    choose_chunks,
    chunked_linear_logps_backward,
    chunked_linear_logps_forward,
)
from .linear_logprobs_cost import Shape, choose_design, device_spec
from .linear_logprobs_gemm import gemm_linear_logps_backward, gemm_linear_logps_forward
from .logprobs import SequenceLogps, reduce_sequences, sequence_totals

__all__ = ["MAX_CHUNK_TOKENS", "TILE_BYTES", "choose_chunks", "linear_logits_sum",
           "linear_sequence_logps", "linear_token_logps"]


def _design(phase: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, design: str,
            deterministic: bool = False, need_hidden: bool = True, need_weight: bool = True,
            num_scored: int = -1) -> str:
    """"chunked" (the CPU path), "tile" or "gemm" for this call's ``phase``; ``num_scored``: the
    host-known scored count (-1: unknown, every row is charged)."""
    if design == "gemm":
        return "gemm"
    if not uses_triton(hidden, weight):
        return "chunked"
    if design == "tile":
        return "tile"
    device = hidden.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    op = torch.promote_types(hidden.dtype, weight.dtype)
    shape = Shape(hidden.shape[0], hidden.shape[1], weight.shape[0], op.itemsize,
                  bias=bias is not None, need_hidden=need_hidden, need_weight=need_weight,
                  tf32=op == torch.float32 and torch.backends.cuda.matmul.allow_tf32,
                  scored=num_scored if num_scored >= 0 else None)
    return choose_design(phase, shape, device_spec(name), deterministic=deterministic)


def _gemm_rows(labels: Tensor, ignore_index: int, num_scored: int) -> Tensor | None:
    """Rows for the gemm design: None (every row, the default) or, with the host-known count
    ``num_scored`` >= 0, the scored rows compacted on the device by ``nonzero_static`` (its output
    size is the host's: no synchronization) after the device-side check of the count."""
    if num_scored < 0:
        return None
    checks.check_num_scored(labels, ignore_index, num_scored)
    return torch.nonzero_static(labels != ignore_index, size=num_scored,
                                fill_value=0).squeeze(1)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastpo::linear_logps_forward", mutates_args=())
def linear_logps_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    chunk_tokens: int = 0,
    chunk_vocab: int = 0,
    design: str = "auto",
    deterministic: bool = False,
    num_scored: int = -1,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    statistics: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logps, lse, stats) per token of 2-D ``hidden [N, H]`` and ``weight [V, H]``; ``labels``
    of any shape with N elements (logps and lse take its shape; a bad label is reported there).
    ``deterministic`` only travels to the backward (the forwards have no atomics);
    ``num_scored``: host-known scored count (-1: unknown), checked on the device; ``softcap``
    0.0: none; ``statistics``: stats ``[4, N]`` of the same pass (tile gives way to gemm)."""
    transform = {"logit_scale": logit_scale, "softcap": softcap}
    checks.check_label_range(labels, weight.shape[0], ignore_index)
    flat = labels.reshape(-1)
    chosen = _design("forward", hidden, weight, bias, design, num_scored=num_scored)
    chosen = "gemm" if statistics and chosen == "tile" else chosen
    stats = hidden.new_empty(0, dtype=accumulation_dtype(hidden, weight, bias))
    if chosen == "gemm":
        logps, lse, stats = gemm_linear_logps_forward(
            hidden, weight, bias, flat, ignore_index, temperature,
            rows=_gemm_rows(flat, ignore_index, num_scored),
            triton_rows=uses_triton(hidden, weight), chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab, statistics=statistics, **transform)
    else:
        # whatever the design, a wrong hint is refused at the first call
        checks.check_num_scored(flat, ignore_index, num_scored)
        if chosen == "tile":
            from .linear_logprobs_triton import triton_linear_logps_forward

            logps, lse = triton_linear_logps_forward(hidden, weight, bias, flat, ignore_index,
                                                     temperature, **transform)
        else:
            logps, lse, stats = chunked_linear_logps_forward(
                hidden, weight, bias, flat, ignore_index, temperature, chunk_tokens,
                chunk_vocab, statistics=statistics, **transform)
    return logps.view(labels.shape), lse.view(labels.shape), stats


@linear_logps_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, chunk_tokens=0, chunk_vocab=0,
      design="auto", deterministic=False, num_scored=-1, logit_scale=1.0, softcap=0.0,
      statistics=False):
    dtype = accumulation_dtype(hidden, weight, bias)
    return (hidden.new_empty(labels.shape, dtype=dtype),
            hidden.new_empty(labels.shape, dtype=dtype),
            hidden.new_empty((4, labels.numel()) if statistics else (0,), dtype=dtype))


@torch.library.custom_op("fastpo::linear_logps_backward", mutates_args=())
def linear_logps_backward(
    grad_logps: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    chunk_tokens: int,
    chunk_vocab: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    design: str = "auto",
    deterministic: bool = False,
    num_scored: int = -1,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not needed is an empty tensor.
    ``num_scored``: the host-known count of scored labels (-1: unknown; the gemm design then
    computes every row); ``softcap`` 0.0: none."""
    transform = {"logit_scale": logit_scale, "softcap": softcap}
    grad_logps, labels, lse = grad_logps.reshape(-1), labels.reshape(-1), lse.reshape(-1)
    chosen = _design("backward", hidden, weight, bias, design, deterministic, need_hidden,
                     need_weight, num_scored)
    if chosen == "gemm":
        grads = gemm_linear_logps_backward(
            grad_logps, hidden, weight, bias, labels, lse, ignore_index, temperature,
            need_hidden, need_weight, need_bias,
            rows=_gemm_rows(labels, ignore_index, num_scored),
            triton_rows=uses_triton(hidden, weight), chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab, **transform)
    elif chosen == "tile":
        from .linear_logprobs_triton import triton_linear_logps_backward

        grads = triton_linear_logps_backward(grad_logps, hidden, weight, bias, labels, lse,
                                             ignore_index, temperature, need_hidden,
                                             need_weight, need_bias, vocab_chunk=chunk_vocab,
                                             **transform)
    else:
        grads = chunked_linear_logps_backward(grad_logps, hidden, weight, bias, labels, lse,
                                              ignore_index, temperature, chunk_tokens,
                                              chunk_vocab, need_hidden, need_weight, need_bias,
                                              **transform)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_logps_backward.register_fake
def _(grad_logps, hidden, weight, bias, labels, lse, ignore_index, temperature, chunk_tokens,
      chunk_vocab, need_hidden, need_weight, need_bias, design="auto", deterministic=False,
      num_scored=-1, logit_scale=1.0, softcap=0.0):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias and bias is not None else empty)


# defaults of the forward op's options: chunk_tokens, chunk_vocab, design, deterministic,
# num_scored, logit_scale, softcap, statistics
_FORWARD_OPTIONS = (0, 0, "auto", False, -1, 1.0, 0.0, False)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, temperature, *rest = inputs
    _logps, lse, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.mark_non_differentiable(lse, stats)
    chunk_tokens, chunk_vocab, design, deterministic, num_scored, logit_scale, softcap, _ = (
        *rest, *_FORWARD_OPTIONS[len(rest):])
    ctx.args = (ignore_index, temperature, chunk_tokens, chunk_vocab)
    ctx.options = (design, deterministic, num_scored, logit_scale, softcap)


def _backward(ctx, grad_logps, _grad_lse, _grad_stats):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    nothing = (None,) * (3 + len(_FORWARD_OPTIONS))  # labels, ignore_index, temperature, options
    if grad_logps is None or not (need_h or need_w or need_b):
        return (None, None, None, *nothing)
    grads = torch.ops.fastpo.linear_logps_backward(
        grad_logps.contiguous(), hidden, weight, bias, labels, lse, *ctx.args,
        need_h, need_w, need_b and bias is not None, *ctx.options)
    return (*(g if need else None for g, need in zip(grads, (need_h, need_w, need_b))), *nothing)


linear_logps_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def linear_token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    chunk_vocab: int = 0,
    design: str = "auto",
    deterministic: bool = False,
    num_scored: int | None = None,
    shift: bool = False,
    reduction: str = "none",
    sequence_ids: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """log softmax(z)[label] per token, z = transform(hidden @ weightᵀ + bias), without the logits.

    Args:
        hidden: final hidden states ``[N, H]`` or ``[B, T, H]`` (fp32, bf16, fp16 or fp64).
        weight: the lm_head weight ``[V, H]`` (may be the tied input embedding).
        labels: int64/int32 shifted labels of the leading shape; ``ignore_index`` where not scored.
        bias: optional lm_head bias ``[V]``.
        temperature: the logits are divided by it before the softmax (after the soft-cap).
        logit_scale: the logits are multiplied by it first (Cohere's ``logit_scale``; a model's
            ``logits_scaling`` divisor d is ``logit_scale=1/d``); finite, > 0.
        softcap: None, or c > 0: the scaled logits a become ``c·tanh(a / c)`` (Gemma-2's
            ``final_logit_softcapping``) before the temperature.
        chunk_tokens, chunk_vocab: tile of the CPU path and of the gemm design (0: chosen from
            the shapes, for the gemm design from its memory budget); for the tile design
            ``chunk_vocab`` is the vocab rows per backward launch (0: an fp32 weight-gradient
            accumulator of at most 256 MiB).
        design: "auto" (the cost model's pick per phase), "gemm" or "tile" (see the module doc).
        deterministic: bit-reproducible gradients (no atomics: the backward takes the gemm
            design).
        num_scored: the number of labels that are not ``ignore_index``, when the caller knows
            it on the host (labels built on the CPU): the gemm design then skips the ignored
            rows instead of computing them (zeros either way); no host synchronization. It is
            checked against the labels on the device: a wrong count fails the call
            (``ValueError`` on CPU, a device-side assert on a GPU), never a wrong number.
        shift, reduction, sequence_ids: as in :func:`fastpo.kernels.token_logps` (unshifted
            labels; only ``"none"``; packed ids for the shift); ``num_scored`` counts the
            labels after the shift.

    Returns float32 (float64 for float64 inputs) logps of the leading shape, exactly 0 where
    ignored. Differentiable w.r.t. hidden, weight and bias.
    """
    labels = prepare_labels(labels, ignore_index, shift=shift, reduction=reduction,
                            per_token=True, sequence_ids=sequence_ids)
    check_linear_call(hidden, weight, labels, bias, ignore_index, temperature, chunk_tokens,
                      chunk_vocab, design, deterministic, num_scored, logit_scale, softcap)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logps, _lse, _stats = torch.ops.fastpo.linear_logps_forward(
        flat_hidden, weight, bias, labels, ignore_index, float(temperature), chunk_tokens,
        chunk_vocab, design, deterministic, -1 if num_scored is None else num_scored,
        float(logit_scale), 0.0 if softcap is None else float(softcap))
    return logps


def linear_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "sum",
    with_logits_sum: bool = False,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    chunk_tokens: int = 0,
    chunk_vocab: int = 0,
    design: str = "auto",
    deterministic: bool = False,
    num_scored: int | None = None,
    shift: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> SequenceLogps:
    """Per-sequence log-probs of the label tokens from hidden states (see ``linear_token_logps``).

    ``reduction="mean"`` divides by the number of scored tokens (0 for a sequence with none).
    ``with_logits_sum`` adds, per sequence, the sum over scored tokens and the vocabulary of the
    raw logits, ``Σ_n (h_n · Σ_v W_v + Σ_v b_v)``, computed in closed form without gradient (for
    TRL's ``logits/*`` metrics; before ``logit_scale`` / ``softcap`` / temperature).
    ``softcap`` / ``logit_scale``: the logit transform, see ``linear_token_logps``.
    Packed input: ``sequence_ids``/``num_sequences`` as in
    :func:`fastpo.kernels.sequence_logps`. ``design`` / ``deterministic`` / ``num_scored``: see
    ``linear_token_logps``. ``shift``: as in :func:`fastpo.kernels.sequence_logps`.
    """
    labels = prepare_labels(labels, ignore_index, shift=shift, reduction=reduction,
                            per_token=False, sequence_ids=sequence_ids)
    per_token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   temperature=temperature, chunk_tokens=chunk_tokens,
                                   chunk_vocab=chunk_vocab, design=design,
                                   deterministic=deterministic, num_scored=num_scored,
                                   softcap=softcap, logit_scale=logit_scale)
    scored = labels != ignore_index
    totals, counts = sequence_totals(per_token, scored, reduction=reduction,
                                     sequence_ids=sequence_ids, num_sequences=num_sequences)
    logits_sum = None
    if with_logits_sum:
        row_sums = linear_logits_sum(hidden, weight, bias)
        row_sums = torch.where(scored, row_sums, torch.zeros_like(row_sums))
        logits_sum, _ = reduce_sequences(row_sums, scored, sequence_ids=sequence_ids,
                                         num_sequences=num_sequences)
    return SequenceLogps(totals, counts, logits_sum)
