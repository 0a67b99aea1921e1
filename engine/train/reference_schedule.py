"""When a reference that follows the policy is updated (``reference.sync_steps``, ``rounds``).

``rounds`` > 1 (iterative DPO): at the end of each of the ``rounds`` equal parts of the run the
reference becomes the policy (α = 1). ``sync_steps`` > 0 (TR-DPO): every ``sync_steps`` steps,
ref ← (1 − α)·ref + α·policy with α = ``sync_alpha``. Nothing after the last step.
"""

from __future__ import annotations

from typing import Any


def reference_update(reference: Any, step: int, total_steps: int) -> float | None:
    """The α of the reference update due after optimizer step ``step`` (``reference``: the
    config's ``reference`` section), or None."""
    if step >= total_steps:
        return None
    round_len = total_steps // reference.rounds if reference.rounds > 1 else 0
    if round_len and step % round_len == 0:
        return 1.0
    if reference.sync_steps and step % reference.sync_steps == 0:
        return reference.sync_alpha
    return None
