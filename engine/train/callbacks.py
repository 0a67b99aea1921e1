"""Hooks into the training loop, for tests, benchmarks and user code (all no-ops by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Trainer = Any  # the loop's Trainer (not imported: it imports this module)

class Callback:
    """Hooks into the loop (all no-ops); e.g. tests kill the process at a chosen point."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """After the step's backward passes, before the optimizer (gradients in place)."""

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None: ...

    def on_eval(self, trainer: Trainer, step: int, result: dict[str, float]) -> None: ...
