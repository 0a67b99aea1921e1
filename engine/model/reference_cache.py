"""Reference log-probs computed once and read back by dataset index.

:func:`precompute_reference_logps` runs a reference over a dataset once and stores its logps
(safetensors); :class:`CachedReference` reads them by ``batch.indices``;
:class:`PrecomputedReference` (``reference.mode: precomputed``) holds the train and held-out
caches and reads the one :meth:`~PrecomputedReference.use` names.

The cache is keyed by :func:`reference_cache_key`: a hash of the reference weights (adapter
weights excluded), every token of the dataset, the tokenization settings and the temperature.
A cache whose key does not match is refused with an error, never silently reused; so is a cache
whose values no longer match the sha256 stored with them (:func:`values_checksum`, in the
file's metadata): an edited or corrupted cache is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastpo.kernels.zero3 import is_zero3_parameter

from ..data.batch import PreferenceBatch, collate_batch, plan_batches
from ..data.dataset import TokenizedDataset
from .forward import SequenceLogps, unwrap_model
from .reference import ModelReference, ReferenceLogps, ReferenceStrategy

logger = logging.getLogger(__name__)
CACHE_FORMAT = "fastpo-reference-logps-v1"
_PAIRED_TENSORS = {"chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens",
                   "chosen_tail", "rejected_tail"}
_UNPAIRED_TENSORS = {"logps", "num_tokens", "kl_logps", "kl_tokens"}
# ranked items: one value per completion (item i's at offsets[i]..offsets[i+1]-1), whatever the
# pair rule, so that a completion in several pairs is stored and computed once
_RANKED_TENSORS = {"completion_logps", "completion_tokens", "offsets"}


def _adapter_names(model: nn.Module) -> set[str]:
    config = getattr(model, "peft_config", None)
    return set(config) if isinstance(config, dict) else set()


def weights_hash(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (name, dtype, shape, bytes), PEFT adapters
    excluded and PEFT name prefixes removed: the base weights of a LoRA policy hash the same
    before and after training, and the same as the plain model.
    """
    model = unwrap_model(model)
    adapters = _adapter_names(model)
    digest = hashlib.sha256()
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    entries = {}
    for name, value in named.items():
        if adapters and adapters.intersection(name.split(".")):
            continue
        # a PEFT-wrapped model's base weights hash like the plain model's
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        entries[plain] = value
    for name in sorted(entries):
        tensor = entries[name].detach()
        if is_zero3_parameter(entries[name]):
            raise ValueError(f"parameter {name} is partitioned by DeepSpeed ZeRO-3; hash (and "
                             "precompute reference logps) on an unpartitioned model")
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.contiguous().cpu().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().data)
    return digest.hexdigest()


def reference_cache_key(model: nn.Module, dataset: TokenizedDataset, *,
                        temperature: float = 1.0, extra: dict[str, Any] | None = None) -> str:
    """Key of a reference-logps cache: reference weights + data tokens + settings."""
    parts = {
        "format": CACHE_FORMAT,
        "weights": weights_hash(model),
        "data": dataset.fingerprint(),
        "temperature": float(temperature),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def values_checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 of named tensors (name, dtype, shape, bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _save_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"reference-logps cache {path}: not a readable safetensors file "
                         f"({exc}); delete it to recompute") from None
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a fastpo reference-logps cache "
                         f"(format {meta.get('format')!r})")
    return meta


class CachedReference(ReferenceStrategy):
    """Reference logps read from a cache file by dataset index (``batch.indices``)."""

    def __init__(self, path: str | Path, *, key: str) -> None:
        from safetensors.torch import load_file

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"reference-logps cache {self.path} does not exist")
        meta = _read_metadata(self.path)
        found = meta.get("key")
        if found != key:
            raise ValueError(
                f"reference-logps cache {self.path} was computed for key {found}, but the current "
                f"reference weights, data and tokenization settings give {key}: it is stale; "
                "delete it (or pass overwrite=True to precompute_reference_logps) to recompute")
        self.key = key
        from safetensors import SafetensorError

        try:
            self.tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"reference-logps cache {self.path}: not a readable safetensors "
                             f"file ({exc}); delete it to recompute") from None
        stored = meta.get("values_sha256")
        if stored is None:
            raise ValueError(f"reference-logps cache {self.path} has no checksum of its values "
                             "(written by an older fastpo); delete it to recompute")
        if values_checksum(self.tensors) != stored:
            raise ValueError(
                f"reference-logps cache {self.path}: its values do not match the sha256 stored "
                "with them (the file was edited or corrupted after it was written); delete it "
                "(or pass overwrite=True to precompute_reference_logps) to recompute")
        self.ranked = set(self.tensors) == _RANKED_TENSORS
        shapes = {tuple(t.shape) for k, t in self.tensors.items() if k != "offsets"}
        if set(self.tensors) not in (_PAIRED_TENSORS, _UNPAIRED_TENSORS, _RANKED_TENSORS) \
                or len(shapes) != 1 or len(shapes.pop()) != 1 or (self.ranked and (
                    self.tensors["offsets"].dim() != 1
                    or int(self.tensors["offsets"][-1]) != len(self.tensors["completion_logps"]))):
            raise ValueError(f"reference-logps cache {self.path}: unexpected tensors "
                             f"{ {k: tuple(t.shape) for k, t in self.tensors.items()} }")
        self.paired = "chosen_logps" in self.tensors
        # host copy: a ranked batch's completions are found without reading the device
        self.offsets = self.tensors["offsets"].tolist() if self.ranked else []
        self._copies: dict[torch.device, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        if self.ranked:
            return len(self.offsets) - 1
        return int(next(iter(self.tensors.values())).shape[0])

    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        if batch.indices is None:
            raise ValueError("cached reference logps need batch.indices (use collate_batch)")
        idx = batch.indices
        t = self._on(idx.device)
        if (batch.ranked is not None) != self.ranked:
            raise ValueError(f"{self.path} holds {'ranked' if self.ranked else 'pair'} logps but "
                             f"the batch is {'ranked' if batch.ranked is not None else 'not'}")
        if batch.ranked is not None:
            if with_tail_logps:
                raise ValueError("tail logps exist for pair batches only")
            items = batch.ranked.dataset_indices
            if items is None:
                raise ValueError("cached reference logps need the batch's dataset indices "
                                 "(use collate_batch)")
            flat = [k for i in items for k in range(self.offsets[i], self.offsets[i + 1])]
            if len(flat) != batch.num_sequences:
                raise ValueError(f"{self.path}: the cached items hold {len(flat)} completions, "
                                 f"the batch {batch.num_sequences}")
            logps = t["completion_logps"][torch.tensor(flat).to(idx.device)]
            return ReferenceLogps(SequenceLogps(logps, batch.completion_tokens, None), None)
        if batch.num_pairs:
            if not self.paired:
                raise ValueError(f"{self.path} holds unpaired logps but the batch is paired")
            logps = torch.cat([t["chosen_logps"][idx], t["rejected_logps"][idx]])
            tail = torch.cat([t["chosen_tail"][idx], t["rejected_tail"][idx]])
        else:
            if with_tail_logps:
                raise ValueError("tail logps exist for pair batches only")
            if self.paired:
                raise ValueError(f"{self.path} holds paired logps but the batch is unpaired")
            parts = [t["logps"][idx]]
            if batch.num_kl_sequences:
                if not batch.kl_from_dataset:
                    raise ValueError("cached KL logps use dataset-level KL partners; build the "
                                     "batch with collate_batch")
                parts.append(t["kl_logps"][idx])
            logps = torch.cat(parts)
        return ReferenceLogps(SequenceLogps(logps, batch.completion_tokens, None),
                              tail if with_tail_logps else None)

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """The cached tensors on ``device`` (copied there once; indexing then never syncs)."""
        if device not in self._copies:
            self._copies[device] = {k: v.to(device) for k, v in self.tensors.items()}
        return self._copies[device]


def precompute_reference_logps(reference: ModelReference, dataset: TokenizedDataset,
                               path: str | Path, *, pad_token_id: int, key: str | None = None,
                               pairs_per_batch: int | None = 8,
                               max_tokens_per_batch: int | None = None,
                               padding_free: bool = False, share_prompt: bool = False,
                               overwrite: bool = False) -> CachedReference:
    """Run ``reference`` once over ``dataset`` and store its logps at ``path`` (safetensors).

    An existing cache with the same key is reused as is (later epochs, restarts); one with a
    different key raises unless ``overwrite``. The write is atomic, and a file lock makes
    concurrent callers (several ranks) compute it once. ``key`` defaults to
    :func:`reference_cache_key` of the reference's model.
    """
    from filelock import FileLock

    if not isinstance(reference, ModelReference):
        raise TypeError("precompute_reference_logps needs a FrozenReference or "
                        f"AdapterDisabledReference, got {type(reference).__name__}")
    if len(dataset) == 0:
        raise ValueError("cannot precompute reference logps of an empty dataset")
    path = Path(path)
    if key is None:
        key = reference_cache_key(reference.weights_model(), dataset,
                                  temperature=reference.temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file() and not overwrite:
            cached = CachedReference(path, key=key)  # raises on a stale cache
            logger.info("reusing reference logps from %s", path)
            return cached
        n = len(dataset)
        layout = dict(pad_token_id=pad_token_id, pairs_per_batch=pairs_per_batch,
                      max_tokens_per_batch=max_tokens_per_batch, padding_free=padding_free,
                      share_prompt=share_prompt)
        if dataset.is_ranked:
            tensors = _ranked_logps(dataset, _reference_batches(reference, dataset, **layout))
            _save_atomic(tensors, {"format": CACHE_FORMAT, "key": key, "items": str(n),
                                   "values_sha256": values_checksum(tensors)}, path)
            return CachedReference(path, key=key)
        names = (("chosen", "rejected") if dataset.paired else ("", "kl_"))
        logps = {name: torch.zeros(n, dtype=torch.float32) for name in names}
        tails = {name: torch.zeros(n, dtype=torch.float32) for name in names}
        tokens = {name: torch.zeros(n, dtype=torch.long) for name in names}
        for indices, out in _reference_batches(reference, dataset, tails=dataset.paired,
                                               **layout):
            values, counts = out.sequence.logps.float().cpu(), out.sequence.num_tokens.cpu()
            idx = torch.tensor(indices)
            b = len(indices)
            for j, name in enumerate(names):
                part = slice(j * b, (j + 1) * b)
                logps[name][idx] = values[part]
                tokens[name][idx] = counts[part]
                if out.tail_logps is not None:
                    tails[name][idx] = out.tail_logps[part].float().cpu()
        if dataset.paired:
            tensors = {"chosen_logps": logps["chosen"], "rejected_logps": logps["rejected"],
                       "chosen_tokens": tokens["chosen"], "rejected_tokens": tokens["rejected"],
                       "chosen_tail": tails["chosen"], "rejected_tail": tails["rejected"]}
        else:
            tensors = {"logps": logps[""], "num_tokens": tokens[""],
                       "kl_logps": logps["kl_"], "kl_tokens": tokens["kl_"]}
        _save_atomic(tensors, {"format": CACHE_FORMAT, "key": key, "items": str(n),
                               "values_sha256": values_checksum(tensors)}, path)
        return CachedReference(path, key=key)


def _reference_batches(reference: ModelReference, dataset: TokenizedDataset, *,
                       pad_token_id: int, pairs_per_batch: int | None,
                       max_tokens_per_batch: int | None, padding_free: bool, share_prompt: bool,
                       tails: bool = False) -> Iterator[tuple[list[int], ReferenceLogps]]:
    """(dataset indices, the reference's results) of every batch of ``dataset`` in order, in
    the job's layout; progress logged every 50 batches."""
    batches = plan_batches(dataset, pairs_per_batch=pairs_per_batch,
                           max_tokens_per_batch=max_tokens_per_batch, shuffle=False,
                           padding_free=padding_free, share_prompt=share_prompt)
    for step, indices in enumerate(batches):
        batch = collate_batch(dataset, indices, pad_token_id=pad_token_id,
                              padding_free=padding_free, share_prompt=share_prompt)
        yield indices, reference.reference_logps(batch, with_tail_logps=tails)
        if step % 50 == 0:
            logger.info("reference logps: batch %d/%d", step + 1, len(batches))


def _ranked_logps(dataset: TokenizedDataset,
                  results: Iterator[tuple[list[int], ReferenceLogps]]) -> dict[str, Tensor]:
    """The reference's logps of every completion of a ranked dataset (item-major, with the
    items' offsets) from its batches' ``results`` (K-way rows when the job shares prompts)."""
    offsets = [0]
    for it in dataset.ranked:
        offsets.append(offsets[-1] + len(it.completions))
    logps = torch.zeros(offsets[-1], dtype=torch.float32)
    tokens = torch.zeros(offsets[-1], dtype=torch.long)
    for indices, out in results:
        flat = torch.tensor([k for i in indices for k in range(offsets[i], offsets[i + 1])])
        logps[flat] = out.sequence.logps.float().cpu()
        tokens[flat] = out.sequence.num_tokens.cpu()
    return {"completion_logps": logps, "completion_tokens": tokens,
            "offsets": torch.tensor(offsets, dtype=torch.long)}


class PrecomputedReference(ReferenceStrategy):
    """``reference.mode: precomputed``: the cached logps of the train set for training batches
    and of the held-out set (None when it is empty) for evaluation, picked by :meth:`use`."""

    def __init__(self, train: CachedReference, held_out: CachedReference | None) -> None:
        self.train, self.held_out = train, held_out
        self.active: CachedReference | None = train

    def use(self, split: str) -> None:
        super().use(split)
        self.active = self.train if split == "train" else self.held_out

    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        if self.active is None:
            raise ValueError("no reference logps were precomputed for an empty held-out set")
        return self.active.reference_logps(batch, with_tail_logps=with_tail_logps)
