"""What attention and a batch layout cost: one estimate for the two choices that depend on it.

- Per batch, the model's segment attention (:mod:`fastpo.engine.model.attention`) runs a packed
  or shared-prompt row either as one SDPA call per piece or as one SDPA call over the whole rows
  with a dense mask: :func:`choose_attention`.
- Per job, ``data.layout: auto`` (:mod:`fastpo.engine.train.layout`) picks padded, packed or
  shared-prompt rows: :func:`layout_cost` of each layout's micro-batches.

The unit is a FLOP-equivalent of one layer's forward. A token costs ``2·P`` FLOPs through the
projections and MLP (``P`` the layer's matmul parameters; padding included, it is computed). An
attention call costs ``4·H·D`` FLOPs per query-key pair the kernel computes, plus a fixed part
(dispatch, the threads' fork and join) and, for per-piece calls, the cutting and joining of the
pieces (per token and head-dim element). What the kernels compute (torch 2.13):

- CPU (SDPA's flash kernel for CPU): a causal call costs its whole square, not half of it (the
  backward, about 3/4 of the time, skips no block), and a mask costs nothing extra; the backward
  parallelises over batch × heads only, so a one-piece call with ``H`` heads on ``T`` threads
  idles ``⌈H/T⌉·T/H − 1`` of its backward. Fixed and joining costs: fitted to per-piece and
  dense-mask SDPA forward + backward at SmolLM2-135M's 9 × 64 heads on a 2-core Intel VM (the
  estimate puts the dense-or-pieces crossover of ``[p | c | r]`` rows with ``p = c = r`` at about
  190 tokens a row; measured 190–290).
- CUDA (flash / memory-efficient kernels): a causal call skips the blocks above the diagonal;
  a masked call computes every block. The fixed cost of a call (kernel launches) is not measured
  here: 256 tokens' worth of SmolLM2-135M matmul work.

``varlen`` attention (flash-attention's packed-sequence kernel) runs a packed row's pieces in one
call, each causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from .segments import BRANCH, CAUSAL, PAD, SegmentPlan

AttentionMode = Literal["pieces", "dense"]
BACKWARD_SHARE = 0.75  # of an SDPA call's forward + backward time, on CPU


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs of the model (defaults: SmolLM2-135M)."""

    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64

    @classmethod
    def of(cls, config: Any) -> ModelDims:
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            return cls()
        heads = getattr(config, "num_attention_heads", None) or 1
        return cls(hidden=hidden,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads)

    def flops_per_token(self) -> float:
        """Forward matmul FLOPs of one token through one layer (q, k, v, o and a gated MLP)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return 2.0 * (attn + 3 * self.hidden * self.intermediate)

    def flops_per_pair(self) -> float:
        """Forward FLOPs of one query-key pair over every head (``QKᵀ`` and ``PV``)."""
        return 4.0 * self.heads * self.head_dim


@dataclass(frozen=True)
class DeviceCosts:
    """How a device's SDPA kernels spend their time (see the module docstring)."""

    skips_causal_blocks: bool
    call_flops: float  # fixed cost of one call
    join_flops: float  # per token × head-dim element cut out and joined back (per-piece calls)
    threads: int = 1  # CPU threads (the backward's load balance)


CPU_CALL_FLOPS = 7.0e6
CPU_JOIN_FLOPS = 120.0
CUDA_CALL_FLOPS = 256 * ModelDims().flops_per_token()


def device_costs(device_type: str, threads: int = 1) -> DeviceCosts:
    """The costs of ``device_type`` ("cpu", "cuda", ...); anything but CPU is costed as CUDA."""
    if device_type == "cpu":
        return DeviceCosts(False, CPU_CALL_FLOPS, CPU_JOIN_FLOPS, max(1, threads))
    return DeviceCosts(True, CUDA_CALL_FLOPS, 0.0)


@dataclass(frozen=True)
class Call:
    """One SDPA call: ``batch`` rows of ``queries`` × ``keys``; ``causal_tail``: the last
    ``causal_tail`` keys are causal over the queries (a kernel that skips blocks skips their upper
    triangle); ``masked``: an explicit mask (no block skipped)."""

    batch: int
    queries: int
    keys: int
    causal_tail: int = 0
    masked: bool = False


def piece_calls(plan: SegmentPlan) -> list[Call]:
    """The plan as one call per piece: a CAUSAL piece of ``n`` over its ``n`` keys, a BRANCH
    piece of ``r`` over ``prompt + r`` (prompt visible, its own keys causal; a mask)."""
    calls = []
    for row in plan.rows:
        for p in row:
            if p.kind == CAUSAL:
                calls.append(Call(1, p.length, p.length, p.length))
            elif p.kind == BRANCH:
                calls.append(Call(1, p.length, p.prompt + p.length, p.length, masked=True))
    return calls


def dense_calls(plan: SegmentPlan) -> list[Call]:
    """The plan as one masked call over its whole rows."""
    return [Call(len(plan.rows), plan.width, plan.width, masked=True)]


def padded_calls(rows: int, width: int) -> list[Call]:
    """Padded rows: one call with a padding mask (causal over each row)."""
    return [Call(rows, width, width, width, masked=True)]


def computed_pairs(call: Call, device: DeviceCosts) -> float:
    """Query-key pairs the kernel computes for ``call`` (per batch row × rows)."""
    pairs = call.queries * call.keys
    if device.skips_causal_blocks and not call.masked and call.causal_tail:
        n = call.causal_tail
        pairs -= n * (n - 1) / 2
    return call.batch * pairs


def _load_balance(call: Call, heads: int, device: DeviceCosts) -> float:
    """Time over ideal of a call whose backward splits ``batch × heads`` over the threads."""
    if device.skips_causal_blocks or device.threads <= 1:
        return 1.0
    items = call.batch * heads
    idle = math.ceil(items / device.threads) * device.threads / items
    return 1.0 - BACKWARD_SHARE + BACKWARD_SHARE * idle


def calls_flops(calls: list[Call], *, heads: int, head_dim: int, device: DeviceCosts,
                joined_tokens: int = 0) -> float:
    """The FLOP-equivalent cost of ``calls``, plus ``joined_tokens`` cut out and joined back."""
    per_pair = 4.0 * heads * head_dim
    total = joined_tokens * heads * head_dim * device.join_flops
    for call in calls:
        total += device.call_flops + per_pair * computed_pairs(call, device) * _load_balance(
            call, heads, device)
    return total


def mode_flops(plan: SegmentPlan, mode: AttentionMode, *, heads: int, head_dim: int,
               device: DeviceCosts) -> float:
    """The cost of running ``plan`` as ``pieces`` or ``dense``."""
    if mode == "dense":
        return calls_flops(dense_calls(plan), heads=heads, head_dim=head_dim, device=device)
    joined = sum(p.length for row in plan.rows for p in row if p.kind != PAD)
    return calls_flops(piece_calls(plan), heads=heads, head_dim=head_dim, device=device,
                       joined_tokens=joined)


def choose_attention(plan: SegmentPlan, *, heads: int, head_dim: int, device_type: str,
                     threads: int = 1) -> AttentionMode:
    """The cheaper way to run ``plan`` on ``device_type`` with ``threads`` CPU threads: one call
    per piece, or one dense-masked call (ties: pieces)."""
    return _cheaper(plan, heads, head_dim, device_costs(device_type, threads))


def _cheaper(plan: SegmentPlan, heads: int, head_dim: int, device: DeviceCosts
             ) -> AttentionMode:
    pieces = mode_flops(plan, "pieces", heads=heads, head_dim=head_dim, device=device)
    dense = mode_flops(plan, "dense", heads=heads, head_dim=head_dim, device=device)
    return "dense" if dense < pieces else "pieces"


@dataclass(frozen=True)
class BatchCost:
    """One micro-batch in one layout: tokens computed (padding included), query-key pairs the
    attention computes, attention calls, and the per-layer FLOP-equivalent total."""

    tokens: int
    pairs: float
    calls: int
    flops: float


def layout_cost(*, plan: SegmentPlan | None, rows: int, width: int, dims: ModelDims,
                attention: str, device: DeviceCosts) -> BatchCost:
    """A micro-batch of ``rows`` × ``width`` tokens: padded rows (``plan`` None) or the packed /
    shared-prompt rows of ``plan``, with ``attention`` ``segments`` (per batch the cheaper of
    pieces and a dense mask, as the model runs it), ``varlen`` (a packed row's sequences in one
    causal call) or ``dense`` (a dense mask)."""
    heads, head_dim = dims.heads, dims.head_dim
    if plan is None:
        calls = padded_calls(rows, width)
        attn = calls_flops(calls, heads=heads, head_dim=head_dim, device=device)
    elif attention == "segments":
        mode = _cheaper(plan, heads, head_dim, device)
        calls = piece_calls(plan) if mode == "pieces" else dense_calls(plan)
        attn = mode_flops(plan, mode, heads=heads, head_dim=head_dim, device=device)
    elif attention == "varlen" and all(p.kind != BRANCH for row in plan.rows for p in row):
        sequences = piece_calls(plan)
        attn = calls_flops(sequences, heads=heads, head_dim=head_dim, device=device) \
            - (len(sequences) - 1) * device.call_flops  # one launch for them all
        pairs = sum(computed_pairs(c, device) for c in sequences)
        return BatchCost(rows * width, pairs, 1, rows * width * dims.flops_per_token() + attn)
    else:
        calls = dense_calls(plan)
        attn = calls_flops(calls, heads=heads, head_dim=head_dim, device=device)
    pairs = sum(computed_pairs(c, device) for c in calls)
    return BatchCost(rows * width, pairs, len(calls), rows * width * dims.flops_per_token() + attn)


def needed_pairs(plan: SegmentPlan | None, rows: int, width: int) -> int:
    """Query-key pairs a layout's attention needs (each call's whole rectangle, as a CPU kernel
    computes it): ``Σ`` over the pieces of ``queries × keys`` (a sequence ``n²``, a rejected
    branch ``r·(p + r)``), or ``rows × width²`` for padded rows (``plan`` None)."""
    if plan is None:
        return rows * width * width
    return sum(c.queries * c.keys for c in piece_calls(plan))


def forward_flops(tokens: int, pairs: int, *, dims: ModelDims, layers: int, scored: int = 0,
                  vocab: int = 0) -> float:
    """Forward FLOPs of a step's decoder (``tokens`` through every layer's matmuls, ``pairs``
    through its attention) and output head (``scored`` tokens × ``vocab``); the backward scales
    the same parts by about the same factors."""
    return layers * (tokens * dims.flops_per_token() + pairs * dims.flops_per_pair()) \
        + 2.0 * scored * dims.hidden * vocab
