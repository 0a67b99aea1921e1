"""Tokenized preference data: pairs, unpaired examples and ranked items, with the statistics of
what tokenization kept, truncated and dropped (built by :mod:`.dataset`, cached by
:mod:`.token_cache`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .ranked import TokenizedRanked, has_pairs

logger = logging.getLogger(__name__)

DROP_REASONS = {
    "identical": "chosen identical to rejected",
    "empty_completion": "empty completion",
    "empty_prompt": "empty prompt",
    "too_long": "cannot fit max_length",
    "identical_after_truncation": "chosen identical to rejected after truncation",
    "tied": "every completion scored the same",
    "no_pairs": "no score gap above the pair margin",
}


# -------------------------------------------------------------------------------- tokenized
@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; both completions end with EOS unless truncated."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one unpaired (KTO) example; ``label`` is True for a desirable completion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class DataStats:
    """What tokenization kept, truncated and dropped (by reason)."""

    rows: int = 0
    kept: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0
    dropped: Counter = field(default_factory=Counter)
    _logged: bool = field(default=False, repr=False, compare=False)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        text = (f"preference data: {self.rows} rows, {self.kept} kept "
                f"({self.truncated_prompt} with truncated prompt, "
                f"{self.truncated_completion} with truncated completions), "
                f"{self.num_dropped} dropped")
        if self.dropped:
            text += ": " + ", ".join(f"{DROP_REASONS.get(k, k)} {n}"
                                     for k, n in sorted(self.dropped.items()))
        return text

    def log(self, log: logging.Logger | None = None) -> None:
        """Log the summary at INFO level, the first time only."""
        if not self._logged:
            (log or logger).info(self.summary())
            self._logged = True


@dataclass
class TokenizedDataset:
    """Tokenized pairs (``.pairs``), unpaired examples (``.examples``) or ranked items
    (``.ranked``: K completions with scores, trained on as pairs picked by index), stats,
    settings (for ranked items also the pair rule: ``pairs``, ``pair_margin``)."""

    pairs: list[TokenizedPair]
    examples: list[TokenizedExample]
    stats: DataStats
    settings: dict[str, Any]
    ranked: list[TokenizedRanked] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        """Pairs or ranked items (a pairwise loss applies), not KTO examples."""
        if self.pairs or self.examples or self.ranked:
            return not self.examples
        return bool(self.settings.get("paired", True))

    @property
    def is_ranked(self) -> bool:
        return bool(self.ranked) or bool(self.settings.get("ranked", False))

    @property
    def items(self) -> list[TokenizedPair] | list[TokenizedExample] | list[TokenizedRanked]:
        return self.ranked if self.is_ranked else self.pairs if self.paired else self.examples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedPair | TokenizedExample | TokenizedRanked:
        return self.items[index]

    def subset(self, indices: Sequence[int]) -> TokenizedDataset:
        items = self.items
        chosen = [items[i] for i in indices]
        if self.is_ranked:
            return replace(self, pairs=[], examples=[], ranked=chosen)
        return replace(self, pairs=chosen if self.paired else [],
                       examples=[] if self.paired else chosen)

    def with_pair_rule(self, rule: str, margin: float = 0.0) -> TokenizedDataset:
        """Ranked items: the dataset whose batches take pairs by ``rule`` and ``margin``
        (:mod:`.ranked`), without the items that give no pair (counted in the stats)."""
        if not self.is_ranked:
            raise ValueError("a pair rule applies to ranked data (completions with scores)")
        kept = [it for it in self.ranked if has_pairs(it, rule=rule, margin=margin)]
        stats = replace(self.stats, dropped=Counter(self.stats.dropped))
        if len(kept) < len(self.ranked):
            stats.dropped["no_pairs"] += len(self.ranked) - len(kept)
            stats.kept = len(kept)
        return replace(self, ranked=kept, stats=stats,
                       settings={**self.settings, "pairs": rule, "pair_margin": margin})

    def fingerprint(self) -> str:
        """sha256 of every token id, label and the tokenization settings (not the tokenizer's
        local path, which differs between machines while the tokens do not)."""
        digest = hashlib.sha256()
        settings = {k: v for k, v in self.settings.items() if k != "tokenizer"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for item in self.items:
            if isinstance(item, TokenizedRanked):
                parts = (*item.completions, [len(item.completions)])
                digest.update(json.dumps(item.scores).encode())
            elif isinstance(item, TokenizedPair):
                parts = (item.chosen_ids, item.rejected_ids)
            else:
                parts = (item.completion_ids, [int(item.label)])
            for part in (item.prompt_ids, *parts):
                digest.update(len(part).to_bytes(4, "little"))
                digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in part))
        return digest.hexdigest()


# ------------------------------------------------------------------------------ tokenizing
