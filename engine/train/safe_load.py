"""Loading state files without running code.

A checkpoint folder may come from someone else: no file in it is unpickled with the full
pickle machinery. Our own state is JSON or safetensors; ``.pt`` files (the plain optimizer,
DeepSpeed's model and optimizer states) are read by :func:`torch_load`, i.e. ``torch.load`` with
``weights_only=True``, which rebuilds tensors, containers and plain values and, beyond those,
only the classes allow-listed here (DeepSpeed's loss scalers, ZeRO stage enum, fragment
addresses: data, no code). Anything else is refused with a :class:`CheckpointError` naming the
file. :func:`install_safe_checkpoint_engine` gives a DeepSpeed engine that loader, and hashes its
files while they are written (:func:`.integrity.write_hashed`).
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .integrity import CheckpointError, write_hashed


def _numpy_array_globals() -> list[Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


NUMPY_ARRAY_GLOBALS = tuple(_numpy_array_globals())  # NumPy arrays (RNG files of older fastpo)


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.x pickles into its checkpoints (ZeRO 0-3, fp16/bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def torch_load(path: str | Path, *, map_location: Any = None, allow: tuple | list = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` allow-listed; a file holding
    anything else, or not a torch file at all, is a :class:`CheckpointError` naming it."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if line.startswith(("Unsupported", "Trying"))
                       or "Unsupported global" in line), "content outside the allow-list")
        detail = detail.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and the allow-listed "
            f"training state ({detail}); unpickling them could run code, so fastpo does not"
            ) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({first})") from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (CPU); a damaged file is a :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine: files hashed as they are written, and read back
        with ``weights_only=True`` and DeepSpeed's allow-listed state classes only."""

        def save(self, state_dict: Any, path: str) -> None:
            with write_hashed(path) as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)

        def load(self, path: str, map_location: Any = None) -> Any:
            return torch_load(path, map_location=map_location, allow=deepspeed_safe_globals())

    return SafeTorchCheckpointEngine


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Give a DeepSpeed engine the safe loader: its default torch checkpoint engine is replaced
    by :class:`SafeTorchCheckpointEngine`; another writer (configured in the DeepSpeed JSON) keeps
    its own save but loads through :func:`torch_load` too.

    DeepSpeed's config picks among its own checkpoint engines only, none of which loads with
    ``weights_only=True``: the engine's ``checkpoint_engine`` attribute, which every
    ``save_checkpoint`` / ``load_checkpoint`` goes through, is the one place to put ours."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        safe = _safe_engine_class()()
        safe.zipfile_serialization = current.zipfile_serialization
        engine.checkpoint_engine = safe
        return

    def load(path: str, map_location: Any = None) -> Any:
        return torch_load(path, map_location=map_location, allow=deepspeed_safe_globals())

    current.load = load
