"""``torch.library`` custom ops behind the public log-probability functions.

Three ops, each with a fake (meta) implementation so ``torch.compile`` and DeepSpeed see ordinary
ops:

    fastpo::logps_forward(logits, labels, ignore_index, temperature, with_logits_sum,
                          inplace_backward=False) -> (logps, lse, logits_sum)
    fastpo::logps_backward(grad_logps, logits, labels, lse, ignore_index, temperature) -> dlogits
    fastpo::logps_backward_(grad_logps, logits, labels, lse, ignore_index, temperature)
        -> None, the gradient written into ``logits`` (which is overwritten)

``logits`` is ``[N, V]`` or ``[B, T, V]`` (any strides; a vocab stride other than 1 costs a copy);
``labels`` has the leading shape. Autograd is registered on ``logps_forward``: it saves the
logits, labels and the per-row log-sum-exp, and its backward calls one of the backward ops: the
in-place one when ``inplace_backward`` was asked for and the logits do not overlap themselves
(an expanded tensor cannot hold its own gradient; it gets a fresh one).

Backends: CUDA tensors run the Triton kernels. CPU tensors run the native C++ kernel from
``csrc/`` when it is built, else the chunked PyTorch implementation; ``use_cpu_backend("triton")``
runs the Triton kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from . import checks, logprobs_torch
from .dtypes import accumulation_dtype

CPU_BACKENDS = ("auto", "native", "torch", "triton")
_state = {"cpu_backend": os.environ.get("FASTPO_CPU_BACKEND", "auto"), "warned": False}


def _native():
    """The native module when built, else None (with one warning the first time it is needed)."""
    try:
        from . import native
    except ImportError:
        native = None
    if native is not None and native.AVAILABLE:
        return native
    if not _state["warned"]:
        _state["warned"] = True
        reason = getattr(native, "UNAVAILABLE_REASON", "module missing")
        warnings.warn(f"fastpo: native CPU kernel unavailable ({reason}); using the chunked "
                      "PyTorch implementation", RuntimeWarning, stacklevel=3)
    return None


def set_cpu_backend(name: str) -> None:
    """Choose how CPU tensors are computed: auto (native if built), native, torch or triton."""
    if name not in CPU_BACKENDS:
        raise ValueError(f"unknown CPU backend {name!r}; expected one of {CPU_BACKENDS}")
    _state["cpu_backend"] = name


@contextlib.contextmanager
def use_cpu_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_backend`."""
    previous = _state["cpu_backend"]
    set_cpu_backend(name)
    try:
        yield
    finally:
        _state["cpu_backend"] = previous


def resolve_backend(device: torch.device) -> str:
    """The implementation the ops use for tensors on ``device``."""
    if device.type == "cuda":
        return "triton"
    choice = _state["cpu_backend"]
    if choice == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set "
                               "before triton is imported")
        return "triton"
    if choice == "torch":
        return "torch"
    native = _native()
    if choice == "native" and native is None:
        raise RuntimeError("the native CPU kernel was asked for but is not built")
    return "native" if native is not None else "torch"


def backend_info() -> dict[str, str]:
    """Which implementation each device uses, e.g. ``{"cpu": "native C++ (...)", "cuda": ...}``."""
    try:
        from . import native
        native_text = native.describe() if native.AVAILABLE else None
        reason = native.UNAVAILABLE_REASON
    except ImportError:
        native_text, reason = None, "module missing"
    choice = _state["cpu_backend"]
    if choice == "triton":
        cpu = "triton (interpreter)"
    elif choice == "torch" or native_text is None:
        cpu = "chunked PyTorch" + ("" if choice == "torch" else f" (native kernel: {reason})")
    else:
        cpu = native_text
    cuda = "triton" if torch.cuda.is_available() else "triton (no CUDA device present)"
    return {"cpu": cpu, "cuda": cuda}


def _unit_vocab_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _row_blocks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """2-D ``[rows, V]`` views of same-shape ``[N, V]`` or ``[B, T, V]`` tensors, block by block
    and in the same row order for each tensor, without copying: one block when every tensor is
    viewable as ``[N, V]``, else one block per batch row (e.g. the shifted ``logits[:, :-1]``)."""
    if tensors[0].dim() == 2:
        return [tensors]
    try:
        return [tuple(t.view(-1, t.shape[-1]) for t in tensors)]
    except RuntimeError:
        return list(zip(*(t.unbind(0) for t in tensors)))


def overlaps_itself(t: Tensor) -> bool:
    """True when two elements of ``t`` may share memory (a stride 0 from ``expand``, or any other
    self-overlapping ``as_strided`` view): such a tensor cannot hold its own gradient.

    Sufficient test from the strides: with the dimensions of size > 1 sorted by stride, each
    stride must step past everything the smaller-stride dimensions reach.
    """
    reach = 0  # the largest offset the dimensions seen so far reach from element 0
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


# --------------------------------------------------------------------------- forward


@torch.library.custom_op("fastpo::logps_forward", mutates_args=())
def logps_forward(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    with_logits_sum: bool,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (logps, lse, logits_sum) of the label tokens; see the module docstring."""
    checks.check_label_range(labels, logits.shape[-1], ignore_index)
    logits = _unit_vocab_stride(logits)
    backend = resolve_backend(logits.device)
    if backend == "triton":
        from .logprobs_triton import triton_logps_forward

        return triton_logps_forward(logits, labels, ignore_index, temperature, with_logits_sum)
    flat_labels = labels.reshape(-1).to(torch.int64)
    outs, start = [], 0
    for (view,) in _row_blocks(logits):
        lab = flat_labels[start:start + view.shape[0]].contiguous()
        start += view.shape[0]
        if backend == "native" and view.dtype != torch.float64:
            outs.append(torch.ops.fastpo_native.logps_forward(view, lab, ignore_index,
                                                              float(temperature), with_logits_sum))
        else:
            outs.append(logprobs_torch.chunked_logps_forward(view, lab, ignore_index,
                                                             temperature, with_logits_sum))
    logps, lse, logits_sum = (torch.cat(parts) for parts in zip(*outs))
    sum_shape = labels.shape if with_logits_sum else (0,)
    return logps.view(labels.shape), lse.view(labels.shape), logits_sum.view(sum_shape)


@logps_forward.register_fake
def _(logits, labels, ignore_index, temperature, with_logits_sum, inplace_backward=False):
    dtype = accumulation_dtype(logits)
    sum_shape = labels.shape if with_logits_sum else (0,)
    per_row = labels.shape
    return (logits.new_empty(per_row, dtype=dtype), logits.new_empty(per_row, dtype=dtype),
            logits.new_empty(sum_shape, dtype=dtype))


# --------------------------------------------------------------------------- backward


def _backward_into(grad_logps, logits, labels, lse, ignore_index, temperature, out) -> Tensor:
    """Write dlogits into ``out``, a tensor of logits' shape: a fresh buffer, or ``logits``
    itself (the in-place backward; logits then must not overlap themselves)."""
    backend = resolve_backend(logits.device)
    if backend == "triton":
        from .logprobs_triton import triton_logps_backward

        return triton_logps_backward(grad_logps, logits, labels, lse, ignore_index,
                                     temperature, out)
    flat = [t.reshape(-1) for t in (grad_logps, labels, lse)]
    flat[1] = flat[1].to(torch.int64)
    start = 0
    for view, out_view in _row_blocks(logits, out):
        g, lab, row_lse = (t[start:start + view.shape[0]].contiguous() for t in flat)
        start += view.shape[0]
        if backend == "native" and view.dtype != torch.float64:
            if out_view.data_ptr() != view.data_ptr() or out_view.stride() != view.stride():
                # a fresh block: the logits are copied there and the kernel runs in place on it
                # (no temporary [rows, V] buffer, whatever the logits' row stride)
                out_view.copy_(view)
            torch.ops.fastpo_native.logps_backward(
                g.float(), out_view, lab, row_lse.float(), ignore_index, float(temperature), True)
        else:
            logprobs_torch.chunked_logps_backward(g, view, lab, row_lse, ignore_index,
                                                  temperature, out_view)
    return out


@torch.library.custom_op("fastpo::logps_backward", mutates_args=())
def logps_backward(
    grad_logps: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
) -> Tensor:
    """dlogits = grad · (onehot(label) − softmax(logits / T)) / T, in a new tensor."""
    if logits.stride(-1) != 1:  # a contiguous copy (always new memory) takes the gradient
        copy = logits.clone(memory_format=torch.contiguous_format)
        return _backward_into(grad_logps, copy, labels, lse, ignore_index, temperature, copy)
    blocks = _row_blocks(logits)
    if (len(blocks) == 1 and logits.dtype != torch.float64
            and resolve_backend(logits.device) == "native"):
        # the native kernel allocates the gradient itself: no second [N, V] buffer, no copy
        return torch.ops.fastpo_native.logps_backward(
            grad_logps.reshape(-1), blocks[0][0], labels.reshape(-1).to(torch.int64).contiguous(),
            lse.reshape(-1).float(), ignore_index, float(temperature), False).view(logits.shape)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _backward_into(grad_logps, logits, labels, lse, ignore_index, temperature, out)


@logps_backward.register_fake
def _(grad_logps, logits, labels, lse, ignore_index, temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastpo::logps_backward_", mutates_args=("logits",))
def logps_backward_(
    grad_logps: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
) -> None:
    """In-place form of ``logps_backward``: the gradient overwrites ``logits``, which must not
    overlap itself (the autograd backward uses ``logps_backward`` for such logits instead)."""
    if overlaps_itself(logits):
        raise ValueError(f"fastpo::logps_backward_: the logits (shape {tuple(logits.shape)}, "
                         f"strides {logits.stride()}) share memory between elements (expanded or "
                         "overlapping view) and cannot hold their own gradient; use "
                         "fastpo::logps_backward")
    if logits.stride(-1) == 1:
        _backward_into(grad_logps, logits, labels, lse, ignore_index, temperature, logits)
    else:  # a vocab stride other than 1 is computed in a contiguous copy, then written back
        logits.copy_(logps_backward(grad_logps, logits, labels, lse, ignore_index, temperature))


@logps_backward_.register_fake
def _(grad_logps, logits, labels, lse, ignore_index, temperature):
    return None


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, temperature, _with_sum, inplace_backward = (
        inputs if len(inputs) == 6 else (*inputs, False))
    _logps, lse, logits_sum = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.temperature = temperature
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse, logits_sum)


def _backward(ctx, grad_logps, _grad_lse, _grad_logits_sum):
    logits, labels, lse = ctx.saved_tensors
    if grad_logps is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    grad_logps = grad_logps.contiguous()
    if ctx.inplace_backward and not overlaps_itself(logits):
        torch.ops.fastpo.logps_backward_(grad_logps, logits, labels, lse, ctx.ignore_index,
                                         ctx.temperature)
        grad_logits = logits
    else:
        grad_logits = torch.ops.fastpo.logps_backward(grad_logps, logits, labels, lse,
                                                      ctx.ignore_index, ctx.temperature)
    return grad_logits, None, None, None, None, None


logps_forward.register_autograd(_backward, setup_context=_setup_context)
