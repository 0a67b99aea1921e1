"""The trainer's human-readable lines: progress bar text, evaluation lines and the run summary.

Pure functions of the metric dicts the trainer already logs; the trainer decides when to print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def progress_text(record: dict[str, Any]) -> str:
    """``loss 0.6812 acc 0.75 lr 3.00e-04 812 tok/s`` for one step's record."""
    parts = [f"loss {record.get('loss', float('nan')):.4f}"]
    if "rewards/accuracies" in record:
        parts.append(f"acc {record['rewards/accuracies']:.2f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)


def eval_text(when: str, step: int, result: dict[str, float]) -> str:
    """One line for a held-out evaluation (``when``: before / eval / after)."""
    margin = result.get("rewards/margins")
    margin_text = "n/a (one kind only)" if margin is None else f"{margin:.4f}"
    return (f"[{when} step {step}] held-out ({result['items']} items): reward accuracy "
            f"{result['rewards/accuracies']:.3f}, margin {margin_text}, "
            f"loss {result['loss']:.4f}")


def nonfinite_step_text(record: dict[str, Any], nonfinite_losses: int) -> str:
    """What went wrong in a step whose update was skipped."""
    if nonfinite_losses:
        return (f"non-finite loss at step {record['step']} ({nonfinite_losses} "
                f"micro-batch{'es' if nonfinite_losses > 1 else ''})")
    return f"non-finite gradients at step {record['step']} (grad norm {record.get('grad_norm')})"


def nonfinite_eval_text(when: str, step: int, result: dict[str, float]) -> str:
    """The error for a held-out loss that is NaN or infinite (the run must not succeed)."""
    moment = {"before": "before training", "after": "after training"}.get(when, f"at step {step}")
    return (f"the held-out loss is {result['loss']} {moment} ({result['items']} items): the "
            "model's outputs are not finite; nothing was exported. Lower the learning rate or "
            "check the data (optimization.on_nonfinite guards the training steps only)")


def run_summary(*, steps: int, stopped: str, seconds: float, eval_before: dict[str, float] | None,
                eval_after: dict[str, float] | None, export_dir: Path | None) -> dict[str, Any]:
    """The ``summary`` record of ``metrics.jsonl``: held-out metrics before and after training."""
    before, after = eval_before or {}, eval_after or {}
    return {"steps": steps, "stopped": stopped, "seconds": round(seconds, 1),
            "accuracy_before": before.get("rewards/accuracies"),
            "accuracy_after": after.get("rewards/accuracies"),
            "margin_before": before.get("rewards/margins"),
            "margin_after": after.get("rewards/margins"),
            "loss_before": before.get("loss"), "loss_after": after.get("loss"),
            "export_dir": str(export_dir) if export_dir else None}


def summary_text(summary: dict[str, Any]) -> str | None:
    """The closing line (None without both evaluations).

    Before any step the policy is the reference: every reward is 0 and a tie is not counted as
    correct (as in TRL), so the accuracy starts at 0 and the loss at log 2.
    """
    if summary["accuracy_before"] is None or summary["accuracy_after"] is None:
        return None
    return (f"held-out reward accuracy {summary['accuracy_before']:.3f} → "
            f"{summary['accuracy_after']:.3f}, margin {summary['margin_before']:.4f} → "
            f"{summary['margin_after']:.4f}, loss {summary['loss_before']:.4f} → "
            f"{summary['loss_after']:.4f}")
