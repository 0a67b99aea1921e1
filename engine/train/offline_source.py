"""The offline batch source: a preference data set's planned epochs, one slice per step.

Each epoch is planned once (``plan_batches``: seeded shuffle, length grouping, this rank's
shard); a step takes the next ``gradient_accumulation_steps`` micro-batches of the epoch, and an
epoch without a full step left is skipped to the next. The position (``epoch``,
``step_in_epoch``) goes into the trainer's state file, so a resumed run takes the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..data.batch import PreferenceBatch, plan_batches
from ..data.dataset import TokenizedDataset
from .batch_source import collate_to_device
from .config import TrainConfig
from .integrity import CheckpointError


class OfflineSource:
    """Micro-batches of ``dataset`` for this rank (``rank`` of ``world_size``)."""

    def __init__(self, cfg: TrainConfig, dataset: TokenizedDataset, *, rank: int,
                 world_size: int, device: torch.device, pad_token_id: int,
                 with_kl: bool) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.rank, self.world_size, self.device = rank, world_size, device
        self.pad_token_id, self.with_kl = pad_token_id, with_kl
        self.epoch = 0
        self.step_in_epoch = 0
        self._plans: dict[int, list[list[int]]] = {}
        opt = cfg.optimization
        ga = opt.gradient_accumulation_steps
        if len(self.batches(0)) // ga == 0:
            raise ValueError(
                f"the training split ({len(dataset)} items) makes no full step of {ga} "
                f"micro-batches × {world_size} ranks; lower the batch size or accumulation, or "
                "add data")
        self.total_steps = opt.max_steps or sum(len(self.batches(e)) // ga
                                                for e in range(opt.num_epochs))

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (dataset indices) of ``epoch`` (the latest plan kept)."""
        if epoch not in self._plans:
            opt, data = self.cfg.optimization, self.cfg.data
            self._plans = {epoch: plan_batches(
                self.dataset, pairs_per_batch=opt.pairs_per_batch(),
                max_tokens_per_batch=opt.max_tokens_per_batch, shuffle=True, seed=self.cfg.seed,
                epoch=epoch, padding_free=data.padding_free, share_prompt=data.share_prompt,
                group_by_length=data.length_grouping(), with_kl=self.with_kl,
                num_shards=self.world_size, shard_index=self.rank)}
        return self._plans[epoch]

    def step_indices(self) -> list[list[int]]:
        """The next step's micro-batches as dataset indices (advancing epochs as needed)."""
        ga = self.cfg.optimization.gradient_accumulation_steps
        while (self.step_in_epoch + 1) * ga > len(self.batches(self.epoch)):
            self.epoch += 1
            self.step_in_epoch = 0
        start = self.step_in_epoch * ga
        return self.batches(self.epoch)[start:start + ga]

    def collate(self, indices: list[int]) -> PreferenceBatch:
        return collate_to_device(self.dataset, indices, data=self.cfg.data,
                                 pad_token_id=self.pad_token_id, with_kl=self.with_kl,
                                 device=self.device)

    def step_batches(self) -> Iterator[PreferenceBatch]:
        for indices in self.step_indices():
            yield self.collate(indices)

    def end_step(self) -> dict[str, Any]:
        self.step_in_epoch += 1
        return {"epoch": self.epoch}

    def rewind(self) -> None:
        """Back to the first step of epoch 0 (benchmarks repeat the same steps)."""
        self.epoch = self.step_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "online" in state:
            raise CheckpointError("the checkpoint was written by an online run; it cannot "
                                  "continue as offline training")
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    def save_rank_state(self, folder: Path, rank: int) -> None:
        """Nothing: every rank's position follows from the shared one."""

    def load_rank_state(self, folder: Path, rank: int) -> None:
        """Nothing (see :meth:`save_rank_state`)."""
