"""Job set-up that depends on the config only: the datasets and the reference strategy.

- :func:`load_datasets`: the configured (or demo) data (files, folders, a weighted mixture),
  tokenized through the on-disk cache, split into train / held-out.
- :func:`build_reference`: ``none`` → no reference run; ``adapter_disabled`` → the LoRA policy
  with its adapter off; ``separate`` → a frozen copy (sharded by its own ZeRO-3 inference engine
  when the policy is under ZeRO-3, else replicated per rank, cast like the policy);
  ``precomputed`` → a frozen reference (or the adapter-disabled policy) runs once over the train
  and held-out sets, cached on disk by weights + data hash, and is then dropped. The cache's
  room is checked before the reference runs, and a failed write is one line
  (:class:`~.storage.StorageError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.assets import cache_root
from ..data.bad_rows import BadRowPolicy
from ..data.dataset import TokenizedDataset, split_train_eval, tokenize_pairs
from ..data.formats import record_kind
from ..data.sources import (
    DataSource,
    default_mixture_size,
    load_source,
    mixture_picks,
    take_mixture,
)
from ..data.token_cache import cached_tokenization, tokenization_key
from ..model.reference import (
    AdapterDisabledReference,
    FrozenReference,
    NoReference,
    ReferenceStrategy,
)
from ..model.reference_cache import (
    PrecomputedReference,
    precompute_reference_logps,
    reference_cache_key,
)
from .config import TrainConfig
from .config_base import ConfigError
from .runtime import Runtime
from .storage import check_room, storage_failure

logger = logging.getLogger(__name__)


def _tokenize(cfg: TrainConfig, source: DataSource, tokenizer: Any, *, local_rank: int,
              barrier: Callable[[], None]) -> TokenizedDataset:
    """``source`` tokenized, from the cache when it holds this data, tokenizer and settings:
    local rank 0 builds a missing entry while the node's other ranks wait at ``barrier``."""
    data = cfg.data
    kto = cfg.loss.method == "kto"

    def build() -> TokenizedDataset:
        records = load_source(source, bad_rows=BadRowPolicy(
            on_bad_row=data.on_bad_row, max_bad_fraction=data.max_bad_fraction))
        kind = record_kind(records[0])
        paired = kind == "paired"
        if kind == "unpaired" and not kto:
            raise ValueError(f"{source.setting} data {source.name} is unpaired "
                             "(prompt/completion/label): it needs loss.method 'kto', not "
                             f"{cfg.loss.method!r}")
        return tokenize_pairs(records, tokenizer, max_length=data.max_length,
                              max_prompt_length=data.max_prompt_length,
                              truncation_mode=data.truncation_mode, unpaired=kto and paired,
                              chat_template_kwargs=data.chat_template_kwargs,
                              progress=cfg.logging.progress != "none" and local_rank == 0)

    if not data.cache or data.on_bad_row == "skip":  # skipped rows are logged on every start
        dataset = build()
    else:
        settings = {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
                    "truncation_mode": data.truncation_mode, "kto": kto,
                    "chat_template_kwargs": data.chat_template_kwargs}
        root = Path(data.cache_dir).expanduser() if data.cache_dir else \
            cache_root() / "tokenized"
        entry = root / tokenization_key(source.content_hash(), tokenizer, settings)
        failure: BaseException | None = None
        dataset = None
        if local_rank == 0:
            try:
                dataset = cached_tokenization(entry, build)
            except BaseException as exc:  # the other ranks must still leave the barrier
                failure = exc
        barrier()
        if failure is not None:
            raise failure
        if dataset is None:  # rank 0 of this node wrote it (or failed, and so will this rank)
            dataset = cached_tokenization(entry, build)
        logger.info("%s: tokenized data %s (%s)", source.setting, entry,
                    "built" if local_rank == 0 else "read")
    if dataset.is_ranked:  # the pair rule travels with the dataset; items with no pair go
        try:
            cfg.ranked.check_loss(cfg.loss)
        except ConfigError as exc:
            raise ValueError(f"{source.setting} data {source.name} is ranked: {exc}") from None
        dataset = dataset.with_pair_rule(cfg.ranked.pairs, cfg.ranked.margin)
    dataset.stats.log(logger)
    return dataset


def _source(cfg: TrainConfig, paths: list[str], setting: str) -> DataSource:
    return DataSource(paths=tuple(paths), columns=cfg.data.columns, split=cfg.data.split,
                      setting=setting)


def _mixture(cfg: TrainConfig, parts: list[TokenizedDataset], eval_parts: list[TokenizedDataset]
             ) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The training mixture of ``parts`` (weights, size, seed from the config) and the
    concatenated held-out ``eval_parts`` (None when there are none)."""
    data = cfg.data
    assert data.mixture is not None
    weights = [entry.weight for entry in data.mixture]
    sizes = [len(part) for part in parts]
    size = data.mixture_size or default_mixture_size(sizes, weights)
    train = take_mixture(parts, mixture_picks(sizes, weights, size=size, seed=cfg.seed))
    counts = ", ".join(f"{e.paths()[0]}: {w / sum(weights):.1%} of {size}"
                       for e, w in zip(data.mixture, weights))
    logger.info("data.mixture: %d items (%s)", size, counts)
    held = [p for p in eval_parts if len(p)]
    held_out = take_mixture(held, [(s, i) for s, p in enumerate(held) for i in range(len(p))]) \
        if held else None
    return train, held_out


def load_datasets(cfg: TrainConfig, tokenizer: Any, *, runtime: Runtime | None = None
                  ) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(train, held-out) tokenized datasets; the held-out split is seeded by ``cfg.seed``.
    A mixture's held-out split is taken from each source before mixing (no held-out item is
    drawn into training); with several ranks (``runtime``) local rank 0 builds the
    tokenization cache's entries while the others wait."""
    data = cfg.data
    local_rank = runtime.local_rank if runtime is not None else 0
    barrier = runtime.barrier if runtime is not None else (lambda: None)

    def tokenize(source: DataSource) -> TokenizedDataset:
        return _tokenize(cfg, source, tokenizer, local_rank=local_rank, barrier=barrier)

    held_out: TokenizedDataset | None = None
    if data.eval is not None:
        held_out = tokenize(_source(cfg, data.eval_paths(), "data.eval"))
    if data.mixture is not None:
        parts, eval_parts = [], []
        for i, entry in enumerate(data.mixture):
            columns = data.columns if entry.columns is None else entry.columns
            source = DataSource(paths=tuple(entry.paths()), columns=columns,
                                split=entry.split or data.split, weight=entry.weight,
                                setting=f"data.mixture[{i}]")
            part = tokenize(source)
            if data.eval is None:
                part, held = split_train_eval(part, data.eval_fraction, seed=cfg.seed)
                eval_parts.append(held)
            parts.append(part)
        train, mixed_held_out = _mixture(cfg, parts, eval_parts)
        if held_out is None:
            held_out = mixed_held_out if mixed_held_out is not None else parts[0].subset([])
    else:
        if data.train is not None:
            paths = data.train_paths()
        else:
            from ..data.assets import demo_preference_data

            paths = [str(demo_preference_data(name=data.demo_name))]
        dataset = tokenize(_source(cfg, paths, "data.train"))
        if held_out is None:
            train, held_out = split_train_eval(dataset, data.eval_fraction, seed=cfg.seed)
        else:
            train = dataset
    if data.max_train_items is not None:
        train = train.subset(range(min(len(train), data.max_train_items)))
    if data.max_eval_items is not None:
        held_out = held_out.subset(range(min(len(held_out), data.max_eval_items)))
    logger.info("data: %d training items, %d held-out", len(train), len(held_out))
    return train, held_out


def _cast_like_policy(model: nn.Module, ds_config: dict[str, Any] | None) -> nn.Module:
    """A replicated reference gets the dtype DeepSpeed gives the policy."""
    if ds_config and ds_config.get("bf16", {}).get("enabled"):
        return model.to(torch.bfloat16)
    if ds_config and ds_config.get("fp16", {}).get("enabled"):
        return model.to(torch.float16)
    return model


def build_reference(cfg: TrainConfig, *, policy: nn.Module, base_path: str, dtype: torch.dtype,
                    runtime: Any, ds_config: dict[str, Any] | None,
                    datasets: tuple[TokenizedDataset, TokenizedDataset], pad_token_id: int
                    ) -> ReferenceStrategy:
    """The reference strategy of ``cfg.reference``; see the module docstring. A precomputed
    reference reads the train cache for training items and the held-out cache for evaluation
    (:class:`PrecomputedReference`)."""
    from .deepspeed_config import reference_deepspeed_config
    from .model_loading import load_reference

    mode = cfg.reference_mode()
    fused = cfg.model.use_fused_linear
    if mode == "none":
        return NoReference()
    if mode == "adapter_disabled":
        return AdapterDisabledReference(policy, use_fused_linear=fused)
    if mode == "separate":
        model = load_reference(cfg, base_path, dtype)
        zero3 = reference_deepspeed_config(ds_config) if ds_config else None
        if zero3 is not None:
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, config=zero3)
            model = engine.module
            model.eval()
            return FrozenReference(model, use_fused_linear=fused)
        model = _cast_like_policy(model, ds_config).to(runtime.device)
        device = cfg.reference.device
        return FrozenReference(model, device=device, use_fused_linear=fused)

    # precomputed: run once, cache, drop the model
    train, held_out = datasets
    if cfg.model.lora.enabled:
        reference = AdapterDisabledReference(policy.to(runtime.device), use_fused_linear=fused)
        weights = policy
    else:
        model = load_reference(cfg, base_path, dtype).to(runtime.device)
        reference = FrozenReference(model, use_fused_linear=fused)
        weights = model
    root = Path(cfg.reference.cache_dir or Path(cfg.logging.output_dir) / "reference_cache")
    opt, data = cfg.optimization, cfg.data
    settings = dict(pad_token_id=pad_token_id, padding_free=data.padding_free,
                    share_prompt=data.share_prompt,
                    pairs_per_batch=opt.pairs_per_batch(),
                    max_tokens_per_batch=opt.max_tokens_per_batch)
    caches = []
    for name, dataset in (("train", train), ("eval", held_out)):
        if len(dataset) == 0:
            caches.append(None)
            continue
        key = reference_cache_key(weights, dataset)
        path = root / f"{name}.safetensors"
        if not path.is_file():  # 6 values of 4-8 bytes per item, and the header
            check_room(root, 48 * len(dataset) + (1 << 16), what="reference.cache_dir",
                       hint="free space there or set reference.cache_dir to a larger disk")
        try:
            caches.append(precompute_reference_logps(reference, dataset, path, key=key,
                                                     **settings))
        except (OSError, RuntimeError) as exc:
            error = storage_failure(exc, folder=root, what=f"the reference cache {path.name}")
            if error is None:
                raise
            raise error from None
    del reference, weights
    return PrecomputedReference(*caches)
