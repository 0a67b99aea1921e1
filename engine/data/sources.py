"""Data sources as users have them: one file, several files, a ``save_to_disk`` folder, with a
column mapping; and weighted mixtures of sources, drawn once from a seed.

    source = DataSource(paths=("a.jsonl", "b.parquet"), columns={"prompt": "question"},
                        setting="data.train")
    records = load_source(source)       # PreferenceRecords; origins name the file and row
    source.content_hash()               # sha256 of the files' bytes (+ mapping, split)
    picks = mixture_picks([len(a), len(b)], weights=[0.7, 0.3], size=10_000, seed=0)
    mixed = take_mixture([a, b], picks)  # a TokenizedDataset of the picked items, in order

A mixture is a fixed list of ``(source, item)`` picks: each source's share is its weight's share
of ``size`` (largest remainder, so the proportions are exact to one item), its items are taken
from seeded permutations of the source (a new permutation each time the source is used up:
oversampling repeats every item before any item thrice), and the picks are shuffled together
with the seed. The same data, weights, size and seed always give the same list, so a resumed run
sees the same mixture and continues at the same position.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .bad_rows import BadRowPolicy
from .columns import check_column_mapping
from .dataset import DataStats, TokenizedDataset
from .files import PreferenceRecords, load_preference_records
from .formats import DataFormatError, is_paired


@dataclass(frozen=True)
class DataSource:
    """Files read as one data set: ``paths`` (files or ``save_to_disk`` folders, concatenated
    in order), ``columns`` (field → the user's column), ``split`` (of a ``DatasetDict``
    folder), ``weight`` (in a mixture) and ``setting`` (the config key errors name)."""

    paths: tuple[str, ...]
    columns: Mapping[str, str] = field(default_factory=dict)
    split: str | None = None
    weight: float = 1.0
    setting: str = "data.train"

    def __post_init__(self) -> None:
        if not self.paths:
            raise DataFormatError(f"{self.setting}: no data file given")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise DataFormatError(f"{self.setting}.weight must be a positive number, "
                                  f"got {self.weight!r}")
        check_column_mapping(self.columns, f"{self.setting}.columns")

    @property
    def name(self) -> str:
        more = len(self.paths) - 1
        return self.paths[0] if not more else f"{self.paths[0]} (+{more} more)"

    def content_hash(self) -> str:
        """sha256 of every file's bytes (a folder: each file under it, by relative path), the
        mapping and the split: the source's identity in the tokenization cache."""
        digest = hashlib.sha256()
        digest.update(repr((sorted(self.columns.items()), self.split)).encode())
        for path in map(Path, self.paths):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            digest.update(f"source {len(files)}\n".encode())
            for file in files:
                digest.update(file.relative_to(path).as_posix().encode() if path.is_dir()
                              else b"file")
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()


def load_source(source: DataSource, *, bad_rows: BadRowPolicy | None = None
                ) -> PreferenceRecords:
    """Every file's records, in order, mapped and checked (bad rows handled by ``bad_rows``,
    file by file); all paired or all unpaired."""
    out = PreferenceRecords(source=source.name)
    for path in source.paths:
        records = load_preference_records(path, split=source.split, columns=source.columns,
                                          columns_setting=f"{source.setting}.columns",
                                          bad_rows=bad_rows)
        if out and is_paired(records[0]) != is_paired(out[0]):
            kinds = ("paired", "unpaired") if is_paired(out[0]) else ("unpaired", "paired")
            raise DataFormatError(f"{source.setting}: {records.origins[0]} is {kinds[1]} but "
                                  f"{out.origins[0]} is {kinds[0]}; one data set holds one kind")
        out.extend(records)
        out.origins.extend(records.origins)
    return out


def _shares(weights: Sequence[float], size: int) -> list[int]:
    """``size`` split by ``weights`` (largest remainder: exact to one item per source)."""
    total = math.fsum(weights)
    exact = [w / total * size for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


def default_mixture_size(sizes: Sequence[int], weights: Sequence[float]) -> int:
    """The largest mixture that uses no source's item twice: the first source to run out
    decides (``min(size_i / share_i)``)."""
    total = math.fsum(weights)
    return max(1, min(math.floor(n * total / w + 1e-9) for n, w in zip(sizes, weights)))


def mixture_picks(sizes: Sequence[int], weights: Sequence[float], *, size: int, seed: int
                  ) -> list[tuple[int, int]]:
    """``size`` ``(source, item)`` picks, source ``i`` taking ``weights[i] / sum(weights)`` of
    them (see the module docstring); deterministic in its arguments."""
    if len(sizes) != len(weights) or not sizes:
        raise ValueError("mixture_picks needs one weight per source")
    if any(n < 1 for n in sizes):
        raise ValueError(f"every mixture source needs items, got sizes {list(sizes)}")
    rng = random.Random(f"fastpo-mixture-{seed}")
    picks: list[tuple[int, int]] = []
    for source, (n, count) in enumerate(zip(sizes, _shares(weights, size))):
        items: list[int] = []
        while len(items) < count:
            order = list(range(n))
            rng.shuffle(order)
            items.extend(order)
        picks.extend((source, item) for item in items[:count])
    rng.shuffle(picks)
    return picks


def take_mixture(datasets: Sequence[TokenizedDataset], picks: Sequence[tuple[int, int]]
                 ) -> TokenizedDataset:
    """The picked items of ``datasets`` (all paired or all unpaired) as one data set, in pick
    order; its stats add the sources' and its settings list theirs."""
    if len({d.paired for d in datasets}) > 1:
        raise DataFormatError("a mixture holds paired and unpaired sources; use one kind")
    items = [datasets[s][i] for s, i in picks]
    stats = DataStats()
    for d in datasets:
        stats.rows += d.stats.rows
        stats.truncated_prompt += d.stats.truncated_prompt
        stats.truncated_completion += d.stats.truncated_completion
        stats.dropped.update(d.stats.dropped)
    stats.kept = len(items)
    settings = {**datasets[0].settings, "mixture_sources": len(datasets)}
    paired = datasets[0].paired
    return replace(datasets[0], pairs=items if paired else [], examples=[] if paired else items,
                   stats=stats, settings=settings)
