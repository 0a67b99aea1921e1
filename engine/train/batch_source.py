"""Where a training step's micro-batches come from: the seam between the loop and its data.

The loop asks its source for the micro-batches of the next optimizer step and, once the step
is done, for the step's host-side record fields; the source keeps its own position (and random
state) and hands it to the checkpoint as JSON. Two sources exist:
:class:`~.offline_source.OfflineSource` (the planned epochs of a preference file) and
:class:`~.online_source.OnlineSource` (pairs the policy generates and a scorer ranks).

:func:`collate_to_device` is the one way dataset items become a batch on the device, for both
sources and for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from ..data.batch import PreferenceBatch, collate_batch
from ..data.dataset import TokenizedDataset


class SourceExhausted(Exception):
    """A source has no step left to give (online: no prompt gives a pair any more); the trainer
    stops the run there as it does for early stopping (``stopped: "exhausted"``)."""


class BatchSource(Protocol):
    """A stream of optimizer steps' micro-batches with a resumable position."""

    total_steps: int

    def step_batches(self) -> Iterator[PreferenceBatch]:
        """The next step's micro-batches, on the device (the same count on every rank)."""

    def end_step(self) -> dict[str, Any]:
        """Advance past the step just trained; its record fields known on the host."""

    def state_dict(self) -> dict[str, Any]:
        """The position (and random state) as JSON values, for the trainer's state file."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's trainer state (the dict ``state_dict`` was merged in)."""

    def save_rank_state(self, folder: Path, rank: int) -> None:
        """Write this rank's own state into the checkpoint folder (ranks differ: e.g. their
        generated pairs), hashed like every checkpoint file."""

    def load_rank_state(self, folder: Path, rank: int) -> None:
        """Read what :meth:`save_rank_state` wrote (a CheckpointError naming a bad file)."""


def collate_to_device(dataset: TokenizedDataset, indices: list[int], *, data: Any,
                      pad_token_id: int, with_kl: bool, device: torch.device) -> PreferenceBatch:
    """Items ``indices`` of ``dataset`` as a micro-batch in the resolved layout of ``data`` (the
    config's ``data`` section), collated on the host, then pinned and copied without blocking on
    CUDA (the copy overlaps the work already queued)."""
    batch = collate_batch(dataset, indices, pad_token_id=pad_token_id,
                          padding_free=data.padding_free, share_prompt=data.share_prompt,
                          with_kl=with_kl)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
