"""The prompt stream of online training: which prompts each generation round takes.

Each pass over the prompts file is a seeded shuffle (``seed`` and the pass number); a round takes
the next ``per_rank × world_size`` prompts of the pass (the global batch) and rank ``k`` gets
every ``world_size``-th of them from ``k``. A pass with fewer prompts left than a global batch
ends, and the next pass begins (a new order). The position (``epoch``: the pass, ``index``: the
prompts of the pass taken) is all a resumed run needs to take the same prompts.
"""

from __future__ import annotations

import random


class PromptStream:
    """Rows of ``num_prompts`` prompts, a global batch at a time (see the module docstring)."""

    def __init__(self, num_prompts: int, *, seed: int, per_rank: int, rank: int,
                 world_size: int) -> None:
        if per_rank < 1 or not 0 <= rank < world_size:
            raise ValueError(f"per_rank {per_rank} must be >= 1 and rank {rank} in "
                             f"[0, {world_size})")
        self.num_prompts, self.seed = num_prompts, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = per_rank * world_size
        if num_prompts < self.global_batch:
            raise ValueError(f"{num_prompts} prompts make no global batch of {self.global_batch}")
        self.rounds_per_pass = num_prompts // self.global_batch
        self.epoch = 0
        self.index = 0
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The prompt rows of pass ``epoch``, in their seeded order (the latest kept)."""
        if epoch not in self._orders:
            rows = list(range(self.num_prompts))
            random.Random(f"fastpo-prompts:{self.seed}:{epoch}").shuffle(rows)
            self._orders = {epoch: rows}
        return self._orders[epoch]

    def next_rows(self) -> list[int]:
        """This rank's prompt rows of the next global batch (advancing the pass as needed)."""
        if self.index + self.global_batch > self.num_prompts:
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.order(self.epoch)[self.index:self.index + self.global_batch]
        self.index += self.global_batch
        return batch[self.rank::self.world_size]
