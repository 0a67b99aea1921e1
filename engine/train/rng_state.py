"""Generator states of Python, NumPy and torch, saved as JSON (loading it runs no code).

Exact round trip: Python's and NumPy's Mersenne Twister states are integers, NumPy's cached
gaussian a float written as its shortest repr, torch's CPU and CUDA states bytes in base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .integrity import CheckpointError, write_hashed

RNG_FORMAT = "fastpo-rng-v1"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + every CUDA device) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _bytes_tensor(text: Any) -> torch.Tensor:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_state` as plain JSON values (exact: integers, a float's repr, base64 bytes)."""
    version, internal, gauss_next = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {"format": RNG_FORMAT,
           "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
           "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "torch": _b64(state["torch"])}
    if "cuda" in state:
        out["cuda"] = [_b64(t) for t in state["cuda"]]
    return out


def rng_state_from_json(data: Any) -> dict[str, Any]:
    """The inverse of :func:`rng_state_json`; TypeError / ValueError / KeyError on bad input."""
    if not isinstance(data, dict) or data.get("format") != RNG_FORMAT:
        raise ValueError(f"not a {RNG_FORMAT} state")
    py, npy = data["python"], data["numpy"]
    internal = py["state"]
    if not isinstance(internal, list) or not all(type(v) is int for v in internal):
        raise TypeError("python state must be a list of integers")
    gauss = py["gauss_next"]
    if gauss is not None and type(gauss) not in (int, float):
        raise TypeError("python gauss_next must be a number or null")
    keys = npy["keys"]
    if not isinstance(keys, list) or not all(type(k) is int and 0 <= k < 2**32 for k in keys):
        raise TypeError("numpy keys must be a list of 32-bit unsigned integers")
    state: dict[str, Any] = {
        "python": (int(py["version"]), tuple(internal), gauss),
        "numpy": (str(npy["kind"]), np.array(keys, dtype=np.uint32), int(npy["pos"]),
                  int(npy["has_gauss"]), float(npy["cached_gaussian"])),
        "torch": _bytes_tensor(data["torch"])}
    if "cuda" in data:
        state["cuda"] = [_bytes_tensor(t) for t in data["cuda"]]
    return state


def _rng_path(folder: Path, rank: int, suffix: str) -> Path:
    return folder / "rng" / f"rank{rank:05d}{suffix}"


def save_rng(folder: Path, rank: int) -> None:
    """This rank's generator states as JSON (loading it can run no code)."""
    (folder / "rng").mkdir(exist_ok=True)
    with write_hashed(_rng_path(folder, rank, ".json")) as f:
        f.write(json.dumps(rng_state_json(rng_state())).encode("utf-8"))


def load_rng(folder: Path, rank: int) -> None:
    """Restore this rank's generator states (``rank*.json``; ``rank*.pt`` of older checkpoints
    is read with ``weights_only=True``). A bad file is a :class:`CheckpointError` naming it."""
    path = _rng_path(folder, rank, ".json")
    legacy = _rng_path(folder, rank, ".pt")
    if not path.is_file() and legacy.is_file():
        from .safe_load import NUMPY_ARRAY_GLOBALS, torch_load

        path, raw = legacy, torch_load(legacy, allow=NUMPY_ARRAY_GLOBALS)
    elif path.is_file():
        try:
            raw = rng_state_from_json(json.loads(path.read_text("utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError,
                binascii.Error) as exc:
            raise CheckpointError(f"{path}: unreadable RNG state ({exc})") from None
    else:
        raise CheckpointError(f"checkpoint {folder} has no RNG state for rank {rank} ({path}); "
                              "was it written with another number of ranks?")
    try:
        set_rng_state(raw)
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a valid RNG state ({exc})") from None
