"""Preference data: load user files, tokenize prompt and completions exactly, split train/eval.

    records = load_preference_records("pairs.jsonl")          # JSON, JSONL, Parquet, datasets dir
    data = tokenize_pairs(records, tokenizer, max_length=1024, max_prompt_length=512)
    data.stats.log()                                          # kept / truncated / dropped, once
    train, held_out = split_train_eval(data, 0.1, seed=0)

Files are read by :mod:`fastpo.engine.data.files`, rows checked by
:mod:`fastpo.engine.data.formats`, texts encoded by :mod:`fastpo.engine.data.encoding`.
The prompt and each completion are tokenized separately and concatenated, so the completion
tokens are exactly the tokens the loss scores: conversational prompts are rendered with the chat
template and the generation prompt (``<|im_start|>assistant\\n``), the completion is the rest of
the rendered conversation up to and including its EOS (template text after the last EOS, such as
a trailing newline, is not part of it), and EOS is appended to a completion that does not end
with it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .encoding import encode_texts, render_chat, render_completion
from .files import PreferenceRecords, load_preference_records  # noqa: F401  (re-exported)
from .formats import (
    DataFormatError,
    is_empty_completion,
    is_paired,
    normalize_record,
    pairs_to_unpaired,
    record_kind,
)
from .ranked import TokenizedRanked
from .tokenized import (  # noqa: F401  (re-exported: the types tokenize_pairs returns)
    DROP_REASONS,
    DataStats,
    TokenizedDataset,
    TokenizedExample,
    TokenizedPair,
)

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start", "drop")
def _with_origins(records: Sequence[Mapping[str, Any]], unpaired: bool
                  ) -> tuple[list[dict[str, Any]], list[str], list[tuple[str, ...]]]:
    """Canonical records, where each came from, and the field names of its completions."""
    origins = list(getattr(records, "origins", None) or ())
    if len(origins) != len(records):
        origins = [f"records[{i}]" for i in range(len(records))]
    canonical = [normalize_record(r, where) for r, where in zip(records, origins)]
    fields = [tuple(f"completions[{k}]" for k in range(len(r["completions"])))
              if record_kind(r) == "ranked" else ("chosen", "rejected") if is_paired(r)
              else ("completion",) for r in canonical]
    if unpaired:
        converted = pairs_to_unpaired(canonical)
        origins = [where for where, f in zip(origins, fields) for _ in f]
        fields = [(name,) for f in fields for name in f]
        canonical = converted
    return canonical, origins, fields


def check_unpaired_balance(examples: Sequence[TokenizedExample], *, source: str,
                           stats: DataStats | None = None) -> None:
    """KTO needs desirable and undesirable examples (its metrics and reference point compare
    the two): raise a DataFormatError naming ``source`` and the counts when a kind is absent."""
    desirable = sum(1 for e in examples if e.label)
    undesirable = len(examples) - desirable
    if examples and (desirable == 0 or undesirable == 0):
        missing = "undesirable (label false)" if undesirable == 0 else "desirable (label true)"
        kept = f" after tokenization ({stats.summary()})" if stats and stats.num_dropped else ""
        raise DataFormatError(
            f"{source}: KTO needs both desirable and undesirable examples; got {desirable} "
            f"desirable and {undesirable} undesirable{kept}: add {missing} examples")


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
                   truncation_mode: str = "keep_end", unpaired: bool = False,
                   chat_template_kwargs: Mapping[str, Any] | None = None,
                   progress: bool = False) -> TokenizedDataset:
    """Tokenize canonical records (from :func:`load_preference_records`) into token ids.

    Limits: a prompt longer than ``max_prompt_length`` is cut (``keep_end``: its last tokens;
    ``keep_start``: its first), then completions are cut so that prompt + completion fits
    ``max_length``; a row where no completion token fits is dropped. ``truncation_mode="drop"``
    drops every row over a limit instead. Rows with chosen identical to rejected, an empty
    completion or an empty prompt are dropped; all of it is counted in ``.stats``. Raises
    ``DataFormatError`` (a ``ValueError`` naming the file, with the summary) when no row is
    left, when unpaired data lacks desirable or undesirable examples, or when the tokenizer
    rejects a text (naming its row and field).
    ``unpaired=True`` turns pairs into KTO examples (chosen desirable, rejected undesirable).
    ``chat_template_kwargs`` go to every ``apply_chat_template`` call (with a row's ``tools``);
    ``progress`` shows a progress bar over the rows.
    """
    _check_limits(max_length, max_prompt_length, truncation_mode)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(tokenizer, "eos_token", None)
    if eos_id is None or eos is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    source = getattr(records, "source", None) or "preference data"
    records, origins, fields = _with_origins(records, unpaired)
    stats = DataStats(rows=len(records))

    # 1. render text; drop identical / empty rows
    kept: list[tuple[dict[str, Any], list[str]]] = []
    labels: list[list[str]] = []  # "<row>: field 'x'" of each text, for the tokenizer's errors
    template_kwargs = dict(chat_template_kwargs or {})
    for i, record in enumerate(_progress(records, source, enabled=progress)):
        values = _completions(record)
        if len(values) == 2 and "chosen" in record and values[0] == values[1]:
            stats.dropped["identical"] += 1
            continue
        if "scores" in record and len(set(record["scores"])) == 1:
            stats.dropped["tied"] += 1
            continue
        if any(is_empty_completion(v) for v in values):
            stats.dropped["empty_completion"] += 1
            continue
        prompt = record["prompt"]
        if isinstance(prompt, str):
            texts = [prompt, *values]
        else:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("conversational data needs a tokenizer with a chat template")
            kwargs = ({**template_kwargs, "tools": record["tools"]} if "tools" in record
                      else template_kwargs)
            prompt_text = render_chat(tokenizer, prompt, generation_prompt=True,
                                      template_kwargs=kwargs)
            texts = [prompt_text] + [
                render_completion(tokenizer, prompt, v, prompt_text, eos, origins[i], kwargs)
                for v in values]
        kept.append((record, texts))
        labels.append([f"{origins[i]}: field '{name}'" for name in ("prompt", *fields[i])])

    # 2. tokenize in batches: string prompts get the tokenizer's special tokens (BOS), chat
    #    prompts already hold them in the template, completions never do
    is_string = [isinstance(r["prompt"], str) for r, _ in kept]
    prompt_ids: list[list[int]] = [[] for _ in kept]
    for special in (True, False):
        ids_list = [i for i, s in enumerate(is_string) if s == special]
        encoded = encode_texts(tokenizer, [kept[i][1][0] for i in ids_list], special=special,
                          labels=[labels[i][0] for i in ids_list])
        for i, ids in zip(ids_list, encoded):
            prompt_ids[i] = ids
    completion_texts = [t for _, texts in kept for t in texts[1:]]
    completion_ids = iter(encode_texts(tokenizer, completion_texts, special=False,
                                  labels=[name for names in labels for name in names[1:]]))

    # 3. EOS, limits
    pairs: list[TokenizedPair] = []
    examples: list[TokenizedExample] = []
    ranked: list[TokenizedRanked] = []
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
        if record_kind(record) == "ranked":
            ranked.append(TokenizedRanked(prompt, completions, list(record["scores"])))
        elif is_paired(record):
            if completions[0] == completions[1]:
                stats.dropped["identical_after_truncation"] += 1
                continue
            pairs.append(TokenizedPair(prompt, completions[0], completions[1]))
        else:
            examples.append(TokenizedExample(prompt, completions[0], bool(record["label"])))
    stats.kept = len(pairs) + len(examples) + len(ranked)
    if not stats.kept:
        raise DataFormatError(f"{source}: no usable preference rows are left: "
                              f"{stats.summary()}")
    check_unpaired_balance(examples, source=source, stats=stats)
    settings = {
        "paired": bool(pairs) or bool(ranked),
        "ranked": bool(ranked),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "eos_token_id": eos_id,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
        "unpaired": unpaired,
    }
    if template_kwargs:
        settings["chat_template_kwargs"] = template_kwargs
    return TokenizedDataset(pairs, examples, stats, settings, ranked)


def _completions(record: Mapping[str, Any]) -> list[Any]:
    """The completions of a canonical record, in order (chosen/rejected, the one unpaired
    completion, or a ranked item's K)."""
    kind = record_kind(record)
    if kind == "ranked":
        return list(record["completions"])
    return [record["chosen"], record["rejected"]] if kind == "paired" else [record["completion"]]


def _progress(records: Sequence[dict[str, Any]], source: str, *, enabled: bool
              ) -> Iterable[dict[str, Any]]:
    """``records``, iterated under a tqdm bar ("tokenizing <source>") when ``enabled``."""
    if not enabled:
        return records
    from tqdm.auto import tqdm

    return tqdm(records, desc=f"tokenizing {source}", unit=" rows", leave=False)


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
    train_set = dataset.subset(train)
    if not dataset.paired:
        check_unpaired_balance(train_set.examples,
                               source=f"the training split (eval_fraction {eval_fraction})")
    return train_set, dataset.subset(sorted(held_out))
