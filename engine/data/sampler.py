"""Length-aware batching: items of similar length share a micro-batch, so padded rows waste little.

The epoch's seeded shuffle is cut into windows of ``window`` items; each window is sorted by the
items' padded length (longest first), so consecutive items — the ones ``plan_batches`` groups —
have similar lengths; then the micro-batches themselves are shuffled (seeded), so training does
not see every long batch first. Everything is a function of (seed, epoch): a resumed run rebuilds
the same batches and continues at its saved batch index, as without grouping. The window keeps the
randomness of the plain shuffle across windows (a whole-epoch sort would make every batch's
companions the same in each epoch).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence


def length_grouped_order(order: Sequence[int], length: Callable[[int], int], *,
                         window: int) -> list[int]:
    """``order`` with each run of ``window`` items sorted by ``length`` (longest first; ties keep
    the shuffled order)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"the length-grouping window must be a positive int, got {window!r}")
    out: list[int] = []
    for start in range(0, len(order), window):
        out += sorted(order[start: start + window], key=length, reverse=True)
    return out


def shuffle_batches(batches: list[list[int]], *, seed: int, epoch: int, group: int = 1
                    ) -> list[list[int]]:
    """The micro-batches in a seeded random order, moved in runs of ``group`` consecutive
    batches (a global batch: one micro-batch per data-parallel rank), so that every world size
    draws the same global batches in the same order. A new list; the batches are not copied."""
    runs = [batches[i: i + group] for i in range(0, len(batches), group)]
    random.Random(f"fastpo-length-batches:{seed}:{epoch}").shuffle(runs)
    return [batch for run in runs for batch in run]


def padding_fraction(batches: Sequence[Sequence[int]], shapes: Sequence[tuple[int, int, int]]
                     ) -> float:
    """The share of padding tokens in padded rows: ``1 − real / (rows × longest)`` over the
    batches, from ``(real tokens, longest row, rows)`` per item."""
    real = padded = 0
    for batch in batches:
        rows = sum(shapes[i][2] for i in batch)
        padded += rows * max(shapes[i][1] for i in batch)
        real += sum(shapes[i][0] for i in batch)
    return 1.0 - real / padded if padded else 0.0
