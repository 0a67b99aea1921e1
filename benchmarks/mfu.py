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


def mfu(row: dict[str, Any]) -> float | None:
    """A result row's model-FLOP utilization (its ``extra`` holds ``model_flops`` and
    ``gemm_flops_per_s``), or None."""
    extra = row.get("extra") or {}
    if row.get("status") != "ok" or not row.get("median_s") or not extra.get("gemm_flops_per_s"):
        return None
    return extra["model_flops"] / row["median_s"] / extra["gemm_flops_per_s"]
