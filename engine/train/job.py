"""Job set-up that depends on the config only: the datasets and the reference strategy.

- :func:`load_datasets`: the configured (or demo) data, tokenized, split into train / held-out.
- :func:`build_reference`: ``none`` → no reference run; ``adapter_disabled`` → the LoRA policy
  with its adapter off; ``separate`` → a frozen copy (sharded by its own ZeRO-3 inference engine
  when the policy is under ZeRO-3, else replicated per rank, cast like the policy);
  ``precomputed`` → a frozen reference (or the adapter-disabled policy) runs once over the train
  and held-out sets, cached on disk by weights + data hash, and is then dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.dataset import (
    TokenizedDataset,
    load_preference_records,
    split_train_eval,
    tokenize_pairs,
)
from ..data.formats import record_kind
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

logger = logging.getLogger(__name__)


def _tokenize(cfg: TrainConfig, source: Any, tokenizer: Any, what: str) -> TokenizedDataset:
    records = load_preference_records(source)
    kind = record_kind(records[0])
    paired = kind == "paired"
    kto = cfg.loss.method == "kto"
    if kind == "unpaired" and not kto:
        raise ValueError(f"{what} data {source} is unpaired (prompt/completion/label): it needs "
                         f"loss.method 'kto', not {cfg.loss.method!r}")
    if kind == "ranked":
        try:
            cfg.ranked.check_loss(cfg.loss)
        except ConfigError as exc:
            raise ValueError(f"{what} data {source} is ranked: {exc}") from None
    data = cfg.data
    dataset = tokenize_pairs(records, tokenizer, max_length=data.max_length,
                             max_prompt_length=data.max_prompt_length,
                             truncation_mode=data.truncation_mode, unpaired=kto and paired)
    if kind == "ranked":  # the pair rule travels with the dataset; items with no pair go
        dataset = dataset.with_pair_rule(cfg.ranked.pairs, cfg.ranked.margin)
    dataset.stats.log(logger)
    if len(dataset) == 0:
        raise ValueError(f"{what} data {source}: no usable item after tokenization "
                         f"({dataset.stats.summary()})")
    return dataset


def load_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(train, held-out) tokenized datasets; the held-out split is seeded by ``cfg.seed``."""
    data = cfg.data
    if data.train is not None:
        source: Any = data.train
    else:
        from ..data.assets import demo_preference_data

        source = demo_preference_data(name=data.demo_name)
    dataset = _tokenize(cfg, source, tokenizer, "training")
    if data.eval is not None:
        train, held_out = dataset, _tokenize(cfg, data.eval, tokenizer, "held-out")
    else:
        train, held_out = split_train_eval(dataset, data.eval_fraction, seed=cfg.seed)
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
        caches.append(precompute_reference_logps(reference, dataset, root / f"{name}.safetensors",
                                                 key=key, **settings))
    del reference, weights
    return PrecomputedReference(*caches)
