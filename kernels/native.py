"""Loader and description of the native CPU kernel (``csrc/``, built as ``fastpo.kernels._C``).

Importing the extension registers ``torch.ops.fastpo_native.logps_forward`` / ``logps_backward``
(the CPU implementation of the token-logprob op, see ``csrc/logprobs.cpp``). This module never
raises on import: when the extension is missing or does not load (no compiler at install time, a
torch it was not built against), ``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why;
the dispatcher (``ops.py``) warns once, the first time a CPU op needs the kernel.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_MODULE = "fastpo.kernels._C"


def _try_load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:  # not built, or built against another torch (undefined symbols)
        return None, f"{_MODULE} is not built ({exc})"
    except OSError as exc:
        return None, f"{_MODULE} failed to load ({exc})"
    if not hasattr(torch.ops.fastpo_native, "logps_forward"):
        return None, f"{_MODULE} loaded but did not register torch.ops.fastpo_native"
    return module, None


_module, UNAVAILABLE_REASON = _try_load()
AVAILABLE: bool = _module is not None


def cpu_capability() -> str | None:
    """Which compiled copy of the row kernels runs: ``"avx2"`` (AVX2+FMA+F16C) or ``"baseline"``.

    ``FASTPO_NATIVE_CPU_CAPABILITY=baseline`` in the environment forces the portable copy.
    """
    return torch.ops.fastpo_native.cpu_capability() if AVAILABLE else None


def _parallel_backend() -> str:
    """ATen's intra-op backend as torch reports it (OpenMP for the usual builds)."""
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "at::parallel_for"


def describe() -> str:
    """One line for ``backend_info()``, e.g. ``native C++ (avx2, OpenMP, 2 threads)``."""
    if not AVAILABLE:
        return f"chunked PyTorch (native kernel unavailable: {UNAVAILABLE_REASON})"
    return (f"native C++ ({cpu_capability()}, {_parallel_backend()}, "
            f"{torch.get_num_threads()} threads)")
