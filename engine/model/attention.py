"""Segment attention: packed and shared-prompt rows pay for the attention they use, not L².

A packed row holds several sequences and a shared-prompt row holds ``[prompt | chosen |
rejected]``; as a dense ``[L, L]`` mask through SDPA, every excluded block is still computed, so
attention costs the square of the whole row. Here the row is cut into its pieces (on the host, at
collate time: :class:`~fastpo.engine.data.segments.SegmentPlan`) and SDPA runs once per piece:

- a sequence of ``n`` tokens (packed rows) or a ``[prompt | chosen]`` run: causal self-attention
  over its own tokens;
- the rejected completion of a shared-prompt pair, or completion ``k ≥ 2`` of a K-way row
  ``[prompt | c₁ | … | c_K]`` (``r`` tokens after the ``[prompt | c₁]`` run whose first ``p``
  tokens are the prompt, and the branches between): queries over the keys ``[prompt | c_k]``, the
  prompt fully visible and the completion causal;
- padding: no attention (its output is zero and never scored).

A call has a fixed cost, and a piece's call on CPU splits only its heads over the threads, so
where the pieces are few and short one dense-masked call over the whole rows costs less. Each
batch is run the cheaper way by the estimate of :mod:`fastpo.engine.data.attention_cost` (the
one ``data.layout: auto`` uses), decided once per batch on the host from the plan's lengths and
kept in the plan with the dense mask, for every layer and the reference forward. Either way each
query sees exactly the keys of the dense mask, so the result equals the dense-mask attention up to
float summation order (a padding query of the dense call sees only itself, and its output is set
to 0 as piece by piece). The pieces are cut with ``unbind``/``split`` and joined with ``cat``
(whose backwards are one ``stack``/``cat`` each), so the backward allocates nothing per piece
beyond the piece itself.

The model reaches this code through transformers' attention interface: :func:`install` wraps the
registered ``sdpa`` function once, and the wrapper runs the plan when the forward passes one
(keyword ``fastpo_segments``, forwarded by the decoder layers to their attention) and is plain
SDPA otherwise, so other models and other batches are untouched, and a gradient-checkpointed
layer recomputes with the same plan. A forward with a plan passes a placeholder 4-D mask that
hides every key (transformers returns a 4-D mask as it is, so no dense mask is built there);
attention that does not run the plan (a model that bypasses the interface) would give NaN, and
:func:`check_ran` turns that into an error after the forward. FlexAttention is no alternative on
CPU (torch 2.13 has no FlexAttention backward there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..data.attention_cost import AttentionMode, choose_attention
from ..data.segments import BRANCH, CAUSAL, PAD, SegmentPlan

PLAN_KWARG = "fastpo_segments"

_state = threading.local()


# ------------------------------------------------------------------------------ the kernel
def _branch_mask(prompt: int, length: int, device: torch.device) -> Tensor:
    """``[length, prompt + length]``: every prompt key, then causal over the branch's keys."""
    col = torch.arange(prompt + length, device=device)
    row = torch.arange(length, device=device)
    return (col[None, :] < prompt) | (col[None, :] - prompt <= row[:, None])


def dense_mask(plan: SegmentPlan, device: torch.device) -> Tensor:
    """``[R, 1, L, L]`` bool: the keys each query of the plan sees (a padding query: itself)."""
    own, extra_start, extra_stop = [], [], []  # per piece, repeated over its tokens below
    lengths = []
    for pieces in plan.rows:
        start = source = 0  # source: the start of the last causal piece (a branch's prompt)
        for p in pieces:
            own.append(start if p.kind != PAD else -1)
            extra_start.append(source if p.kind == BRANCH else 0)
            extra_stop.append(source + p.prompt if p.kind == BRANCH else 0)
            lengths.append(p.length)
            if p.kind == CAUSAL:
                source = start
            start += p.length
    n = torch.tensor(lengths, device=device)
    rows, width = len(plan.rows), plan.width

    def per_token(values: list[int]) -> Tensor:
        return torch.tensor(values, device=device).repeat_interleave(n).view(rows, width, 1)

    q = torch.arange(width, device=device).view(1, width, 1)
    k = torch.arange(width, device=device).view(1, 1, width)
    start = per_token(own)
    start = torch.where(start < 0, q, start)  # padding: only itself
    mask = (k >= start) & (k <= q)
    mask |= (k >= per_token(extra_start)) & (k < per_token(extra_stop))
    return mask[:, None]


def _real_tokens(plan: SegmentPlan, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[R, L, 1, 1]``: 1 at the plan's tokens, 0 at its padding."""
    keep = [float(p.kind != PAD) for row in plan.rows for p in row]
    lengths = torch.tensor([p.length for row in plan.rows for p in row], device=device)
    return torch.tensor(keep, device=device, dtype=dtype).repeat_interleave(lengths).view(
        len(plan.rows), plan.width, 1, 1)


def attention_mode(plan: SegmentPlan, query: Tensor) -> AttentionMode:
    """How ``plan`` runs (pieces or one dense-masked call): forced by :func:`forced_mode`, else
    the cost estimate's choice, made at the first layer and kept in the plan."""
    forced = getattr(_state, "mode", None)
    if forced is not None:
        return forced
    mode = plan.cache.get("mode")
    if mode is None:
        mode = plan.cache["mode"] = choose_attention(
            plan, heads=query.shape[1], head_dim=query.shape[-1],
            device_type=query.device.type, threads=torch.get_num_threads())
    return mode


def segment_attention(query: Tensor, key: Tensor, value: Tensor, plan: SegmentPlan, *,
                      scale: float | None = None, dropout: float = 0.0,
                      mode: AttentionMode | None = None) -> Tensor:
    """Attention of ``query`` ``[R, H, L, D]`` over ``key``/``value`` ``[R, Hkv, L, D]`` (``H`` a
    multiple of ``Hkv``) as the plan says; returns ``[R, L, H, D]`` (transformers' layout).
    ``mode``: ``pieces`` (one call per piece), ``dense`` (one masked call) or None (the plan's
    :func:`attention_mode`)."""
    rows, heads, width, dim = query.shape
    if rows != len(plan.rows) or width != plan.width:
        raise ValueError(f"segment attention: a [{rows}, {width}] batch for a plan of "
                         f"[{len(plan.rows)}, {plan.width}]")
    if key.shape[1] == 0 or heads % key.shape[1]:
        raise ValueError(f"segment attention: {heads} query heads for {key.shape[1]} key heads")
    gqa = key.shape[1] != heads
    if (mode or attention_mode(plan, query)) == "dense":
        mask = plan.cache.get("dense_mask")
        if mask is None or mask.device != query.device:
            mask = plan.cache["dense_mask"] = dense_mask(plan, query.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
            enable_gqa=gqa).transpose(1, 2)
        if not any(p.kind == PAD for row in plan.rows for p in row):
            return out.contiguous()
        keep = plan.cache.get("keep")
        if keep is None or keep.device != query.device or keep.dtype != out.dtype:
            keep = plan.cache["keep"] = _real_tokens(plan, query.device, out.dtype)
        return out * keep  # padding 0, as piece by piece (one pass: the contiguous copy)
    masks: dict[tuple[int, int], Tensor] = {}
    out_rows = []
    for q_row, k_row, v_row, pieces in zip(query.unbind(0), key.unbind(0), value.unbind(0),
                                           plan.rows):
        sizes = [p.length for p in pieces]
        qs, ks, vs = (t.split(sizes, dim=1) for t in (q_row, k_row, v_row))
        outs = []
        source = -1  # the last causal piece: the prompt of the branches after it
        for i, p in enumerate(pieces):
            if p.kind == CAUSAL:
                source = i
            if p.kind == PAD:
                outs.append(query.new_zeros(p.length, heads, dim))
                continue
            q, k, v = qs[i][None], ks[i][None], vs[i][None]
            mask, causal = None, True
            if p.kind == BRANCH:
                k = torch.cat([ks[source][None, :, : p.prompt], k], dim=2)
                v = torch.cat([vs[source][None, :, : p.prompt], v], dim=2)
                mask = masks.get((p.prompt, p.length))
                if mask is None:
                    mask = masks[(p.prompt, p.length)] = _branch_mask(p.prompt, p.length,
                                                                      query.device)
                causal = False
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=scale,
                enable_gqa=gqa)
            outs.append(o[0].transpose(0, 1))  # [n, H, D]
        out_rows.append(torch.cat(outs, dim=0))
    return torch.stack(out_rows)


# --------------------------------------------------------------- transformers registration
_WRAPPED: dict[str, Any] = {}


def _attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return _WRAPPED["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, **kwargs)
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"segment attention: the model's attention uses {name!r}, which "
                             "packed / shared-prompt rows do not support; load it with "
                             "attn_implementation='eager'")
    plan.calls += 1
    out = segment_attention(query, key, value, plan, scale=scaling,
                            dropout=dropout if module.training else 0.0)
    return out, None


def install() -> None:
    """Wrap transformers' registered ``sdpa`` attention once (idempotent, process-wide)."""
    if "sdpa" in _WRAPPED:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _WRAPPED["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS.register("sdpa", _attention_forward)


def enabled() -> bool:
    """Whether segment attention is used where it applies (see :func:`dense_attention`)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def forced_mode(mode: AttentionMode | None) -> Iterator[None]:
    """Within the block, segment attention runs every plan as ``mode`` (``pieces`` or
    ``dense``; None: the estimate's choice), e.g. to compare the two."""
    if mode not in (None, "pieces", "dense"):
        raise ValueError(f"segment attention mode must be 'pieces', 'dense' or None, got {mode!r}")
    before = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = before


@contextlib.contextmanager
def dense_attention() -> Iterator[None]:
    """Within the block, packed and shared-prompt rows use transformers' dense 4-D masks (the
    fallback when segment attention does not apply)."""
    before = enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = before


def applies(model_config: object, plan: SegmentPlan | None, max_seqlen: int) -> bool:
    """Whether a forward of a model with ``model_config`` runs ``plan`` as segment attention:
    SDPA models without a sliding window shorter than the longest segment."""
    if plan is None or not enabled():
        return False
    if getattr(model_config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(model_config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < max_seqlen:
        return False
    for name in ("layer_types", "attn_logit_softcapping"):  # mixed layers, soft-capped scores
        if getattr(model_config, name, None) not in (None, [], ()):
            if name == "layer_types" and all(t == "full_attention"
                                             for t in model_config.layer_types):
                continue
            return False
    return True


def forward_kwargs(plan: SegmentPlan, rows: int, device: torch.device) -> dict[str, Any]:
    """The decoder kwargs of a segment-attention forward: the plan and a placeholder mask (a
    4-D mask that hides every key, an expanded scalar: no memory)."""
    install()
    plan.calls = 0
    placeholder = torch.zeros((), dtype=torch.bool, device=device).expand(
        rows, 1, plan.width, plan.width)
    return {"attention_mask": placeholder, PLAN_KWARG: plan}


def check_ran(plan: SegmentPlan, model: nn.Module) -> None:
    """Raise when the forward did not run the plan (a host counter: no device sync)."""
    if plan.calls == 0 and plan.num_pieces:
        raise RuntimeError(f"{type(model).__name__}'s attention does not dispatch through "
                           "transformers' attention interface, so packed / shared-prompt rows "
                           "cannot skip their masked blocks; load the model with "
                           "attn_implementation='eager' or use padded rows "
                           "(data.layout: padded)")
