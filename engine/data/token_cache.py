"""The tokenization cache: a tokenized data set on disk, keyed by what made it.

    key = tokenization_key(source.content_hash(), tokenizer, settings)
    dataset = cached_tokenization(cache_dir / key, build=lambda: tokenize_pairs(...))

The key is a sha256 of the data's bytes (``DataSource.content_hash``), the tokenizer (its
vocabulary, added and special tokens, chat template, normalizer and pre-tokenizer: everything
that changes a token id), the settings (limits, truncation, KTO conversion,
``chat_template_kwargs``, the column mapping) and the tokenizing code itself, so a changed file,
tokenizer, setting or fastpo version is a new entry and an unchanged one is read back instead of
tokenized again. An entry is a folder: ``tokens.safetensors`` (each field's token ids
concatenated, int32, with int64 offsets; no pickle) and ``meta.json`` (counts, stats, settings).
It is built in a temporary folder and moved into place under a file lock
(``assets.build_once``): concurrent callers wait for the first.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .assets import build_once
from .formats import DataFormatError
from .ranked import TokenizedRanked
from .tokenized import DataStats, TokenizedDataset, TokenizedExample, TokenizedPair

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: ranked items; meta.json names the kind
TOKENS_FILE = "tokens.safetensors"
META_FILE = "meta.json"


def tokenizer_fingerprint(tokenizer: object) -> str:
    """sha256 of what decides the tokenizer's ids and renderings (not its local path)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole definition as JSON
        digest.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        digest.update(json.dumps(sorted(vocab.items())).encode())
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": getattr(tokenizer, "special_tokens_map", None),
        "bos": getattr(tokenizer, "add_bos_token", None),
        "eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# the modules whose code decides the token ids: a change to any of them is a new cache entry
TOKENIZING_CODE = ("files.py", "columns.py", "formats.py", "encoding.py", "dataset.py",
                   "token_cache.py")


@functools.cache
def _code_hash() -> str:
    digest = hashlib.sha256()
    for name in TOKENIZING_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def tokenization_key(data_hash: str, tokenizer: object, settings: Mapping[str, object]) -> str:
    """The cache entry's name: sha256 of the data, the tokenizer, the settings and the code
    that tokenizes (so an upgraded fastpo never reads an entry an older one wrote)."""
    digest = hashlib.sha256(f"fastpo-tokenized-v{CACHE_FORMAT}\n{data_hash}\n".encode())
    digest.update(_code_hash().encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _flat(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in lists], out=offsets[1:])
    values = np.fromiter((t for ids in lists for t in ids), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets


def _unflat(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat, ends = values.tolist(), offsets.tolist()
    return [flat[a:b] for a, b in itertools.pairwise(ends)]


def _fields(kind: str) -> tuple[str, ...]:
    return {"paired": ("prompt_ids", "chosen_ids", "rejected_ids"),
            "unpaired": ("prompt_ids", "completion_ids"),
            "ranked": ("prompt_ids",)}[kind]


def _kind(dataset: TokenizedDataset) -> str:
    return "ranked" if dataset.is_ranked else "paired" if dataset.paired else "unpaired"


def save_tokenized(dataset: TokenizedDataset, folder: Path) -> None:
    """Write ``dataset`` into ``folder`` (safetensors + JSON)."""
    from safetensors.numpy import save_file

    items, kind = dataset.items, _kind(dataset)
    tensors: dict[str, np.ndarray] = {}
    for name in _fields(kind):
        tensors[name], tensors[f"{name}.offsets"] = _flat([getattr(i, name) for i in items])
    if kind == "unpaired":
        tensors["labels"] = np.array([bool(i.label) for i in items], dtype=np.uint8)
    if kind == "ranked":  # every completion in item order; K of each item; their scores
        tensors["completions"], tensors["completions.offsets"] = _flat(
            [c for i in items for c in i.completions])
        tensors["completions.per_item"] = np.array([len(i.completions) for i in items],
                                                   dtype=np.int64)
        tensors["scores"] = np.array([x for i in items for x in i.scores], dtype=np.float64)
    save_file(tensors, str(folder / TOKENS_FILE))
    stats = dataset.stats
    meta = {"format": CACHE_FORMAT, "kind": kind, "items": len(items),
            "settings": dataset.settings,
            "stats": {"rows": stats.rows, "kept": stats.kept,
                      "truncated_prompt": stats.truncated_prompt,
                      "truncated_completion": stats.truncated_completion,
                      "dropped": dict(stats.dropped)}}
    (folder / META_FILE).write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")


def load_tokenized(folder: Path) -> TokenizedDataset:
    """The data set :func:`save_tokenized` wrote into ``folder``; DataFormatError if unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TOKENS_FILE))
        kind = meta["kind"]
        columns = [_unflat(tensors[name], tensors[f"{name}.offsets"]) for name in _fields(kind)]
        if meta.get("format") != CACHE_FORMAT or any(len(c) != meta["items"] for c in columns):
            raise ValueError("format or item count does not match meta.json")
        if kind == "ranked":
            per_item = tensors["completions.per_item"].tolist()
            flat = _unflat(tensors["completions"], tensors["completions.offsets"])
            scores = tensors["scores"].tolist()
            if (len(per_item) != meta["items"] or sum(per_item) != len(flat)
                    or len(flat) != len(scores)):
                raise ValueError("ranked completions do not match meta.json")
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise DataFormatError(f"tokenization cache {folder}: unreadable ({exc})") from None
    s = meta["stats"]
    stats = DataStats(rows=s["rows"], kept=s["kept"], truncated_prompt=s["truncated_prompt"],
                      truncated_completion=s["truncated_completion"],
                      dropped=Counter(s["dropped"]))
    if kind == "paired":
        pairs = [TokenizedPair(p, c, r) for p, c, r in zip(*columns)]
        return TokenizedDataset(pairs, [], stats, meta["settings"])
    if kind == "ranked":
        ends = np.cumsum([0, *per_item]).tolist()
        ranked = [TokenizedRanked(p, flat[a:b], scores[a:b])
                  for p, a, b in zip(columns[0], ends, ends[1:])]
        return TokenizedDataset([], [], stats, meta["settings"], ranked)
    labels = tensors["labels"].tolist()
    examples = [TokenizedExample(p, c, bool(label)) for p, c, label in zip(*columns, labels)]
    return TokenizedDataset([], examples, stats, meta["settings"])


def cached_tokenization(entry: Path, build: Callable[[], TokenizedDataset]) -> TokenizedDataset:
    """The data set cached at ``entry``, built with ``build()`` and stored first when absent
    (once: concurrent callers wait on a file lock); an unreadable entry is rebuilt, and a cache
    folder that cannot be written (read-only, full) is warned about and skipped."""
    built: list[TokenizedDataset] = []
    started: list[bool] = []

    def write(tmp: Path) -> None:
        started.append(True)
        built.append(build())
        save_tokenized(built[0], tmp)

    try:
        folder = build_once(entry, write)
    except OSError as exc:
        if started and not built:  # build() itself failed (a data file): its own error
            raise
        logger.warning("tokenization cache %s not usable (%s: %s); the data stays in memory",
                       entry, type(exc).__name__, exc)
        return built[0] if built else build()
    if built:  # tokenized here: no need to read it back
        return built[0]
    try:
        return load_tokenized(folder)
    except DataFormatError as exc:
        logger.warning("%s; tokenizing again", exc)
        shutil.rmtree(folder, ignore_errors=True)
        folder = build_once(entry, write)
        return built[0] if built else load_tokenized(folder)
