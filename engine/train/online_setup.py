"""Setting up online training: the checks, the batch layout, the prompts, the scorer.

:func:`build_online` gives the trainer its :class:`~.online_source.OnlineSource` and its
held-out :class:`~.online_eval.OnlineEvaluation`. With ``data.layout: auto`` generated pairs use
shared-prompt rows (``[prompt | chosen | rejected]``, the prompt run once: it is shared by
construction) when the attention implementation allows them, else padded rows; an explicit
layout is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..online.config import online_problems
from ..online.prompts import load_prompts
from ..online.scorers import build_scorer
from .config import ConfigError, TrainConfig
from .layout import LAYOUTS, candidate_layouts
from .online_eval import OnlineEvaluation
from .online_source import OnlineSource

logger = logging.getLogger(__name__)


def online_layout(cfg: TrainConfig) -> str:
    """Resolve ``cfg.data.layout`` in place for generated pairs and return it."""
    data = cfg.data
    if data.layout == "auto":
        candidates = candidate_layouts(data, paired=True,
                                       attn_implementation=cfg.model.attn_implementation)
        if not candidates:
            raise ConfigError(f"no batch layout fits data.padding_free={data.padding_free}, "
                              f"data.share_prompt={data.share_prompt} and "
                              f"model.attn_implementation {cfg.model.attn_implementation!r}")
        data.layout = "shared" if "shared" in candidates else candidates[0]
        logger.info("data.layout auto → %s for generated pairs", data.layout)
    data.padding_free, data.share_prompt = LAYOUTS[data.layout]
    return data.layout


def host_agreement(runtime: Any) -> Callable[[bool], bool]:
    """``agree(flag)``: True when ``flag`` is True on every rank (a host all-reduce over gloo;
    in one process, ``flag`` itself)."""
    if runtime.world_size == 1:
        return bool
    group = None
    if torch.distributed.get_backend() != "gloo":
        group = torch.distributed.new_group(backend="gloo")

    def agree(flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
        return bool(value[0] > 0)

    return agree


def build_online(cfg: TrainConfig, tokenizer: Any, *, runtime: Any,
                 policy: Callable[[], nn.Module]) -> tuple[OnlineSource, OnlineEvaluation]:
    """The online batch source and evaluation of ``cfg`` (``cfg.online`` set); a setting that
    online training cannot use is a :class:`ConfigError` naming its keys."""
    on = cfg.online
    if on is None:
        raise ValueError("build_online needs the config's online section")
    problems = online_problems(on, loss_method=cfg.loss.method,
                               reference_mode=cfg.reference_mode(),
                               max_tokens_per_batch=cfg.optimization.max_tokens_per_batch)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    for key, path in (("online.prompts", on.prompts), ("online.eval_prompts", on.eval_prompts)):
        if path and not Path(path).expanduser().exists():
            raise ConfigError(f"{key}: prompts file {path} does not exist")
    online_layout(cfg)
    prompts = load_prompts(on.prompts)
    eval_prompts = load_prompts(on.eval_prompts) if on.eval_prompts else []
    spec = on.scorer.spec()
    if on.scorer.kind != "function" and on.scorer.device is None:
        spec["device"] = str(runtime.device)  # a model scorer runs beside the policy
    scorer = build_scorer(spec)
    source = OnlineSource(cfg, tokenizer, prompts, scorer, runtime=runtime, policy=policy,
                          agree=host_agreement(runtime))
    logger.info("online: %d prompts (%d held out), %d samples each, %s pairs, scorer %s",
                len(prompts), len(eval_prompts), on.samples_per_prompt, on.pair_rule, scorer)
    return source, OnlineEvaluation(eval_prompts, source)
