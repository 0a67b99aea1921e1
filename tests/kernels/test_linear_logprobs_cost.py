"""The roofline cost model of the fused linear op and the dispatcher's use of it."""

from __future__ import annotations

import dataclasses

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
    spec = cost.DeviceSpec("toy", 1e12, 1e12, 1e12, 1e9, 1, l2_bytes_per_s=4e9,
                           gemm_efficiency=1.0, hbm_efficiency=1.0)
    c.kernel(spec, flops=2e12, nbytes=1e9)  # compute-bound: 2 s
    c.kernel(spec, flops=1e9, nbytes=3e9)  # memory-bound: 3 s
    c.kernel(spec, atomic_bytes=1e9, launches=10)  # atomics at half the bandwidth: 2 s
    c.kernel(spec, flops=1e12, nbytes=1e9, l2_bytes=2e10)  # L2-bound: 5 s
    assert c.time_s == pytest.approx(12 + 13 * cost.LAUNCH_S)
    assert c.launches == 13 and c.hbm_bytes == 5e9 and c.atomic_bytes == 1e9
    assert c.l2_bytes == 2e10
    # the efficiencies stretch the compute and HBM terms: 2 / 0.5 = 4 s, atomics 2 / 0.75 s
    slow = dataclasses.replace(spec, gemm_efficiency=0.5, hbm_efficiency=0.75)
    d = cost.Cost("x", "forward", peak_flops=1e12)
    d.kernel(slow, flops=2e12, nbytes=1e9)
    d.kernel(slow, atomic_bytes=1e9)
    assert d.time_s == pytest.approx(4 + 2 / 0.75 + 2 * cost.LAUNCH_S)


def test_default_efficiencies_bound_every_design_below_the_measured_ceilings():
    """Until a run measures them, ~80 % of the spec GEMM rate and ~90 % of the spec HBM
    bandwidth: no design is predicted above them (the old model put the tile forward at 100 %
    of the bf16 peak)."""
    assert (H100.gemm_efficiency, H100.hbm_efficiency) == (0.8, 0.9)
    for design in cost.DESIGNS:
        for phase in ("forward", "backward", "fwd+bwd"):
            c = cost.predict(design, phase, LLAMA8B_32K, H100)
            assert c.pct_peak <= 80 + 1e-9, (design, phase, c.pct_peak)
    copy_like = cost.Cost("x", "forward", peak_flops=H100.half_flops)
    copy_like.kernel(H100, nbytes=3.35e12)
    assert copy_like.time_s == pytest.approx(1 / 0.9 + cost.LAUNCH_S)


def test_tile_l2_rereads_are_charged():
    """The tile kernels reload each token tile's hidden rows per vocab tile and each vocab
    tile's weight rows per token tile; what does not cross HBM is L2 traffic. At the 8B head ×
    32k tokens that is ~0.54 TB per matmul pass, and it, not the matmul, bounds the tile
    forward, so the gemm forward (cuBLAS) is predicted faster there."""
    n_tiles, v_tiles = 32768 // 128, -(-128256 // 128)
    passes = -(-n_tiles // H100.sms)
    want = 2 * (32768 * 4096 * (v_tiles - 1) + 128256 * 4096 * (n_tiles - passes))
    assert cost.tile_l2_bytes(LLAMA8B_32K, H100) == want
    fwd = cost.predict("tile", "forward", LLAMA8B_32K, H100)
    assert fwd.l2_bytes == want and 5.3e11 < want < 5.5e11
    assert fwd.time_s >= want / H100.l2_bytes_per_s
    assert cost.predict("tile", "backward", LLAMA8B_32K, H100).l2_bytes == 3 * want
    assert cost.predict("gemm", "fwd+bwd", LLAMA8B_32K, H100).l2_bytes == 0
    assert cost.choose_design("forward", LLAMA8B_32K, H100) == "gemm"
    # the small head (SmolLM2 × 4k) stays on the fused tile forward: no logits written
    assert cost.choose_design("forward", Shape(4096, 576, 49152), H100) == "tile"


def test_calibration_file_reaches_the_dispatcher(tmp_path, monkeypatch):
    """``python -m benchmarks gpu`` writes the measured efficiencies; ``device_spec`` applies
    them for that device name once ``FASTPO_COST_CALIBRATION`` names the file, and the
    predictions scale with them."""
    from fastpo.kernels import linear_logprobs_roofline as roof

    path = tmp_path / "calibration.json"
    path.write_text(roof.Calibration(device="NVIDIA H100 80GB HBM3", gemm_efficiency=0.6,
                                     hbm_efficiency=0.7, source="test").to_json())
    monkeypatch.setenv(roof.CALIBRATION_ENV, str(path))
    roof.device_spec.cache_clear()
    try:
        spec = roof.device_spec("NVIDIA H100 80GB HBM3")
        assert (spec.gemm_efficiency, spec.hbm_efficiency, spec.calibrated) == (0.6, 0.7, "test")
        assert roof.device_spec("NVIDIA H200") is not spec  # another device: its defaults
        assert roof.device_spec("NVIDIA H200").gemm_efficiency == 0.8
        gemm = cost.predict("gemm", "forward", LLAMA8B_32K, spec)
        default = cost.predict("gemm", "forward", LLAMA8B_32K, H100)
        assert gemm.time_s > default.time_s * 1.2  # GEMM-bound: 0.8 / 0.6 slower
        # the dispatcher asks this same function for the device's spec on every call
        assert linear_logprobs.device_spec is roof.device_spec
        assert cost.choose_design("forward", LLAMA8B_32K, spec) in cost.DESIGNS
    finally:
        roof.device_spec.cache_clear()


@pytest.mark.parametrize(("text", "match"), [
    ("{", "cannot read it"),
    ('{"device": "x", "gemm_efficiency": 0.8}', "expected an object with fields"),
    ('{"device": "x", "gemm_efficiency": 0.8, "hbm_efficiency": 0.9, "extra": 1}',
     "expected an object with fields"),
    ('{"device": "x", "gemm_efficiency": 0, "hbm_efficiency": 0.9}', "gemm_efficiency must be"),
    ('{"device": "x", "gemm_efficiency": 0.8, "hbm_efficiency": "fast"}', "hbm_efficiency must"),
    ('{"device": "", "gemm_efficiency": 0.8, "hbm_efficiency": 0.9}', "device must be"),
])
def test_bad_calibration_file_is_a_clear_error(tmp_path, text, match):
    from fastpo.kernels.linear_logprobs_roofline import Calibration

    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        Calibration.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("spec", [H100, H200])
def test_chosen_design_at_the_8b_head(spec):
    fwd, bwd, both = cost.best_plan(LLAMA8B_32K, spec)
    assert bwd == "gemm"  # the atomic backward is several times slower
    assert fwd == "gemm"  # the tile forward's L2 re-reads outweigh the logits it saves
    # GEMM-bound: >= 85 % of the GEMM ceiling (80 % of the bf16 peak) in executed FLOPs ...
    assert both.pct_peak >= 0.85 * 80
    # ... but the recompute of the logits caps the model-FLOP rate (6·N·V·H) at 3/4 of that
    assert both.model_pct_peak < 0.75 * 80
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
