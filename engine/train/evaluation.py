"""Held-out evaluation on preference pairs: loss, reward accuracy, margins and rewards.

The held-out split is planned once per call without shuffling and shared by rank
(``rank_share``: every rank runs the same number of forwards, ZeRO-3 gathers are collective);
the sums of every rank are reduced and read once, after the last batch. The reference's
log-probs of each eval batch are cached until the reference changes (``ref_version``), so a
frozen reference runs over the held-out split once per run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..data.batch import PreferenceBatch, plan_batches, rank_share
from ..data.dataset import TokenizedDataset
from .batch_source import collate_to_device
from .objective import summarize_eval
from .reports import eval_text, summary_text


class PairEvaluation:
    """Evaluates the trainer's policy on ``dataset`` (see the module docstring)."""

    primary = "rewards/accuracies"  # early stopping follows it (higher is better)

    def __init__(self, dataset: TokenizedDataset) -> None:
        self.dataset = dataset
        self._reference_cache: dict[tuple[int, int], Any] = {}

    def _batches(self, trainer: Any) -> list[tuple[list[int], bool]]:
        """This rank's eval batches, the same number on every rank (see ``rank_share``)."""
        opt, data = trainer.cfg.optimization, trainer.cfg.data
        batches = plan_batches(self.dataset, pairs_per_batch=opt.pairs_per_batch(),
                               max_tokens_per_batch=opt.max_tokens_per_batch, shuffle=False,
                               padding_free=data.padding_free,
                               with_kl=trainer.objective_with_kl(),
                               share_prompt=data.share_prompt)
        return rank_share(batches, rank=trainer.rt.rank, world_size=trainer.rt.world_size)

    @torch.no_grad()
    def run(self, trainer: Any) -> dict[str, float] | None:
        """Held-out loss and metrics of ``trainer``'s policy (summed over every rank)."""
        if len(self.dataset) == 0:
            return None
        module, rt = trainer.backend.module, trainer.rt
        was_training = module.training
        module.eval()
        total = torch.zeros(8, dtype=torch.float64, device=rt.device)
        trainer.reference.use("eval")
        try:
            for i, (indices, counts) in enumerate(self._batches(trainer)):
                batch = collate_to_device(self.dataset, indices, data=trainer.cfg.data,
                                          pad_token_id=trainer.pad_id,
                                          with_kl=trainer.objective_with_kl(), device=rt.device)
                out = trainer.forward(batch, functools.partial(self._reference, trainer, i))
                if counts:
                    total += out.eval_sums.to(total.device)
        finally:
            module.train(was_training)
            trainer.reference.use("train")
        rt.all_reduce_(total)
        return summarize_eval(total, paired=trainer.objective.paired)  # the one read

    @staticmethod
    def text(when: str, step: int, result: dict[str, float]) -> str:
        return eval_text(when, step, result)

    @staticmethod
    def closing(summary: dict[str, Any], before: dict[str, float] | None,
                after: dict[str, float] | None) -> str | None:
        """The run's closing line from its summary record (which holds the accuracies)."""
        return summary_text(summary)

    def _reference(self, trainer: Any, i: int, batch: PreferenceBatch) -> Any:
        """Reference log-probs of eval batch ``i``, cached until the reference changes."""
        key = (trainer.ref_version, i)
        if key not in self._reference_cache:
            self._reference_cache = {k: v for k, v in self._reference_cache.items()
                                     if k[0] == trainer.ref_version}
            self._reference_cache[key] = trainer.reference.reference_logps(
                batch, with_tail_logps=trainer.objective.with_tails)
        return self._reference_cache[key]
