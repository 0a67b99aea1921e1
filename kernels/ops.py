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
logits, labels and the per-row log-sum-exp, and its backward calls one of the backward ops.

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

from . import checks, reference

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


def _row_views(t: Tensor) -> list[Tensor]:
    """2-D views covering the rows of a [N, V] or [B, T, V] tensor in order, without copying."""
    if t.dim() == 2:
        return [t]
    try:
        return [t.view(-1, t.shape[-1])]
    except RuntimeError:
        return list(t.unbind(0))


def _float_dtype(logits: Tensor) -> torch.dtype:
    return reference.accumulation_dtype(logits.dtype)


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
        from .triton_logprobs import triton_logps_forward

        return triton_logps_forward(logits, labels, ignore_index, temperature, with_logits_sum)
    flat_labels = labels.reshape(-1).to(torch.int64)
    outs, start = [], 0
    for view in _row_views(logits):
        lab = flat_labels[start:start + view.shape[0]].contiguous()
        start += view.shape[0]
        if backend == "native" and view.dtype != torch.float64:
            outs.append(torch.ops.fastpo_native.logps_forward(view, lab, ignore_index,
                                                              float(temperature), with_logits_sum))
        else:
            outs.append(reference.chunked_logps_forward(view, lab, ignore_index, temperature,
                                                        with_logits_sum))
    logps, lse, logits_sum = (torch.cat(parts) for parts in zip(*outs))
    sum_shape = labels.shape if with_logits_sum else (0,)
    return logps.view(labels.shape), lse.view(labels.shape), logits_sum.view(sum_shape)


@logps_forward.register_fake
def _(logits, labels, ignore_index, temperature, with_logits_sum, inplace_backward=False):
    dtype = _float_dtype(logits)
    sum_shape = labels.shape if with_logits_sum else (0,)
    per_row = labels.shape
    return (logits.new_empty(per_row, dtype=dtype), logits.new_empty(per_row, dtype=dtype),
            logits.new_empty(sum_shape, dtype=dtype))


# --------------------------------------------------------------------------- backward


def _backward_into(grad_logps, logits, labels, lse, ignore_index, temperature, out) -> Tensor:
    """Write dlogits into ``out`` (a [.., V] tensor of logits' shape, possibly ``logits``)."""
    backend = resolve_backend(logits.device)
    if backend == "triton":
        from .triton_logprobs import triton_logps_backward

        return triton_logps_backward(grad_logps, logits, labels, lse, ignore_index,
                                     temperature, out)
    flat = [t.reshape(-1) for t in (grad_logps, labels, lse)]
    flat[1] = flat[1].to(torch.int64)
    start = 0
    for view, out_view in zip(_row_views(logits), _row_views(out)):
        g, lab, row_lse = (t[start:start + view.shape[0]].contiguous() for t in flat)
        start += view.shape[0]
        if backend == "native" and view.dtype != torch.float64:
            inplace = out_view.data_ptr() == view.data_ptr()
            result = torch.ops.fastpo_native.logps_backward(
                g.float(), view, lab, row_lse.float(), ignore_index, float(temperature), inplace)
            if not inplace:
                out_view.copy_(result)
        else:
            reference.chunked_logps_backward(g, view, lab, row_lse, ignore_index, temperature,
                                             out_view)
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
    logits = _unit_vocab_stride(logits)
    views = _row_views(logits)
    if (len(views) == 1 and logits.dtype != torch.float64
            and resolve_backend(logits.device) == "native"):
        # the native kernel allocates the gradient itself: no second [N, V] buffer, no copy
        return torch.ops.fastpo_native.logps_backward(
            grad_logps.reshape(-1), views[0], labels.reshape(-1).to(torch.int64).contiguous(),
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
    """In-place form of ``logps_backward``: the gradient overwrites ``logits``."""
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
    if ctx.inplace_backward:
        torch.ops.fastpo.logps_backward_(grad_logps, logits, labels, lse, ctx.ignore_index,
                                         ctx.temperature)
        grad_logits = logits
    else:
        grad_logits = torch.ops.fastpo.logps_backward(grad_logps, logits, labels, lse,
                                                      ctx.ignore_index, ctx.temperature)
    return grad_logits, None, None, None, None, None


logps_forward.register_autograd(_backward, setup_context=_setup_context)
