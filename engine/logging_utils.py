"""Run logging: a progress bar, one JSON line per logged step, TensorBoard when installed.

Only rank 0 writes. Metric values arrive as Python floats (the trainer reduces them across
ranks first, see :func:`reduce_metrics`), so nothing here touches a device tensor.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def reduce_metrics(per_micro: Sequence[dict[str, Tensor]],
                   all_reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Average metric tensors over micro-batches and ranks, ignoring NaN entries (a KTO batch
    without undesirable examples has no ``rewards/rejected``). One host transfer for all."""
    names = sorted({k for m in per_micro for k in m})
    if not names:
        return {}
    sums, counts = [], []
    for name in names:
        values = torch.stack([m[name].detach().float().reshape(()) for m in per_micro
                              if name in m])
        finite = ~torch.isnan(values)
        sums.append(torch.where(finite, values, torch.zeros_like(values)).sum())
        counts.append(finite.sum().float())
    packed = all_reduce(torch.stack(sums + counts))
    n = len(names)
    packed = packed.cpu().tolist()
    return {name: (packed[i] / packed[n + i] if packed[n + i] else math.nan)
            for i, name in enumerate(names)}


class _Progress:
    """tqdm, rich or nothing."""

    def __init__(self, kind: str, total: int, initial: int) -> None:
        self.kind = kind
        self.bar: Any = None
        if kind == "auto":
            kind = "tqdm" if importlib.util.find_spec("tqdm") else "none"
        if kind == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        elif kind == "rich":
            from rich.progress import Progress

            self.bar = Progress()
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=initial)
        self.kind = kind

    def update(self, step: int, text: str) -> None:
        if self.kind == "tqdm":
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif self.kind == "rich":
            self.bar.update(self.task, completed=step, description=f"train {text}")

    def write(self, text: str) -> None:
        if self.kind == "tqdm":
            self.bar.write(text)
        elif self.kind == "rich":
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.kind == "tqdm":
            self.bar.close()
        elif self.kind == "rich":
            self.bar.stop()


class RunLogger:
    """Writes ``metrics.jsonl`` (appending on resume), TensorBoard events, a progress bar."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, progress: str = "auto",
                 tensorboard: bool | str = "auto", total_steps: int = 0,
                 initial_step: int = 0) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.jsonl = None
        self.tb = None
        self.progress: _Progress | None = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        have_tb = importlib.util.find_spec("tensorboard") is not None
        if tensorboard is True and not have_tb:
            raise ImportError("logging.tensorboard is true but the tensorboard package is not "
                              "installed (pip install tensorboard)")
        if tensorboard is True or (tensorboard == "auto" and have_tb):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        self.progress = _Progress(progress, total_steps, initial_step)

    def log(self, record: dict[str, Any], *, kind: str = "train") -> None:
        """One JSON line ``{"kind": ..., "step": ..., ...}`` (+ TensorBoard scalars)."""
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("step", "time"):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def update_progress(self, step: int, text: str) -> None:
        if self.enabled and self.progress is not None:
            self.progress.update(step, text)

    def message(self, text: str) -> None:
        """A line for the user (through the progress bar so it is not garbled)."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (of one kind), e.g. for tests and reports."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if kind is None or record.get("kind") == kind:
                out.append(record)
    return out


def setup_logging(rank: int) -> None:
    """INFO logs on rank 0, warnings only elsewhere."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("fastpo").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
