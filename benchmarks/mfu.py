"""Model-FLOP utilization: a step's model FLOPs per second over the GEMM rate the same process
measures on the same device and dtype — how far from the machine's matmul limit the whole step
runs (attention, softmax, optimizer and overheads included).

    rate = gemm_rate("cpu", torch.float32)        # FLOP/s of a large square matmul, best of 3
    flops = step_model_flops(tokens=..., attention_pairs=..., scored=..., config=config)
    mfu = flops / median_s / rate

The step's model FLOPs are the policy's forward and backward (3 × forward) and the reference's
forward (1 ×) over the layout's real tokens (padding excluded), the attention pairs its rows
need and the scored tokens through the output head
(:func:`fastpo.engine.data.attention_cost.forward_flops`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

POLICY_AND_REFERENCE = 4.0  # policy forward + backward (3×) and the reference's forward (1×)


def gemm_rate(device: str, dtype: torch.dtype, *, size: int = 2048, reps: int = 3) -> float:
    """FLOP/s of ``[size, size] @ [size, size]`` in ``dtype`` on ``device``: the best of
    ``reps`` timed calls after one warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def step_model_flops(*, tokens: int, attention_pairs: int, scored: int, config: Any,
                     passes: float = POLICY_AND_REFERENCE) -> float:
    """Model FLOPs of one DPO step over ``tokens`` real tokens (see the module docstring)."""
    from fastpo.engine.data.attention_cost import ModelDims, forward_flops

    return passes * forward_flops(tokens, attention_pairs, dims=ModelDims.of(config),
                                  layers=config.num_hidden_layers, scored=scored,
                                  vocab=config.vocab_size)


def batch_mfu_figures(batch: Any, *, config: Any, device: str, dtype: torch.dtype
                      ) -> dict[str, float]:
    """``model_flops`` of a DPO step on ``batch`` (a ``PreferenceBatch``: its real tokens, the
    attention its sequences need — its segment plan's pairs, or each sequence's causal
    triangle — and its scored tokens) and the GEMM rate measured here."""
    from fastpo.engine.data.segments import attention_pairs

    plan = batch.attention_plan
    if plan is not None:
        pairs = attention_pairs(plan)
    else:
        lengths = torch.bincount(batch.sequence_ids[batch.sequence_ids >= 0].cpu())
        pairs = int((lengths * (lengths + 1) // 2).sum())
    flops = step_model_flops(tokens=batch.num_tokens, attention_pairs=pairs,
                             scored=int(batch.target_index.numel()), config=config)
    return {"model_flops": flops, "gemm_flops_per_s": gemm_rate(device, dtype)}


def mfu_column(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of each row's MFU (rows without the figures are left out)."""
    lines = ["| impl | model GFLOP per step | GEMM GFLOP/s measured | MFU |",
             "|---|---:|---:|---:|"]
    for row in rows:
        util = mfu(row)
        if util is None:
            continue
        x = row["extra"]
        lines.append(f"| {row['impl']} | {x['model_flops'] / 1e9:,.1f} | "
                     f"{x['gemm_flops_per_s'] / 1e9:,.1f} | {100 * util:.1f} % |")
    return lines if len(lines) > 2 else []


def mfu(row: dict[str, Any]) -> float | None:
    """A result row's model-FLOP utilization (its ``extra`` holds ``model_flops`` and
    ``gemm_flops_per_s``), or None."""
    extra = row.get("extra") or {}
    if row.get("status") != "ok" or not row.get("median_s") or not extra.get("gemm_flops_per_s"):
        return None
    return extra["model_flops"] / row["median_s"] / extra["gemm_flops_per_s"]
