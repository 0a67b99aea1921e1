"""Label log-probabilities from final hidden states and the lm_head weight, logits never built.

    z[n]           = (hidden[n] @ weightᵀ + bias) / T              (one row of logits, never whole)
    token_logps[n] = z[n, labels[n]] − logsumexp(z[n])             (0 where labels[n] == ignore)
    sequence_logps = Σ_t token_logps (``reduction="sum"``) or that / #scored (``"mean"``)

This is the from-logits op of ``logprobs.py`` fused with the lm_head matmul, so that the
``[N, V]`` logits of a large vocabulary (32k tokens × 128k × 4 bytes = 16 GB) never exist. Tokens
whose label is ``ignore_index`` (prompt, padding) are dropped before any compute.

Designs. Where the Triton backend runs (CUDA tensors; CPU tensors under
``use_cpu_backend("triton")`` and Triton's interpreter, how the GPU code is tested without a GPU)
two designs exist, chosen per call and per phase by the roofline model of ``linear_cost.py``
(``design="auto"``) or forced with ``design="tile"`` / ``"gemm"``:

    tile   the fused Triton kernels of ``linear_logprobs_triton.py``: a forward that never writes
           a logit (the model's pick for the forward: no-grad reference passes, small N) and a
           backward that adds tile shares with fp32 atomics (atomic-bound at large N);
    gemm   ``linear_gemm.py``: cuBLAS GEMMs on token chunks × vocab slices from a memory budget
           (1 GiB beyond the returned gradients at the Llama-3-8B head × 32k tokens), a Triton
           row kernel for the log-sum-exp and the softmax gradient, grad_h / grad_W as GEMMs with
           fp32 accumulation; the model's pick for the backward at every anchor shape.

``deterministic=True`` rules out atomics: the backward takes the gemm design (``"tile"`` with it is
an error); the forward of both designs has none. Other CPU tensors (and float64 anywhere) run the
chunked path below unless ``design="gemm"`` asks for the GEMM design (its row passes then in
PyTorch); ``"tile"`` needs the Triton backend.

Scored tokens on CUDA. The gemm backward drops ignored tokens before any compute, which needs
their count on the host: the forward starts a non-blocking copy of the count into pinned memory
and the backward reads it after waiting for its event (recorded in the forward, long passed by the
time the backward runs; no stream synchronization). Where the count is not available (under
``torch.compile``) every row is computed in order and the ignored ones come out exactly zero.

CPU path. The scored tokens are gathered (``nonzero`` on the labels: one host synchronization for
their count, free on a CPU) and walked in chunks of ``chunk_tokens``; for each chunk the vocabulary
is walked in slices of ``chunk_vocab``. One fp32 ``[chunk_tokens, chunk_vocab]`` tile of logits
exists at a time (a matmul writes it into a reused buffer):

    forward   tile = h_c W_sᵀ + b_s (h_c pre-scaled by 1/T); lse_c = logaddexp over slices of the
              tile's log-sum-exp; the label logit is gathered from the tile that holds it.
    backward  the tile is recomputed and turned in place into dlogits = g (onehot − exp(z − lse))/T
              (only the saved lse is needed); then grad_h_c += dlogits W_s,
              grad_W_s += dlogitsᵀ h_c, grad_b_s += Σ_n dlogits.

bf16/fp16 inputs are computed in fp32 (bf16 matmuls are slow on CPUs without bf16 units), so the
results are fp32-accurate; grad_W and grad_b accumulate in fp32 and are cast to the parameter
dtype once. Memory beyond the outputs: one tile (8 MiB by default), a few ``[chunk_tokens, H]``
fp32 buffers and an fp32 grad_W accumulator when the weight is not fp32.

Cost: four matmuls per training step over the scored tokens (forward, recomputed logits, grad_h,
grad_W) against three over all tokens for an implementation that keeps the logits: the recompute
is what keeps memory flat, dropping prompt and padding tokens is what pays for it; a frozen weight
(LoRA) skips the grad_W matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from . import ops as _ops
from .linear_cost import Shape, choose_design, device_spec
from .linear_gemm import gemm_linear_logps_backward, gemm_linear_logps_forward
from .logprobs import SequenceLogps, reduce_sequences, sequence_totals

# Bytes of one fp32 logits tile of the CPU path, and the most tokens in one chunk.
TILE_BYTES = 8 * 2**20
MAX_CHUNK_TOKENS = 1024
_VOCAB_ALIGN = 64
DESIGNS = ("auto", "gemm", "tile")


def choose_chunks(n_tokens: int, vocab: int, *, chunk_tokens: int = 0,
                  chunk_vocab: int = 0) -> tuple[int, int]:
    """(tokens, vocab entries) per CPU tile; a non-positive argument means "choose"."""
    tokens = chunk_tokens if chunk_tokens > 0 else min(max(n_tokens, 1), MAX_CHUNK_TOKENS)
    if chunk_vocab > 0:
        cols = chunk_vocab
    else:
        cols = max(_VOCAB_ALIGN, TILE_BYTES // (4 * tokens) // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return max(1, min(tokens, max(n_tokens, 1))), max(1, min(cols, max(vocab, 1)))


def _acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _use_triton(hidden: Tensor, weight: Tensor) -> bool:
    if _acc_dtype(hidden, weight) == torch.float64:
        return False
    return _ops.resolve_backend(hidden.device) == "triton"


def _design(phase: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, design: str,
            deterministic: bool = False, need_hidden: bool = True,
            need_weight: bool = True) -> str:
    """"chunked" (the CPU path), "tile" or "gemm" for this call's ``phase``."""
    if design == "gemm":
        return "gemm"
    if not _use_triton(hidden, weight):
        return "chunked"
    if design == "tile":
        return "tile"
    device = hidden.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    op = torch.promote_types(hidden.dtype, weight.dtype)
    shape = Shape(hidden.shape[0], hidden.shape[1], weight.shape[0], op.itemsize,
                  bias=bias is not None, need_hidden=need_hidden, need_weight=need_weight,
                  tf32=op == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    return choose_design(phase, shape, device_spec(name), deterministic=deterministic)


def _gemm_rows(labels: Tensor, ignore_index: int, scored_count: int) -> Tensor | None:
    """Rows for the gemm design: the scored ones (CPU: ``nonzero``, free there; CUDA: a device
    sort cut at the host-known count), or None (every row) on CUDA when the count is unknown."""
    if labels.device.type != "cuda":
        return _scored_rows(labels, ignore_index)
    if scored_count < 0:
        return None
    order = torch.argsort((labels == ignore_index).to(torch.int8), stable=True)
    return order[:scored_count]


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


def _chunk_inputs(hidden, labels, rows, acc, inv_t):
    """(h_c, h_c / T, labels_c) of one chunk of scored rows, in the accumulation dtype."""
    h = hidden.index_select(0, rows).to(acc)
    scaled = h if inv_t == 1.0 else h * inv_t
    return h, scaled, labels.index_select(0, rows).to(torch.int64)


def _label_cols(lab: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    """Column of each label inside the slice ``[start, start + width)`` (clamped) and a mask."""
    local = lab - start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside


def chunked_linear_logps_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                 labels: Tensor, ignore_index: int, temperature: float,
                                 chunk_tokens: int = 0, chunk_vocab: int = 0
                                 ) -> tuple[Tensor, Tensor]:
    """(logps, lse) of 2-D ``hidden [N, H]`` with the chunked matmul path; see the module doc."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden, weight, bias)
    logps = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    rows_all = _scored_rows(labels, ignore_index)
    if rows_all.numel() == 0 or vocab == 0:
        return logps, lse
    step, width = choose_chunks(rows_all.numel(), vocab, chunk_tokens=chunk_tokens,
                                chunk_vocab=chunk_vocab)
    inv_t = 1.0 / temperature
    bias_t = None if bias is None else bias.to(acc) * inv_t
    buffer = torch.empty(step * width, dtype=acc, device=hidden.device)
    native = _native_tiles(acc, hidden.device)
    for start in range(0, rows_all.numel(), step):
        rows = rows_all[start:start + step]
        _, h_scaled, lab = _chunk_inputs(hidden, labels, rows, acc, inv_t)
        running = torch.full((rows.numel(),), float("-inf"), dtype=acc, device=hidden.device)
        picked = torch.zeros(rows.numel(), dtype=acc, device=hidden.device)
        for v0 in range(0, vocab, width):
            w = weight[v0:v0 + width].to(acc)
            tile = buffer[:rows.numel() * w.shape[0]].view(rows.numel(), w.shape[0])
            torch.mm(h_scaled, w.t(), out=tile)
            if bias_t is not None:
                tile.add_(bias_t[v0:v0 + width])
            col, inside = _label_cols(lab, v0, w.shape[0])
            picked += torch.where(inside, tile.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)
            running = torch.logaddexp(running, _tile_lse(tile, col, native))
        logps[rows] = picked - running
        lse[rows] = running
    return logps, lse


def chunked_linear_logps_backward(grad_logps: Tensor, hidden: Tensor, weight: Tensor,
                                  bias: Tensor | None, labels: Tensor, lse: Tensor,
                                  ignore_index: int, temperature: float, chunk_tokens: int,
                                  chunk_vocab: int, need_hidden: bool, need_weight: bool,
                                  need_bias: bool) -> tuple[Tensor | None, ...]:
    """(grad_hidden, grad_weight, grad_bias) with the chunked path; None where not needed."""
    vocab, h_dim = weight.shape
    acc = _acc_dtype(hidden, weight, bias)
    device = hidden.device
    need_bias = need_bias and bias is not None
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_w = torch.zeros((vocab, h_dim), dtype=acc, device=device) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_bias else None
    rows_all = _scored_rows(labels, ignore_index)
    if rows_all.numel() and vocab and (need_hidden or need_weight or need_bias):
        step, width = choose_chunks(rows_all.numel(), vocab, chunk_tokens=chunk_tokens,
                                    chunk_vocab=chunk_vocab)
        inv_t = 1.0 / temperature
        bias_t = None if bias is None else bias.to(acc) * inv_t
        buffer = torch.empty(step * width, dtype=acc, device=device)
        native = _native_tiles(acc, device)
        for start in range(0, rows_all.numel(), step):
            rows = rows_all[start:start + step]
            h, h_scaled, lab = _chunk_inputs(hidden, labels, rows, acc, inv_t)
            scale = grad_logps.index_select(0, rows).to(acc) * inv_t  # g / T
            row_lse = lse.index_select(0, rows).to(acc)
            acc_h = torch.zeros((rows.numel(), h_dim), dtype=acc, device=device) \
                if need_hidden else None
            for v0 in range(0, vocab, width):
                w = weight[v0:v0 + width].to(acc)
                tile = buffer[:rows.numel() * w.shape[0]].view(rows.numel(), w.shape[0])
                torch.mm(h_scaled, w.t(), out=tile)
                if bias_t is not None:
                    tile.add_(bias_t[v0:v0 + width])
                col, inside = _label_cols(lab, v0, w.shape[0])
                _tile_dlogits_(tile, row_lse, scale, col, inside, native)
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
) -> tuple[Tensor, Tensor]:
    """(logps, lse) per token of 2-D ``hidden [N, H]`` and ``weight [V, H]``; ``labels`` of any
    shape with N elements (the outputs take its shape, and a bad label is reported there).
    ``deterministic`` only travels to the backward (the forwards have no atomics)."""
    checks.check_label_range(labels, weight.shape[0], ignore_index)
    flat = labels.reshape(-1)
    chosen = _design("forward", hidden, weight, bias, design)
    if chosen == "tile":
        from .linear_logprobs_triton import triton_linear_logps_forward

        logps, lse = triton_linear_logps_forward(hidden, weight, bias, flat, ignore_index,
                                                 temperature)
    elif chosen == "gemm":
        logps, lse = gemm_linear_logps_forward(
            hidden, weight, bias, flat, ignore_index, temperature,
            rows=_gemm_rows(flat, ignore_index, -1), triton_rows=_use_triton(hidden, weight),
            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    else:
        logps, lse = chunked_linear_logps_forward(hidden, weight, bias, flat, ignore_index,
                                                  temperature, chunk_tokens, chunk_vocab)
    return logps.view(labels.shape), lse.view(labels.shape)


@linear_logps_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, chunk_tokens=0, chunk_vocab=0,
      design="auto", deterministic=False):
    dtype = _acc_dtype(hidden, weight, bias)
    return (hidden.new_empty(labels.shape, dtype=dtype),
            hidden.new_empty(labels.shape, dtype=dtype))


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
    scored_count: int = -1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not needed is an empty tensor.
    ``scored_count``: the number of scored tokens when the host knows it (else -1)."""
    grad_logps, labels, lse = grad_logps.reshape(-1), labels.reshape(-1), lse.reshape(-1)
    chosen = _design("backward", hidden, weight, bias, design, deterministic, need_hidden,
                     need_weight)
    if chosen == "gemm":
        grads = gemm_linear_logps_backward(
            grad_logps, hidden, weight, bias, labels, lse, ignore_index, temperature,
            need_hidden, need_weight, need_bias,
            rows=_gemm_rows(labels, ignore_index, scored_count),
            triton_rows=_use_triton(hidden, weight), chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab)
    elif chosen == "tile":
        from .linear_logprobs_triton import triton_linear_logps_backward

        grads = triton_linear_logps_backward(grad_logps, hidden, weight, bias, labels, lse,
                                             ignore_index, temperature, need_hidden,
                                             need_weight, need_bias, vocab_chunk=chunk_vocab)
    else:
        grads = chunked_linear_logps_backward(grad_logps, hidden, weight, bias, labels, lse,
                                              ignore_index, temperature, chunk_tokens,
                                              chunk_vocab, need_hidden, need_weight, need_bias)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_logps_backward.register_fake
def _(grad_logps, hidden, weight, bias, labels, lse, ignore_index, temperature, chunk_tokens,
      chunk_vocab, need_hidden, need_weight, need_bias, design="auto", deterministic=False,
      scored_count=-1):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias and bias is not None else empty)


def _count_to_host(labels: Tensor, ignore_index: int) -> tuple[Tensor, object] | None:
    """Start copying the scored-token count of CUDA ``labels`` to pinned host memory without a
    synchronization: (host tensor, event to wait on before reading it); None elsewhere."""
    from torch._subclasses.fake_tensor import is_fake

    if labels.device.type != "cuda" or torch.compiler.is_compiling() or is_fake(labels):
        return None
    host = torch.empty((), dtype=torch.int64, pin_memory=True)
    host.copy_((labels != ignore_index).sum(), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, temperature, *rest = inputs
    _logps, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.mark_non_differentiable(lse)
    defaults = (0, 0, "auto", False)  # chunk_tokens, chunk_vocab, design, deterministic
    chunk_tokens, chunk_vocab, design, deterministic = (*rest, *defaults[len(rest):])
    ctx.args = (ignore_index, temperature, chunk_tokens, chunk_vocab)
    ctx.design = (design, deterministic)
    ctx.count = None
    if _design("backward", hidden, weight, bias, design, deterministic) == "gemm":
        ctx.count = _count_to_host(labels, ignore_index)


def _backward(ctx, grad_logps, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    nothing = (None,) * 7
    if grad_logps is None or not (need_h or need_w or need_b):
        return (None, None, None, *nothing)
    scored_count = -1
    if ctx.count is not None:
        host, event = ctx.count
        event.synchronize()  # recorded in the forward: normally long complete
        scored_count = int(host)
    grads = torch.ops.fastpo.linear_logps_backward(
        grad_logps.contiguous(), hidden, weight, bias, labels, lse, *ctx.args,
        need_h, need_w, need_b and bias is not None, *ctx.design, scored_count)
    return (*(g if need else None for g, need in zip(grads, (need_h, need_w, need_b))), *nothing)


linear_logps_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
           ignore_index: int, temperature: float, chunk_tokens: int, chunk_vocab: int,
           design: str = "auto", deterministic: bool = False) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)}: expected weight of shape [V, {hidden.shape[-1]}]"
                         " (a ZeRO-3 partitioned weight must be gathered first: "
                         "fastpo.kernels.zero3.gathered_lm_head)")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)}: expected labels of shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight shape "
                         f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    checks.check_temperature(temperature)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = automatic), got {value!r}")
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; expected one of {DESIGNS}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if design == "tile" and deterministic:
        raise ValueError("design='tile' adds gradient shares with atomics and cannot be "
                         "deterministic; use design='gemm' or 'auto' with deterministic=True")
    if design == "tile" and not _use_triton(hidden, weight):
        raise ValueError("design='tile' needs the Triton backend (CUDA tensors, or CPU tensors "
                         "under use_cpu_backend('triton')) and no float64 input; got "
                         f"{hidden.dtype}/{weight.dtype} tensors on {hidden.device}")


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
) -> Tensor:
    """log softmax((hidden @ weightᵀ + bias) / T)[label] per token, without the logits.

    Args:
        hidden: final hidden states ``[N, H]`` or ``[B, T, H]`` (fp32, bf16, fp16 or fp64).
        weight: the lm_head weight ``[V, H]`` (may be the tied input embedding).
        labels: int64/int32 shifted labels of the leading shape; ``ignore_index`` where not scored.
        bias: optional lm_head bias ``[V]``.
        temperature: the logits are divided by it before the softmax.
        chunk_tokens, chunk_vocab: tile of the CPU path and of the gemm design (0: chosen from
            the shapes, for the gemm design from its memory budget); for the tile design
            ``chunk_vocab`` is the vocab rows per backward launch (0: an fp32 weight-gradient
            accumulator of at most 256 MiB).
        design: "auto" (the cost model's pick per phase), "gemm" or "tile" (see the module doc).
        deterministic: bit-reproducible gradients (no atomics: the backward takes the gemm
            design).

    Returns float32 (float64 for float64 inputs) logps of the leading shape, exactly 0 where
    ignored. Differentiable w.r.t. hidden, weight and bias.
    """
    _check(hidden, weight, labels, bias, ignore_index, temperature, chunk_tokens, chunk_vocab,
           design, deterministic)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logps, _lse = torch.ops.fastpo.linear_logps_forward(
        flat_hidden, weight, bias, labels, ignore_index, float(temperature), chunk_tokens,
        chunk_vocab, design, deterministic)
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
) -> SequenceLogps:
    """Per-sequence log-probs of the label tokens from hidden states (see ``linear_token_logps``).

    ``reduction="mean"`` divides by the number of scored tokens (0 for a sequence with none).
    ``with_logits_sum`` adds, per sequence, the sum over scored tokens and the vocabulary of the
    raw logits, ``Σ_n (h_n · Σ_v W_v + Σ_v b_v)``, computed in closed form without gradient (for
    TRL's ``logits/*`` metrics). Packed input: ``sequence_ids``/``num_sequences`` as in
    :func:`fastpo.kernels.sequence_logps`. ``design`` / ``deterministic``: see
    ``linear_token_logps``.
    """
    checks.check_reduction(reduction)
    per_token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   temperature=temperature, chunk_tokens=chunk_tokens,
                                   chunk_vocab=chunk_vocab, design=design,
                                   deterministic=deterministic)
    scored = labels != ignore_index
    totals, counts = sequence_totals(per_token, scored, reduction=reduction,
                                     sequence_ids=sequence_ids, num_sequences=num_sequences)
    logits_sum = None
    if with_logits_sum:
        with torch.no_grad():
            acc = per_token.dtype
            column_sum = weight.sum(dim=0, dtype=acc)
            row_sums = hidden.to(acc) @ column_sum
            if bias is not None:
                row_sums = row_sums + bias.sum(dtype=acc)
            row_sums = torch.where(scored, row_sums, torch.zeros((), dtype=acc,
                                                                 device=row_sums.device))
            logits_sum, _ = reduce_sequences(row_sums, scored, sequence_ids=sequence_ids,
                                             num_sequences=num_sequences)
    return SequenceLogps(totals, counts, logits_sum)
