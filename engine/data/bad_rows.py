"""What loading does with a bad row of a big file: stop at it, or skip it and count.

    policy = BadRowPolicy(on_bad_row="skip", max_bad_fraction=0.01)
    records = load_preference_records("big.jsonl", bad_rows=policy)

``error`` (the default) raises the row's :class:`~.formats.DataFormatError` (file, line, field).
``skip`` drops unreadable (malformed JSON) and invalid rows (missing or wrongly typed fields,
unknown roles, the other record kind), counts them by reason, logs the first
:attr:`BadRowPolicy.log_first` with their line numbers and a summary at the end, and raises a
:class:`~.formats.DataFormatError` when more than ``max_bad_fraction`` of the rows are bad (a
file that is mostly broken is the wrong file, not a noisy one).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from .formats import DataFormatError

logger = logging.getLogger(__name__)

# the variable tail of a row's message: what it got, which fields it has, which roles are valid
_DETAIL = re.compile(r",? got .*$|;.*$| \(.*$|: (?:malformed|expected).*$")


@dataclass(frozen=True)
class BadRowPolicy:
    """``data.on_bad_row`` and ``data.max_bad_fraction`` (see the module docstring)."""

    on_bad_row: Literal["error", "skip"] = "error"
    max_bad_fraction: float = 0.01
    log_first: int = 5

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


def reason_of(message: str, where: str) -> str:
    """The kind of problem of a row's message, without the row and the values (the key the
    bad rows are counted under): "missing field 'chosen'", "malformed JSON", ..."""
    text = message[len(where) + 2:] if message.startswith(f"{where}: ") else message
    if "malformed JSON" in text:
        return "malformed JSON"
    text = re.sub(r"^line \d+ column \d+: ", "", text)
    return _DETAIL.sub("", text).strip() or text[:80]


@dataclass
class BadRowTally:
    """The bad rows of one load under ``policy``; :meth:`bad` for each, :meth:`finish` once."""

    policy: BadRowPolicy
    source: str
    counts: Counter[str] = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    def bad(self, where: str, error: DataFormatError) -> None:
        """Record a bad row; under ``error`` raise its error instead."""
        if self.policy.on_bad_row == "error":
            raise error
        self.counts[reason_of(str(error), where)] += 1
        if len(self.first) < self.policy.log_first:
            self.first.append(str(error))
            logger.warning("skipping bad row: %s", error)

    def finish(self, total: int) -> None:
        """After all ``total`` rows: the summary, or an error when too many were bad."""
        bad = sum(self.counts.values())
        if not bad:
            return
        fraction = bad / max(total, 1)
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        text = f"{bad} of {total} rows ({fraction:.2%}) are bad: {reasons}"
        if fraction > self.policy.max_bad_fraction:
            raise DataFormatError(
                f"preference data {self.source}: {text}; more than data.max_bad_fraction "
                f"{self.policy.max_bad_fraction:g} - is it the right file? The first: "
                f"{self.first[0]}. Fix the rows, or raise data.max_bad_fraction")
        logger.warning("preference data %s: skipped %s", self.source, text)
