"""Batch layouts and ``data.layout: auto``: the cheapest valid layout for the job's data.

Layouts (``data.layout``; the flags are ``(padding_free, share_prompt)``):

- ``padded``: one row per sequence, right padding;
- ``packed``: every sequence of a micro-batch in one row (``data.padding_free``);
- ``shared``: one ``[prompt | chosen | rejected]`` row per pair, the prompt run once
  (``data.share_prompt``; pairs only, not KTO; SDPA or eager attention) — for ranked data one
  K-way row ``[prompt | c₁ | … | c_K]`` per item;
- ``shared_packed``: those segments packed into one row.

Ranked data is never expanded into pairs: the padded and packed layouts hold one sequence per
completion, and the estimate costs exactly that.

``auto`` estimates the decoder's cost of one epoch in each valid layout from the items' lengths
(the micro-batches ``plan_batches`` would form) and picks the cheapest. The estimate is
:mod:`fastpo.engine.data.attention_cost`'s, the one the model's segment attention uses to run each
batch piece by piece or with a dense mask: tokens through the projections and MLP (padding
included), the query-key pairs the attention kernel computes, and a fixed cost per attention call.
``data.padding_free`` / ``data.share_prompt``, when set, fix that dimension of the choice (an
explicit choice wins); an explicit ``data.layout`` takes no estimate at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..data.attention_cost import BatchCost, DeviceCosts, ModelDims, device_costs, layout_cost
from ..data.batch import kl_partner, plan_batches
from ..data.dataset import TokenizedDataset
from ..data.segments import packed_plan, shared_prompt_plan

logger = logging.getLogger(__name__)

LAYOUTS = {"padded": (False, False), "packed": (True, False), "shared": (False, True),
           "shared_packed": (True, True)}
SHARED_ATTENTION = ("sdpa", "eager")  # a custom 4-D mask, or segment attention (sdpa)


def layout_name(padding_free: bool, share_prompt: bool) -> str:
    return next(n for n, f in LAYOUTS.items() if f == (bool(padding_free), bool(share_prompt)))


def valid_layouts(*, paired: bool, attn_implementation: str | None) -> list[str]:
    """The layouts a loss (paired or not, e.g. KTO) and an attention implementation support."""
    shared_ok = paired and (attn_implementation or "eager") in SHARED_ATTENTION
    return [n for n, (_, shared) in LAYOUTS.items() if shared_ok or not shared]


@dataclass(frozen=True)
class LayoutCost:
    """One layout's estimate over an epoch: tokens computed (padding included), query-key pairs
    the attention computes, attention calls per layer, and their FLOP-equivalent total per
    layer."""

    layout: str
    tokens: int
    pairs: int
    calls: int
    cost: float


def _sequences(dataset: TokenizedDataset, i: int, with_kl: bool) -> list[int]:
    """The (prompt + completion) lengths of item ``i``'s sequences (concatenated layouts)."""
    if dataset.is_ranked:  # one sequence per completion, however many pairs it is in
        it = dataset.ranked[i]
        return [len(it.prompt_ids) + len(c) for c in it.completions]
    if dataset.paired:
        p = dataset.pairs[i]
        return [len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)]
    e = dataset.examples[i]
    out = [len(e.prompt_ids) + len(e.completion_ids)]
    if with_kl:
        partner = dataset.examples[kl_partner(i, len(dataset))]
        out.append(len(e.prompt_ids) + len(partner.completion_ids))
    return out


def _shared_shape(dataset: TokenizedDataset, i: int) -> tuple[int, ...]:
    """(prompt, completion₁, …) lengths of item ``i`` as one shared-prompt row."""
    if dataset.is_ranked:
        it = dataset.ranked[i]
        return (len(it.prompt_ids), *(len(c) for c in it.completions))
    p = dataset.pairs[i]
    return (len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))


def batch_cost(dataset: TokenizedDataset, indices: Sequence[int], layout: str, *,
               with_kl: bool, attention: str, dims: ModelDims | None = None,
               device: DeviceCosts | None = None) -> BatchCost:
    """One micro-batch in ``layout``: :func:`~fastpo.engine.data.attention_cost.layout_cost`.

    ``attention``: ``segments`` (packed and shared-prompt rows piece by piece or with a dense
    mask, whichever is cheaper), ``varlen`` (flash-attention: packed rows in one call over the
    sequences) or ``dense`` (4-D masks); ``device``: the CPU's costs (one thread) unless given."""
    packed, shared = LAYOUTS[layout]
    dims, device = dims or ModelDims(), device or device_costs("cpu")
    plan = None
    if shared:  # [prompt | chosen | rejected] rows, or K-way rows of ranked items
        shapes = [_shared_shape(dataset, i) for i in indices]
        lengths = [sum(shape) for shape in shapes]
        rows, width = (1, sum(lengths)) if packed else (len(lengths), max(lengths))
        plan = shared_prompt_plan([shapes] if packed else [[s] for s in shapes], width)
    else:
        lengths = [n for i in indices for n in _sequences(dataset, i, with_kl)]
        rows, width = (1, sum(lengths)) if packed else (len(lengths), max(lengths))
        if packed:
            plan = packed_plan(lengths, width)
    return layout_cost(plan=plan, rows=rows, width=width, dims=dims, attention=attention,
                       device=device)


def estimate(dataset: TokenizedDataset, layout: str, *, dims: ModelDims,
             pairs_per_batch: int | None, max_tokens_per_batch: int | None, with_kl: bool,
             attention: str, device_type: str = "cpu", threads: int = 1, seed: int = 0
             ) -> LayoutCost:
    """The per-layer cost of one epoch (epoch 0's batches) in ``layout``; ``attention`` as in
    :func:`batch_cost`, on ``device_type`` with ``threads`` CPU threads."""
    packed, shared = LAYOUTS[layout]
    device = device_costs(device_type, threads)
    batches = plan_batches(dataset, pairs_per_batch=pairs_per_batch,
                           max_tokens_per_batch=max_tokens_per_batch, seed=seed,
                           padding_free=packed, share_prompt=shared, with_kl=with_kl)
    tokens = calls = 0
    pairs = cost = 0.0
    for indices in batches:
        b = batch_cost(dataset, indices, layout, with_kl=with_kl, attention=attention, dims=dims,
                       device=device)
        tokens, pairs, calls, cost = (tokens + b.tokens, pairs + b.pairs, calls + b.calls,
                                      cost + b.flops)
    return LayoutCost(layout, tokens, int(pairs), calls, cost)


def choose_layout(dataset: TokenizedDataset, candidates: Sequence[str], **kwargs: Any
                  ) -> tuple[str, list[LayoutCost]]:
    """The cheapest of ``candidates`` (ties: the earlier one) and every estimate."""
    if not candidates:
        raise ValueError("no layout to choose from")
    costs = [estimate(dataset, name, **kwargs) for name in candidates]
    best = min(costs, key=lambda c: c.cost)
    return best.layout, costs


def candidate_layouts(data: Any, *, paired: bool, attn_implementation: str | None) -> list[str]:
    """The layouts ``data.layout: auto`` may pick: valid ones, restricted by ``padding_free`` and
    ``share_prompt`` where those are set."""
    out = []
    for name in valid_layouts(paired=paired, attn_implementation=attn_implementation):
        packed, shared = LAYOUTS[name]
        if data.padding_free is not None and data.padding_free != packed:
            continue
        if data.share_prompt is not None and data.share_prompt != shared:
            continue
        out.append(name)
    return out


def describe(choice: str, costs: Sequence[LayoutCost]) -> str:
    """One line: the choice and each candidate's estimate relative to the first (padded)."""
    base = costs[0]
    parts = [f"{c.layout} {c.cost / base.cost:.2f}× (tokens computed {c.tokens}, attention pairs "
             f"{c.pairs:.3g})" for c in costs]
    return f"data.layout auto → {choice}; estimated decoder cost per epoch: " + ", ".join(parts)


def _model_config(path: str | None) -> Any:
    """The model folder's ``config.json`` as attributes (a JSON read), or None without one."""
    if path is None:
        return None
    try:
        values = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SimpleNamespace(**values) if isinstance(values, dict) else None


def resolve_layout(cfg: Any, dataset: TokenizedDataset, *, model_config: Any = None,
                   model_path: str | None = None, device_type: str = "cpu",
                   with_kl: bool = True) -> str:
    """Resolve ``cfg.data.layout`` in place (``layout``, ``padding_free``, ``share_prompt`` set
    to the choice) and return it; ``auto`` is estimated on ``dataset`` (with the dimensions of
    ``model_config``, else of the config at ``model_path``, else SmolLM2-135M's) and logged."""
    data = cfg.data
    if data.layout != "auto":
        packed, shared = LAYOUTS[data.layout]
        data.padding_free, data.share_prompt = packed, shared
        return data.layout
    attn = cfg.model.attn_implementation
    candidates = candidate_layouts(data, paired=dataset.paired, attn_implementation=attn)
    if not candidates:  # the config check refuses these; a dataset of the other kind lands here
        raise ValueError(f"no batch layout fits data.padding_free={data.padding_free}, "
                         f"data.share_prompt={data.share_prompt} with "
                         f"{'paired' if dataset.paired else 'unpaired'} data and "
                         f"model.attn_implementation {attn!r}")
    if len(candidates) == 1:
        choice = candidates[0]
    else:
        from ..model.attention import enabled as segments_enabled

        attention = ("segments" if attn == "sdpa" and segments_enabled()
                     else "varlen" if "flash" in (attn or "") else "dense")
        opt = cfg.optimization
        choice, costs = choose_layout(
            dataset, candidates, dims=ModelDims.of(model_config or _model_config(model_path)),
            pairs_per_batch=opt.pairs_per_batch(), max_tokens_per_batch=opt.max_tokens_per_batch,
            with_kl=with_kl, attention=attention, device_type=device_type,
            threads=torch.get_num_threads(), seed=cfg.seed)
        logger.info(describe(choice, costs))
    data.layout = choice
    data.padding_free, data.share_prompt = LAYOUTS[choice]
    return choice
