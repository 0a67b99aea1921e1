"""Preference data: load user files, tokenize prompt and completions exactly, split train/eval.

    records = load_preference_records("pairs.jsonl")          # JSON, JSONL, Parquet, datasets dir
    data = tokenize_pairs(records, tokenizer, max_length=1024, max_prompt_length=512)
    data.stats.log()                                          # kept / truncated / dropped, once
    train, held_out = split_train_eval(data, 0.1, seed=0)

Formats are described in :mod:`fastpo.engine.formats`. The prompt and each completion are
tokenized separately and concatenated, so the completion tokens are exactly the tokens the loss
scores: conversational prompts are rendered with the chat template and the generation prompt
(``<|im_start|>assistant\\n``), the completion is the rest of the rendered conversation up to and
including its EOS (template text after the last EOS, such as a trailing newline, is not part of
it), and EOS is appended to a completion that does not end with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .formats import (
    DataFormatError,
    Messages,
    is_empty_completion,
    is_paired,
    normalize_record,
    pairs_to_unpaired,
)

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start", "drop")
DROP_REASONS = {
    "identical": "chosen identical to rejected",
    "empty_completion": "empty completion",
    "empty_prompt": "empty prompt",
    "too_long": "cannot fit max_length",
    "identical_after_truncation": "chosen identical to rejected after truncation",
}
_TOKENIZE_CHUNK = 512


# ----------------------------------------------------------------------------------- loading
def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path} line {exc.lineno} column {exc.colno}: "
                                  f"malformed JSON ({exc.msg})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):  # JSON Lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path} line {lineno} column {exc.colno}: "
                                  f"malformed JSON ({exc.msg})") from None
        yield f"{path} line {lineno}", row


def _dataset_rows(dataset: Any, name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in dataset else None
        if split not in dataset:
            raise ValueError(f"{name} holds splits {sorted(dataset)}; choose one with split=")
        dataset, name = dataset[split], f"{name}[{split}]"
    for i, row in enumerate(dataset):
        yield f"{name} row {i}", row


def _source_rows(source: Any, split: str | None) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if not any((path / f).is_file() for f in
                       ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise ValueError(f"{path} is a folder but not a dataset saved with "
                                 "datasets' save_to_disk")
            import datasets

            yield from _dataset_rows(datasets.load_from_disk(str(path)), str(path), split)
        elif not path.is_file():
            raise FileNotFoundError(f"preference data {path}: no such file or folder")
        elif path.suffix in (".json", ".jsonl"):
            yield from _json_rows(path)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path} row {i}", row
        else:
            raise ValueError(f"preference data {path}: unsupported file type {path.suffix!r}; "
                             "use .json, .jsonl, .parquet or a save_to_disk folder")
        return
    try:
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            yield from _dataset_rows(source, "dataset", split)
            return
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        for i, row in enumerate(source):
            yield f"records[{i}]", row
        return
    raise TypeError("preference data must be a path, a list of dicts or a datasets.Dataset, "
                    f"got {type(source).__name__}")


def load_preference_records(source: str | Path | Sequence[Mapping[str, Any]] | Any, *,
                            split: str | None = None) -> list[dict[str, Any]]:
    """Load and validate preference data; return canonical paired or unpaired records.

    ``source``: a ``.json`` (array or JSON Lines), ``.jsonl`` or ``.parquet`` file, a folder saved
    with ``datasets``' ``save_to_disk``, a ``datasets.Dataset``/``DatasetDict`` (``split``
    picks one, default ``train``) or a list of dicts. Malformed JSON raises with file and line;
    missing or wrongly typed fields and unknown roles raise with the row and the field.
    """
    records: list[dict[str, Any]] = []
    first_kind: tuple[str, bool] | None = None
    for where, row in _source_rows(source, split):
        record = normalize_record(row, where)
        if first_kind is None:
            first_kind = (where, is_paired(record))
        elif is_paired(record) != first_kind[1]:
            kinds = ("unpaired", "paired") if first_kind[1] else ("paired", "unpaired")
            raise DataFormatError(f"{where}: {kinds[0]} record in data whose first record "
                                  f"({first_kind[0]}) is {kinds[1]}")
        records.append(record)
    if not records:
        name = f" {source}" if isinstance(source, (str, Path)) else ""
        raise DataFormatError(f"preference data{name} holds no records")
    return records


# -------------------------------------------------------------------------------- tokenized
@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; both completions end with EOS unless truncated."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens of the two sequences (prompt + chosen, prompt + rejected)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one unpaired (KTO) example; ``label`` is True for a desirable completion."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


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
    """Tokenized pairs (``.pairs``) or unpaired examples (``.examples``), stats, settings."""

    pairs: list[TokenizedPair]
    examples: list[TokenizedExample]
    stats: DataStats
    settings: dict[str, Any]

    @property
    def paired(self) -> bool:
        if self.pairs or self.examples:
            return bool(self.pairs)
        return bool(self.settings.get("paired", True))

    @property
    def items(self) -> list[TokenizedPair] | list[TokenizedExample]:
        return self.pairs if self.paired else self.examples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedPair | TokenizedExample:
        return self.items[index]

    def num_tokens(self) -> list[int]:
        """Real tokens of each item (both sequences of a pair), for token-based batching."""
        return [item.num_tokens for item in self.items]

    def subset(self, indices: Sequence[int]) -> TokenizedDataset:
        items = self.items
        chosen = [items[i] for i in indices]
        return replace(self, pairs=chosen if self.paired else [],
                       examples=[] if self.paired else chosen)

    def fingerprint(self) -> str:
        """sha256 of every token id, label and the tokenization settings (not the tokenizer's
        local path, which differs between machines while the tokens do not)."""
        digest = hashlib.sha256()
        settings = {k: v for k, v in self.settings.items() if k != "tokenizer"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for item in self.items:
            for part in (item.prompt_ids, *(
                    (item.chosen_ids, item.rejected_ids) if isinstance(item, TokenizedPair)
                    else (item.completion_ids, [int(item.label)]))):
                digest.update(len(part).to_bytes(4, "little"))
                digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in part))
        return digest.hexdigest()


# ------------------------------------------------------------------------------ tokenizing
def _render_chat(tokenizer: Any, prompt: Messages, completion: Messages, prompt_text: str,
                 eos: str, where: str) -> str:
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataFormatError(
            f"{where}: the chat template renders the prompt differently alone (with the "
            "generation prompt) than inside the whole conversation, so the completion cannot be "
            "cut at an exact boundary; use a template whose generation prompt is a prefix of the "
            "rendered assistant turn")
    text = full[len(prompt_text):]
    cut = text.rfind(eos)
    return text[: cut + len(eos)] if cut >= 0 else text


def _encode(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start: start + _TOKENIZE_CHUNK]
        out.extend(tokenizer(chunk, add_special_tokens=special)["input_ids"])
    return [list(ids) for ids in out]


def _check_limits(max_length: int | None, max_prompt_length: int | None,
                  truncation_mode: str) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length > max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must not exceed max_length "
                         f"({max_length})")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, "
                         f"got {truncation_mode!r}")


def _truncate(prompt: list[int], completions: list[list[int]], *, max_length: int | None,
              max_prompt_length: int | None, mode: str, stats: DataStats
              ) -> tuple[list[int], list[list[int]]] | None:
    """Fit prompt + each completion into the limits, or None (counted) when it cannot."""
    prompt_limit = max_prompt_length if max_prompt_length is not None else max_length
    longest = max(len(c) for c in completions)
    if mode == "drop":
        if ((prompt_limit is not None and len(prompt) > prompt_limit)
                or (max_length is not None and len(prompt) + longest > max_length)):
            stats.dropped["too_long"] += 1
            return None
        return prompt, completions
    if prompt_limit is not None and len(prompt) > prompt_limit:
        # keep_end keeps the last turns (the question just before the answer)
        prompt = prompt[-prompt_limit:] if mode == "keep_end" else prompt[:prompt_limit]
        stats.truncated_prompt += 1
    if max_length is not None:
        room = max_length - len(prompt)
        if room < 1:
            stats.dropped["too_long"] += 1
            return None
        if longest > room:
            completions = [c[:room] for c in completions]
            stats.truncated_completion += 1
    return prompt, completions


def tokenize_pairs(records: Sequence[Mapping[str, Any]], tokenizer: Any, *,
                   max_length: int | None = 1024, max_prompt_length: int | None = 512,
                   truncation_mode: str = "keep_end", unpaired: bool = False) -> TokenizedDataset:
    """Tokenize canonical records (from :func:`load_preference_records`) into token ids.

    Limits: a prompt longer than ``max_prompt_length`` is cut (``keep_end``: its last tokens;
    ``keep_start``: its first), then completions are cut so that prompt + completion fits
    ``max_length``; a row where no completion token fits is dropped. ``truncation_mode="drop"``
    drops every row over a limit instead. Rows with chosen identical to rejected, an empty
    completion or an empty prompt are dropped; all of it is counted in ``.stats``. Raises
    ``ValueError`` (with the summary) when no row is left.
    ``unpaired=True`` turns pairs into KTO examples (chosen desirable, rejected undesirable).
    """
    _check_limits(max_length, max_prompt_length, truncation_mode)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(tokenizer, "eos_token", None)
    if eos_id is None or eos is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    records = [normalize_record(r, f"records[{i}]") for i, r in enumerate(records)]
    if unpaired:
        records = pairs_to_unpaired(records)
    stats = DataStats(rows=len(records))

    # 1. render text; drop identical / empty rows
    kept: list[tuple[dict[str, Any], list[str]]] = []
    for i, record in enumerate(records):
        keys = ("chosen", "rejected") if is_paired(record) else ("completion",)
        if len(keys) == 2 and record["chosen"] == record["rejected"]:
            stats.dropped["identical"] += 1
            continue
        if any(is_empty_completion(record[k]) for k in keys):
            stats.dropped["empty_completion"] += 1
            continue
        prompt = record["prompt"]
        if isinstance(prompt, str):
            texts = [prompt] + [record[k] for k in keys]
        else:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("conversational data needs a tokenizer with a chat template")
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                        add_generation_prompt=True)
            texts = [prompt_text] + [
                _render_chat(tokenizer, prompt, record[k], prompt_text, eos, f"records[{i}]")
                for k in keys]
        kept.append((record, texts))

    # 2. tokenize in batches: string prompts get the tokenizer's special tokens (BOS), chat
    #    prompts already hold them in the template, completions never do
    is_string = [isinstance(r["prompt"], str) for r, _ in kept]
    prompt_ids: list[list[int]] = [[] for _ in kept]
    for special in (True, False):
        ids_list = [i for i, s in enumerate(is_string) if s == special]
        encoded = _encode(tokenizer, [kept[i][1][0] for i in ids_list], special=special)
        for i, ids in zip(ids_list, encoded):
            prompt_ids[i] = ids
    completion_texts = [t for _, texts in kept for t in texts[1:]]
    completion_ids = iter(_encode(tokenizer, completion_texts, special=False))

    # 3. EOS, limits
    pairs: list[TokenizedPair] = []
    examples: list[TokenizedExample] = []
    for (record, texts), prompt in zip(kept, prompt_ids):
        completions = [next(completion_ids) for _ in texts[1:]]
        completions = [c if c and c[-1] == eos_id else [*c, eos_id] for c in completions]
        if not prompt:
            stats.dropped["empty_prompt"] += 1
            continue
        fitted = _truncate(prompt, completions, max_length=max_length,
                           max_prompt_length=max_prompt_length, mode=truncation_mode,
                           stats=stats)
        if fitted is None:
            continue
        prompt, completions = fitted
        if is_paired(record):
            if completions[0] == completions[1]:
                stats.dropped["identical_after_truncation"] += 1
                continue
            pairs.append(TokenizedPair(prompt, completions[0], completions[1]))
        else:
            examples.append(TokenizedExample(prompt, completions[0], bool(record["label"])))
    stats.kept = len(pairs) + len(examples)
    if not stats.kept:
        raise ValueError(f"no usable preference rows are left: {stats.summary()}")
    settings = {
        "paired": bool(pairs),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "eos_token_id": eos_id,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
        "unpaired": unpaired,
    }
    return TokenizedDataset(pairs, examples, stats, settings)


def split_train_eval(dataset: TokenizedDataset, eval_fraction: float, seed: int = 0
                     ) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Split into a training set and a held-out set of ``round(eval_fraction · n)`` items.

    The split is a seeded random choice (the same for the same seed and data); both parts keep
    the dataset order. ``eval_fraction`` 0 gives an empty held-out set.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    n = len(dataset)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    train = [i for i in range(n) if i not in held_out]
    return dataset.subset(train), dataset.subset(sorted(held_out))
