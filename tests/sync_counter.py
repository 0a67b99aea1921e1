"""``SyncCounter``: the host synchronizations a block of code causes, each with its origin.

A host synchronization makes the CPU wait for the device, which drains the GPU's queue of work.
``SyncCounter`` (a ``TorchDispatchMode``) counts, with the file and line that caused each one:

- scalar reads: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``, ``if t:``), ``aten.item``, ``aten.is_nonzero``, ``aten.equal``. The dispatcher
  sends these for CPU tensors too, so they are seen on a machine without a GPU.
- copies to the host: ``aten._to_copy`` / ``aten.copy_`` whose destination is on the CPU and whose
  source is not (a blocking device-to-host copy; a CPU-to-CPU copy is not a synchronization).
- host conversions the dispatcher never sees for a CPU tensor (``Tensor.tolist``,
  ``Tensor.numpy``, ``Tensor.cpu``): counted by wrapping those methods while counting (for a
  device tensor they go through ``_to_copy``, counted above, not twice).
- with ``data_dependent=True`` also ops whose output size depends on values (``nonzero``,
  ``masked_select``, ``unique``, boolean-mask indexing): on a GPU the host waits for the size
  (not asserted for the ops, whose CPU-only branches use ``nonzero``: see that test).

Seen: every ATen op called from Python, including inside fastpo's ``torch.library`` custom ops
(their Python bodies are run under the counter). Not seen: what runs inside one op's own
implementation, i.e. inside a C++ extension kernel (fastpo's native CPU kernel), a fused
optimizer kernel, a Triton kernel, or DeepSpeed's ``engine.step`` (which may synchronize for fp16
loss scaling and ZeRO's overflow check: DeepSpeed's, not ours).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import fastpo.engine

SCALAR_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal"}
COPIES = {"aten._to_copy", "aten.copy_"}
DATA_DEPENDENT = {"aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
                  "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
                  "aten.repeat_interleave"}
HOST_METHODS = ("tolist", "numpy", "cpu")

REPO = Path(fastpo.engine.__file__).resolve().parent.parent
OURS = (REPO / "engine", REPO / "kernels")
TORCH = Path(torch.__file__).resolve().parent
HERE = Path(__file__).resolve()


def _origin() -> str:
    """``file:line`` of the innermost caller outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == HERE or path.is_relative_to(TORCH):
            continue
        for root in OURS:
            if path.is_relative_to(root):
                return f"fastpo/{path.relative_to(REPO)}:{frame.lineno}"
        return f"{'/'.join(path.parts[-2:])}:{frame.lineno}"
    return "?"


def _is_host(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


class SyncCounter(TorchDispatchMode):
    """``hits``: ``(what, origin)`` of every host synchronization while active (see above)."""

    def __init__(self, *, data_dependent: bool = False) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []
        self.ops: set[str] = set()
        self.data_dependent = data_dependent
        self._saved: dict[str, object] = {}

    def _sync(self, func, args, kwargs) -> bool:
        name = f"{func.namespace}.{func._schema.name.split('::')[-1]}"
        if name in SCALAR_READS:
            return True
        if self.data_dependent and name in DATA_DEPENDENT:
            return True
        if self.data_dependent and name == "aten.index":
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name == "aten._to_copy":
            dst = kwargs.get("device")
            return dst is not None and torch.device(dst).type == "cpu" and not _is_host(args[0])
        if name == "aten.copy_":
            return _is_host(args[0]) and not _is_host(args[1])
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(f"{func.namespace}.{func._schema.name.split('::')[-1]}")
        if self._sync(func, args, kwargs):
            self.hits.append((str(func), _origin()))
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:  # a Python custom op: run its body under the counter
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)

    def __enter__(self):
        for method in HOST_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(t, *a, _original=original, _method=method, **k):
                if t.device.type == "cpu":
                    self.hits.append((f"Tensor.{_method}", _origin()))
                return _original(t, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()
