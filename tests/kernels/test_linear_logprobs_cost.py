"""The roofline cost model of the fused linear op and the dispatcher's use of it."""

from __future__ import annotations

import pytest
import torch

from fastpo.kernels import linear_logprobs
from fastpo.kernels import linear_logprobs_cost as cost
from fastpo.kernels.linear_logprobs_cost import H100, H200, Shape

LLAMA8B_32K = Shape(32768, 4096, 128256)  # bf16, the anchor of the issue
NVH = 32768 * 4096 * 128256


def test_flop_counts():
    for design in cost.DESIGNS:
        fwd = cost.predict(design, "forward", LLAMA8B_32K, H100)
        both = cost.predict(design, "fwd+bwd", LLAMA8B_32K, H100)
        assert fwd.flops == fwd.model_flops == 2 * NVH
        # the backward recomputes the logits: 8·N·V·H executed for the 6·N·V·H of the model
        assert both.flops == 8 * NVH and both.model_flops == 6 * NVH
    frozen = Shape(32768, 4096, 128256, need_weight=False)  # LoRA: no grad_W matmul
    assert cost.predict("gemm", "backward", frozen, H100).flops == 4 * NVH


def test_atomic_bytes_of_the_tile_backward():
    tile = cost.predict("tile", "backward", LLAMA8B_32K, H100)
    # every grad_h element gets one add per 128-wide vocab tile, every grad_W element one per
    # 128-token tile: ~1.3·10¹¹ fp32 adds each, ~1 TB in all (the estimate)
    grad_h_adds = 32768 * 4096 * -(-128256 // 128)
    grad_w_adds = 128256 * 4096 * (32768 // 128)
    assert tile.atomic_bytes == 4 * (grad_h_adds + grad_w_adds)
    assert 1.0e12 < tile.atomic_bytes < 1.1e12
    assert cost.predict("gemm", "backward", LLAMA8B_32K, H100).atomic_bytes == 0
    # atomics bound the tile backward: their time alone exceeds its matmul time
    atomic_s = tile.atomic_bytes / (cost.ATOMIC_EFFICIENCY * H100.hbm_bytes_per_s)
    assert atomic_s > tile.flops / H100.half_flops
    assert tile.time_s >= atomic_s


def test_roofline_arithmetic_of_one_kernel():
    c = cost.Cost("x", "forward", peak_flops=1e12)
    spec = cost.DeviceSpec("toy", 1e12, 1e12, 1e12, 1e9, 1)
    c.kernel(spec, flops=2e12, nbytes=1e9)  # compute-bound: 2 s
    c.kernel(spec, flops=1e9, nbytes=3e9)  # memory-bound: 3 s
    c.kernel(spec, atomic_bytes=1e9, launches=10)  # atomics at half the bandwidth: 2 s
    assert c.time_s == pytest.approx(7 + 12 * cost.LAUNCH_S)
    assert c.launches == 12 and c.hbm_bytes == 4e9 and c.atomic_bytes == 1e9


@pytest.mark.parametrize("spec", [H100, H200])
def test_chosen_design_at_the_8b_head(spec):
    fwd, bwd, both = cost.best_plan(LLAMA8B_32K, spec)
    assert bwd == "gemm"  # the atomic backward is several times slower
    assert fwd == "tile"  # no logits written: the roofline's fastest forward
    # GEMM-bound: >= 75 % of the bf16 peak in executed FLOPs ...
    assert both.pct_peak >= 75
    # ... but the recompute of the logits caps the model-FLOP rate (6·N·V·H) at 75 %
    assert both.model_pct_peak < 75
    assert both.model_pct_peak == pytest.approx(both.pct_peak * 6 / 8)
    tile = cost.predict("tile", "fwd+bwd", LLAMA8B_32K, spec)
    assert both.time_s < tile.time_s / 2.5
    assert cost.predict("gemm", "backward", LLAMA8B_32K, spec).memory_bytes <= 2**30
    assert cost.best_plan(LLAMA8B_32K, spec, deterministic=True)[1] == "gemm"


def test_tiny_no_grad_call_takes_the_tile_forward():
    tiny = Shape(24, 40, 299, 4, need_hidden=False, need_weight=False)
    assert cost.choose_design("forward", tiny, H100) == "tile"
    assert cost.choose_design("backward", Shape(24, 40, 299, 4), H100) == "tile"
    assert cost.choose_design("backward", Shape(24, 40, 299, 4), H100,
                              deterministic=True) == "gemm"


def test_gemm_plan_fits_the_budget():
    c, s = cost.gemm_plan(32768, 4096, 128256, 2)
    assert cost.gemm_memory(32768, 4096, 128256, 2, c, s) <= cost.GEMM_BUDGET_BYTES
    assert c >= 1024 and s >= 4096  # large GEMMs
    small = cost.gemm_plan(1000, 64, 5000, 4, budget_bytes=2_000_000)
    assert cost.gemm_memory(1000, 64, 5000, 4, *small) <= 2_000_000
    assert small[0] * small[1] < 1000 * 5000  # several tiles
    # the fp32 grad_h rows alone (1 GiB at the 70B head × 32k) exceed the budget: it grows by
    # half a budget on top of them instead of shrinking the tile to nothing
    c, s = cost.gemm_plan(32768, 8192, 128256, 2)
    mem = cost.gemm_memory(32768, 8192, 128256, 2, c, s)
    assert 2**30 < mem <= 2**30 + 2**29 + 4 * 32768 * 8192 - 2**30 and c * s >= 2**24
    assert cost.device_spec("NVIDIA H200") is H200 and cost.device_spec("NVIDIA A100") is H100


def test_dispatcher_uses_the_model(monkeypatch):
    seen = []

    def spy(phase, shape, spec, *, deterministic=False):
        seen.append((phase, shape, deterministic))
        return "tile"

    monkeypatch.setattr(linear_logprobs, "choose_design", spy)
    monkeypatch.setattr(linear_logprobs, "uses_triton", lambda h, w: True)
    hidden, weight = torch.empty(32, 16, dtype=torch.bfloat16), torch.empty(100, 16)
    assert linear_logprobs._design("forward", hidden, weight, None, "auto") == "tile"
    assert seen[-1] == ("forward", Shape(32, 16, 100, 4), False)
    linear_logprobs._design("backward", hidden, weight.bfloat16(), None, "auto", True)
    assert seen[-1] == ("backward", Shape(32, 16, 100, 2), True)
    linear_logprobs._design("backward", hidden, weight, None, "auto", False, True, False, 7)
    assert seen[-1] == ("backward", Shape(32, 16, 100, 4, need_weight=False, scored=7), False)
    assert linear_logprobs._design("backward", hidden, weight, None, "gemm") == "gemm"
    monkeypatch.setattr(linear_logprobs, "uses_triton", lambda h, w: False)
    assert linear_logprobs._design("forward", hidden, weight, None, "auto") == "chunked"


def test_rows_charged_with_and_without_the_num_scored_hint():
    """No hint: the gemm design computes (and is charged for) every row; with the hint, only the
    scored ones, plus their gather."""
    half = Shape(32768, 4096, 128256, scored=16384)
    for phase in ("forward", "backward"):
        dense = cost.predict("gemm", phase, LLAMA8B_32K, H100)
        compact = cost.predict("gemm", phase, half, H100)
        assert dense.flops == 2 * compact.flops and dense.model_flops == 2 * compact.model_flops
        assert compact.time_s < 0.6 * dense.time_s
    assert cost.predict("gemm", "backward", LLAMA8B_32K, H100).flops == 6 * NVH
    # the hint that every row is scored costs the gather of the forward on top
    every = Shape(32768, 4096, 128256, scored=32768)
    assert cost.predict("gemm", "forward", every, H100).hbm_bytes > \
        cost.predict("gemm", "forward", LLAMA8B_32K, H100).hbm_bytes
    assert Shape(10, 4, 5).rows == 10 and Shape(10, 4, 5, scored=3).rows == 3


def test_tile_shapes_are_the_launchers_on_sm90():
    from fastpo.kernels.linear_logprobs_launch import launch_config

    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float16, "ieee"),
                             (torch.float32, "ieee"), (torch.float32, "tf32")):
        for kernel in ("forward", "backward"):
            block_n, block_v, *_ = launch_config(kernel, dtype, precision, 90)
            assert (block_n, block_v) == (cost.TILE_BLOCK_N[dtype.itemsize],
                                          cost.TILE_BLOCK_V[dtype.itemsize])
