"""The ``ranked`` section of the job config: how ranked data (K completions with a score each,
:mod:`fastpo.engine.data.ranked`) becomes training signal, without expanding rows.

    ranked:
      pairs: all          # best_worst | all | adjacent: the pairs of each item
      margin: 0.0         # a pair needs a score gap > margin
      loss: pairs         # pairs: the loss.* pair loss, mean over the pairs (each pair weighted
                          # equally: as if the pairs were expanded); plackett_luce: DPO's ranking
                          # loss over each item's full ranking (mean over items; loss.method dpo)

Only read when the data is ranked; pair and unpaired data ignore it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .config_base import ConfigError, Section
from .loss_config import LossConfig


class RankedConfig(Section):
    """Pair rule, margin and loss of ranked data (see the module docstring)."""

    pairs: Literal["best_worst", "all", "adjacent"] = "all"
    margin: float = Field(0.0, ge=0.0)
    loss: Literal["pairs", "plackett_luce"] = "pairs"

    def check_loss(self, loss: LossConfig) -> None:
        """Raise a ConfigError when ``loss`` cannot train on ranked data this way."""
        if loss.method == "kto":
            raise ConfigError("ranked data (completions with scores) trains pairwise or "
                              "listwise losses; loss.method 'kto' needs desirable/undesirable "
                              "labels")
        if loss.ld_alpha is not None:
            raise ConfigError("loss.ld_alpha (LD-DPO) needs each pair's shared length, which "
                              "ranked rows do not lay out; drop it for ranked data")
        if self.loss == "plackett_luce" and (loss.method != "dpo" or loss.use_weighting
                                             or (loss.loss_type or ["sigmoid"]) != ["sigmoid"]):
            raise ConfigError("ranked.loss 'plackett_luce' is DPO's ranking loss: it needs "
                              "loss.method 'dpo' with loss_type [sigmoid] (the default) and no "
                              "use_weighting; ranked.loss 'pairs' takes any pair loss")
