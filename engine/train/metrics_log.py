"""Run logging: a progress bar, one JSON line per logged step, the experiment trackers.

Only rank 0 writes. Metric values arrive as Python floats: :class:`StepMetrics` accumulates them
on the device during the steps and reads them back once per logging point (one packed
collective, one device-to-host copy), so the writers here never touch a device tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trackers import Tracker

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def gather_ranks(packed: Tensor, *, world_size: int) -> Tensor:
    """``[world_size, ...]``: every rank's ``packed``, in one collective (none in one process)."""
    if world_size == 1:
        return packed.unsqueeze(0)
    parts = [torch.empty_like(packed) for _ in range(world_size)]
    torch.distributed.all_gather(parts, packed.contiguous())
    return torch.stack(parts)


@dataclass
class _Step:
    """One finished step's device row and the host values that go with it."""

    names: tuple[str, ...]
    row: Tensor  # float64 [2 * len(names) + 3]: sums, counts, non-finite losses, norm, applied
    host: list[float]  # HOST_FIELDS


HOST_FIELDS = ("tokens", "peak_memory_mb", "host_grad_norm", "has_grad_norm")


class StepMetrics:
    """Per-step training metrics kept on the device until a logging point.

    Per micro-batch, :meth:`add` folds the loss and the objective's metrics into running sums
    with ``torch.where``: a non-finite value contributes nothing, is not counted, and a non-finite
    loss increments the step's non-finite count (nothing is read). :meth:`end_step` closes a step
    with its gradient norm and whether the update was applied (tensors or host values) and the
    host's token count and peak memory. :meth:`read` stacks every pending step into ONE float64
    tensor, hands it to ``gather`` (one collective over the ranks) and copies it to the host once:
    per step, each metric's mean over the micro-batches and ranks that gave a finite value (NaN
    when none did), the summed tokens and non-finite losses, the largest peak memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list[_Step] = []
        self._names: tuple[str, ...] | None = None
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None
        self._nonfinite: Tensor | None = None

    def add(self, loss: Tensor, metrics: dict[str, Tensor]) -> None:
        values = {**metrics, "loss": loss}
        names = tuple(sorted(values))
        if self._names is None:
            self._names = names
            self._sums = torch.zeros(len(names), dtype=torch.float32, device=self.device)
            self._counts = torch.zeros_like(self._sums)
            self._nonfinite = torch.zeros((), dtype=torch.float32, device=self.device)
        elif names != self._names:
            raise ValueError(f"the objective's metrics changed within a step: {self._names} "
                             f"then {names}")
        stacked = torch.stack([torch.as_tensor(values[n]).detach().float().reshape(())
                               .to(self.device, non_blocking=True) for n in names])
        finite = torch.isfinite(stacked)
        self._sums += torch.where(finite, stacked, 0.0)
        self._counts += finite
        self._nonfinite += ~finite[names.index("loss")]

    def nonfinite_losses(self) -> Tensor | None:
        """The open step's count of non-finite micro-batch losses (a device scalar), or None."""
        return self._nonfinite

    def end_step(self, *, grad_norm: Tensor | float | None, applied: Tensor | bool,
                 tokens: int, peak_memory_mb: float) -> None:
        if self._names is None:
            raise RuntimeError("end_step() without a micro-batch")
        like = self._sums
        host_norm, has_norm = math.nan, 0.0
        if isinstance(applied, Tensor):
            ok = applied.detach().reshape(1).to(self.device, non_blocking=True).float()
        else:
            ok = like.new_full((1,), float(bool(applied)))
        ok = ok * (self._nonfinite == 0)
        if isinstance(grad_norm, Tensor):
            norm = grad_norm.detach().float().reshape(1).to(self.device, non_blocking=True)
            ok = ok * torch.isfinite(norm)
            has_norm = 1.0
        else:
            norm = like.new_full((1,), math.nan)
            if grad_norm is not None:
                host_norm, has_norm = float(grad_norm), 1.0
                ok = ok * float(math.isfinite(host_norm))
        row = torch.cat([self._sums, self._counts, self._nonfinite.reshape(1), norm, ok])
        self.pending.append(_Step(self._names, row.double(),
                                  [float(tokens), float(peak_memory_mb), host_norm, has_norm]))
        self._names = self._sums = self._counts = self._nonfinite = None

    def read(self, gather: Callable[[Tensor], Tensor]) -> list[dict[str, Any]]:
        """Every pending step, reduced over the ranks: ONE collective, ONE copy to the host."""
        steps, self.pending = self.pending, []
        if not steps:
            return []
        cut = next((i for i, s in enumerate(steps) if s.names != steps[0].names), len(steps))
        if cut < len(steps):  # the objective's metric names changed: one read per layout
            self.pending = steps[cut:]
            return self.read_steps(steps[:cut], gather) + self.read(gather)
        return self.read_steps(steps, gather)

    def read_steps(self, steps: list[_Step], gather: Callable[[Tensor], Tensor]
                   ) -> list[dict[str, Any]]:
        host = torch.tensor([s.host for s in steps], dtype=torch.float64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        packed = torch.cat([torch.stack([s.row for s in steps]),
                            host.to(self.device, non_blocking=True)], dim=1)
        ranks = gather(packed).tolist()  # the one host synchronization: [ranks][steps][fields]
        out = []
        for i, step in enumerate(steps):
            n = len(step.names)
            per_rank = [rank[i] for rank in ranks]
            total = [sum(col) for col in zip(*per_rank)]
            record: dict[str, Any] = {
                name: total[k] / total[n + k] if total[n + k] else math.nan
                for k, name in enumerate(step.names)}
            nonfinite, tokens = total[2 * n], total[2 * n + 3]
            norm, host_norm, has_norm = (per_rank[0][2 * n + 1], per_rank[0][2 * n + 5],
                                         per_rank[0][2 * n + 6])
            applied = min(r[2 * n + 2] for r in per_rank)
            peak = max(r[2 * n + 4] for r in per_rank)
            if not has_norm:
                norm = None
            elif not math.isnan(host_norm):
                norm = host_norm
            record.update(grad_norm=norm, applied=applied > 0,
                          nonfinite_losses=int(nonfinite), tokens=int(tokens),
                          peak_memory_mb=peak)
            out.append(record)
        return out


def _console_loggers() -> list[logging.Logger]:
    """The root logger and every logger with handlers of its own (DeepSpeed's, transformers'):
    the ones whose console lines must go through the progress bar."""
    own = [logger for logger in logging.Logger.manager.loggerDict.values()
           if isinstance(logger, logging.Logger) and logger.handlers]
    return [logging.getLogger(), *own]


class _Progress:
    """tqdm, rich or nothing. While the tqdm bar is open, console log lines go through it
    (tqdm's logging redirect): they print above the bar instead of inside its line."""

    def __init__(self, kind: str, total: int, initial: int) -> None:
        self.kind = kind
        self.bar: Any = None
        self._redirect = contextlib.ExitStack()
        if kind == "auto":
            kind = "tqdm" if importlib.util.find_spec("tqdm") else "none"
        if kind == "tqdm":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
            self._redirect.enter_context(logging_redirect_tqdm(loggers=_console_loggers(),
                                                               tqdm_class=tqdm))
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
            if self.bar.total is None or step < self.bar.total:  # the last: close() draws it
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
        """Draw the bar's final state once and leave it; log lines print plainly again."""
        if self.kind == "tqdm":
            self.bar.close()
            self._redirect.close()
        elif self.kind == "rich":
            self.bar.stop()


class RunLogger:
    """Writes ``metrics.jsonl`` (appending on resume), the experiment trackers (TensorBoard,
    W&B, MLflow, Trackio: ``trackers.py``), a progress bar."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, progress: str = "auto",
                 trackers: Sequence[Tracker] = (), total_steps: int = 0,
                 initial_step: int = 0) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.jsonl = None
        self.trackers = list(trackers)
        self.progress: _Progress | None = None
        self._progress_kind = "none"
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.progress = _Progress(progress, total_steps, initial_step)

    @classmethod
    def for_job(cls, cfg: TrainConfig, *, enabled: bool, total_steps: int,
                initial_step: int) -> RunLogger:
        """The job's logger; on the main rank (``enabled``) its trackers start here."""
        from .trackers import open_trackers

        return cls(cfg.logging.output_dir, enabled=enabled, progress=cfg.logging.progress,
                   trackers=open_trackers(cfg) if enabled else (), total_steps=total_steps,
                   initial_step=initial_step)

    def _each_tracker(self, what: str, call: Callable[[Tracker], None]) -> None:
        """``call`` on every tracker; one that raises is reported once and dropped."""
        from .trackers import tracker_failed

        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker never stops training
                self.trackers.remove(tracker)
                tracker_failed(tracker.name, what, exc)

    def log(self, record: dict[str, Any], *, kind: str = "train") -> None:
        """One JSON line ``{"kind": ..., "step": ..., ...}``, and the same metrics to the
        trackers (``<kind>/<key>``; the summary at the last step)."""
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self.jsonl.flush()
        if self.trackers:
            from .trackers import tracker_metrics

            step = int(record.get("step", record.get("steps", 0)) or 0)
            metrics = tracker_metrics(record, kind)
            self._each_tracker("log", lambda tracker: tracker.log(metrics, step))

    def update_progress(self, step: int, text: str) -> None:
        if self.enabled and self.progress is not None:
            self.progress.update(step, text)

    def message(self, text: str) -> None:
        """A line for the user (through the progress bar so it is not garbled)."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        elif self._progress_kind in ("tqdm", "rich"):  # the bar is closed: where it wrote
            print(text, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def close_progress(self) -> None:
        """Close the progress bar (its final state drawn once); later messages print below."""
        if self.progress is not None:
            self._progress_kind = self.progress.kind
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        self.close_progress()
        self._each_tracker("finish", lambda tracker: tracker.close())
        self.trackers = []
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
