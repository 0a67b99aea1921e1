"""The native CPU kernel (csrc/, ``torch.ops.fastpo_native``) against a float64 reference.

Every case runs on each compiled copy of the row kernels this CPU can run (``baseline`` and, on
x86-64 with AVX2+FMA+F16C, ``avx2``). Forward: per-row logp, log-sum-exp and logit sum. Backward:
the gradient written into a new buffer and in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fastpo.kernels import native, ops

IGNORE = -100
NEEDS_NATIVE = pytest.mark.skipif(
    not native.AVAILABLE, reason=f"native CPU kernel not built: {native.UNAVAILABLE_REASON}")
# Relative rounding bound (one ulp) of a value stored in each dtype.
ULP = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# Absolute resolution near 0: fp16's subnormal step; fp32 and bf16 results under 2^-125 flush to 0.
TINY = {torch.float32: 2**-125, torch.bfloat16: 2**-125, torch.float16: 2**-24}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_extension_is_built():
    """With a compiler present (and the build not switched off) the extension must be there."""
    compiler = os.environ.get("CXX", "c++")
    if os.environ.get("FASTPO_NO_NATIVE") == "1" or shutil.which(compiler) is None:
        pytest.skip("no C++ compiler here (or FASTPO_NO_NATIVE=1): the fallback is expected")
    assert native.AVAILABLE, native.UNAVAILABLE_REASON


def _capabilities() -> list[str]:
    if not native.AVAILABLE:
        return ["baseline"]
    current = torch.ops.fastpo_native.cpu_capability()
    found = ["baseline"]
    try:
        torch.ops.fastpo_native._set_cpu_capability("avx2")
        found.append("avx2")
    except ValueError:
        pass
    torch.ops.fastpo_native._set_cpu_capability(current)
    return found


@pytest.fixture(params=_capabilities())
def capability(request):
    if not native.AVAILABLE:
        pytest.skip(f"native CPU kernel not built: {native.UNAVAILABLE_REASON}")
    previous = torch.ops.fastpo_native._set_cpu_capability(request.param)
    yield request.param
    torch.ops.fastpo_native._set_cpu_capability(previous)


# --------------------------------------------------------------------------- helpers


def forward(logits, labels, temperature=1.0, with_sum=True):
    return torch.ops.fastpo_native.logps_forward(logits, labels, IGNORE, temperature, with_sum)


def backward(grad, logits, labels, lse, temperature=1.0, inplace=False):
    return torch.ops.fastpo_native.logps_backward(grad, logits, labels, lse, IGNORE, temperature,
                                                  inplace)


def reference(logits, labels, grad, temperature=1.0):
    """float64 (logp, lse, logits_sum, dlogits), 0 on ignored rows."""
    x = logits.detach().double().requires_grad_()
    scaled = x / temperature
    scored = labels != IGNORE
    safe = torch.where(scored, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(scaled, -1).gather(1, safe[:, None])[:, 0]
    (logp * torch.where(scored, grad.double(), torch.zeros_like(grad.double()))).sum().backward()
    zero = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        lse = torch.where(scored, torch.logsumexp(scaled, -1), zero)
        total = torch.where(scored, x.sum(-1), zero)
        dx = torch.where(scored[:, None], x.grad, zero)
        return torch.where(scored, logp, zero), lse, total, dx


def assert_matches(ours, ref, *, what, rel=0.0, atol=0.0):
    """|ours - ref| <= rel * |ref| + atol (broadcast tensors allowed); equal infs and NaNs pass."""
    ours, ref = ours.double(), ref.double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    close = (ours - ref).abs() <= rel * ref.abs() + atol
    bad = ~(same | close)
    assert not bad.any(), (f"{what}: {int(bad.sum())} mismatches, first at "
                           f"{tuple(bad.nonzero()[0].tolist())}: {ours[bad][0]} vs {ref[bad][0]}")


def fp32_bound(logits, temperature):
    """Per-row error bound of fp32 math on the row: the exponent argument t*x - lse carries an
    absolute error of a few ulps of max|t*x| + log V, which is also the relative error of every
    softmax term and the absolute error of logp and lse."""
    x = logits.detach().double()
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))
    scale = 1.0 + finite.amax(-1) / temperature + torch.log(torch.tensor(float(x.shape[-1])))
    return 32 * ULP[torch.float32] * scale


def check_rows(logits, labels, *, temperature=1.0, seed=0):
    """Forward, backward (new buffer and in place) of the op against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(labels.shape[0], generator=gen)
    logp, lse, total, dx = reference(logits, labels, grad, temperature)
    ours = forward(logits, labels, temperature)
    delta = fp32_bound(logits, temperature)
    assert_matches(ours[0], logp, atol=delta, what="logps")
    assert_matches(ours[1], lse, atol=delta, what="lse")
    sum_scale = logits.detach().double().nan_to_num(0, 0, 0).abs().sum(-1) + 1.0
    assert_matches(ours[2], total, atol=16 * ULP[torch.float32] * sum_scale, what="logits_sum")
    for tensor in ours:
        assert tensor.dtype == torch.float32
    # gradient: -g*t*p_j off the label, each p_j within `delta` relatively, then rounded to the
    # output dtype (to its resolution near 0); at the label g*t*(1 - p_l), within |g|*t*delta
    label_tol = torch.zeros_like(dx)
    scored = labels != IGNORE
    label_tol[scored.nonzero()[:, 0], labels[scored]] = (grad.abs() / temperature * delta)[scored]
    out = backward(grad, logits, labels, ours[1], temperature)
    assert out.dtype == logits.dtype and out.shape == logits.shape and out.is_contiguous()
    rel = ULP[logits.dtype] + delta[:, None]
    tiny = TINY[logits.dtype] * (1 + grad.abs() / temperature)[:, None]
    assert_matches(out, dx, rel=rel, atol=label_tol * (1 + ULP[logits.dtype]) + tiny,
                   what="grad (new buffer)")
    target = logits.detach().clone()
    returned = backward(grad, target, labels, ours[1], temperature, inplace=True)
    assert returned.data_ptr() == target.data_ptr()
    assert torch.equal(target.nan_to_num(), out.nan_to_num())
    assert torch.equal(target.isnan(), out.isnan())
    return ours, out


def make_rows(n, vocab, dtype, *, seed=0, scale=3.0, masked=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < masked] = IGNORE
    labels[0] = 0
    labels[-1] = vocab - 1
    return logits, labels


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_matches_float64_reference(capability, dtype, vocab):
    n = 6 if vocab > 10_000 else 23
    logits, labels = make_rows(n, vocab, dtype, seed=vocab)
    check_rows(logits, labels)


@pytest.mark.parametrize("temperature", [0.3, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_temperature(capability, temperature, dtype):
    logits, labels = make_rows(9, 4099, dtype, seed=3)
    check_rows(logits, labels, temperature=temperature)


@pytest.mark.parametrize("vocab", [2048 * 3 + 5, 5000])
def test_running_max_rises_and_falls_across_blocks(capability, vocab):
    """Rows whose maximum sits in the last block (rescaled sums) or the first one."""
    ramp = torch.linspace(-60.0, 40.0, vocab)
    logits = torch.stack([ramp, ramp.flip(0), ramp * 0.01, -ramp.abs()])
    labels = torch.tensor([vocab - 1, 3, vocab // 2, 0])
    check_rows(logits, labels)


def test_long_rows_sum_accurately(capability):
    """2^20 equal terms: the exp sum is exact up to a few ulps (no error growing with V)."""
    vocab = 2**20 + 3
    logits = torch.stack([torch.zeros(vocab), torch.full((vocab,), 5.0)])
    logits[1, 7] = 6.0
    labels = torch.tensor([vocab - 1, 7])
    logps, lse, _ = forward(logits, labels, 0.7)
    log_v = torch.log(torch.tensor(float(vocab), dtype=torch.float64))
    expected = torch.stack([-log_v, 1 / 0.7 - torch.log((vocab - 1) + torch.exp(
        torch.tensor(1 / 0.7, dtype=torch.float64)))])
    assert_matches(logps, expected, atol=8 * ULP[torch.float32] * log_v, what="logps")
    assert_matches(lse, torch.stack([log_v, 6 / 0.7 - expected[1]]),
                   atol=8 * ULP[torch.float32] * 25, what="lse")


def test_large_magnitudes_and_small_temperature(capability):
    logits, labels = make_rows(8, 3001, torch.float32, seed=5, scale=2000.0, masked=0.0)
    check_rows(logits, labels, temperature=0.05)


def test_vector_exp_is_accurate(capability):
    """The kernel's exp read back directly: with lse = 0, g = 1, T = 1 and the label on column 0,
    the backward writes -exp(x_j) into every other column."""
    x = torch.cat([torch.linspace(-86.6, 88.72, 200_003),
                   torch.tensor([0.0, -87.4, -100.0, 88.8, 100.0, float("-inf"), float("inf"),
                                 float("nan")])])
    row = torch.cat([torch.zeros(1), x])[None]
    out = backward(torch.ones(1), row, torch.tensor([0]), torch.zeros(1))
    got, ref = -out[0, 1:].double(), torch.exp(x.double())
    normal = (ref >= 2**-125) & (ref <= torch.finfo(torch.float32).max)
    assert normal[:200_003].all()
    assert ((got - ref).abs() <= ULP[torch.float32] * ref)[normal].all()
    # below 2^-125 (and at -inf) 0, above fp32's range (and at +inf) +inf, NaN stays NaN
    assert (got[~normal & (ref < 1)] == 0).all()
    assert (got[~normal & (ref > 1)] == float("inf")).all()
    assert got[-8:-1].tolist() == [1.0, 0.0, 0.0, float("inf"), float("inf"), 0.0, float("inf")]
    assert got[-1].isnan()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_all_rows_masked(capability, dtype):
    logits, _ = make_rows(5, 777, dtype)
    labels = torch.full((5,), IGNORE)
    logps, lse, total = forward(logits, labels)
    assert torch.equal(logps, torch.zeros(5)) and torch.equal(lse, torch.zeros(5))
    assert torch.equal(total, torch.zeros(5))
    out = backward(torch.ones(5), logits, labels, lse)
    assert torch.equal(out, torch.zeros_like(logits))
    backward(torch.ones(5), logits, labels, lse, inplace=True)
    assert torch.equal(logits, torch.zeros_like(logits))  # in place: ignored rows become 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_negative_infinity_logits(capability, dtype):
    """-inf entries: finite rows stay finite, a -inf label gives -inf, an all -inf row gives NaN."""
    logits, labels = make_rows(6, 1037, dtype, masked=0.0, seed=7)
    ninf = float("-inf")
    logits[0, ::3] = ninf                # some -inf, label on a finite entry
    labels[0] = 1
    logits[1, 100:] = ninf               # label on a -inf entry: logp = -inf
    labels[1] = 500
    logits[2, :] = ninf                  # every entry -inf: NaN, as torch.log_softmax
    logits[3, :1030] = ninf              # -inf over the first blocks, finite in the tail only
    labels[3] = 1033
    logits[4, 5:] = ninf                 # a finite head, then -inf blocks
    labels[4] = 2
    (logps, lse, _), _ = check_rows(logits, labels)
    assert torch.isfinite(logps[[0, 3, 4]]).all()
    assert logps[1].item() == ninf
    assert logps[2].isnan() and lse[2].item() == ninf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_positive_infinity_propagate(capability, bad):
    logits, labels = make_rows(4, 4100, torch.float32, masked=0.0, seed=9)
    logits[1, 4099] = bad      # in the tail of the last block
    logits[2, 17] = bad        # in a full step of the first block
    logits[3, 2] = bad
    labels[3] = IGNORE         # an ignored row is never read
    logps, lse, _ = forward(logits, labels)
    assert torch.isfinite(logps[0]) and logps[1].isnan() and logps[2].isnan() and logps[3] == 0
    out = backward(torch.ones(4), logits, labels, lse)
    assert torch.isfinite(out[0]).all() and out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[3], torch.zeros(4100))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_row_stride_larger_than_vocab(capability, dtype):
    """A [N, V] view into wider rows: read with its row stride; in place touches only the view."""
    wide, labels = make_rows(7, 1000 + 13, dtype, seed=11)
    view = wide[:, 5:1005]
    labels = labels.clamp(max=999)
    assert view.stride() == (1013, 1) and not view.is_contiguous()
    check_rows(view, labels)
    before = wide.clone()
    _, lse, _ = forward(view, labels)
    backward(torch.ones(7), view, labels, lse, inplace=True)
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 1005:], before[:, 1005:])


def test_non_contiguous_labels_and_grad(capability):
    logits, labels = make_rows(10, 333, torch.float32, seed=13)
    spread = torch.zeros(20, dtype=torch.int64)
    spread[::2] = labels
    grad = torch.randn(10)
    ref = backward(grad, logits, labels, forward(logits, labels)[1])
    ours_fwd = forward(logits, spread[::2])
    assert torch.equal(ours_fwd[0], forward(logits, labels)[0])
    grad_wide = torch.zeros(20)
    grad_wide[::2] = grad
    assert torch.equal(backward(grad_wide[::2], logits, spread[::2], ours_fwd[1]), ref)
    # a broadcast gradient (stride 0, what .sum() sends back) and a float64 one
    ones = backward(torch.ones(1).expand(10), logits, labels, ours_fwd[1])
    assert torch.equal(ones, backward(torch.ones(10), logits, labels, ours_fwd[1]))
    assert torch.equal(backward(grad.double(), logits, labels, ours_fwd[1]), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_and_two_threads_bit_identical(capability, dtype):
    """Each row is reduced by one thread in a fixed order: the thread count changes no bit.

    72 x 32003 fp32 rows are > 8 MiB, so the new gradient buffer also takes the huge-page path.
    """
    logits, labels = make_rows(72, 32003, dtype, seed=17)
    grad = torch.randn(72)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            fwd = forward(logits, labels, 0.9)
            out = backward(grad, logits, labels, fwd[1], 0.9)
            inplace = logits.clone()
            backward(grad, inplace, labels, fwd[1], 0.9, inplace=True)
            results.append((*fwd, out, inplace))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    logp, _, _, dx = reference(logits, labels, grad, 0.9)
    delta = fp32_bound(logits, 0.9)
    assert_matches(results[0][0], logp, atol=delta, what="logps")
    assert_matches(results[0][3], dx, rel=ULP[dtype] + delta[:, None],
                   atol=(grad.abs() / 0.9 * delta)[:, None], what="grad")


def test_capabilities_agree(capability):
    """The baseline and AVX2 copies give the same values up to rounding."""
    logits, labels = make_rows(12, 2500, torch.float32, seed=19)
    grad = torch.randn(12)
    ours = forward(logits, labels)
    previous = torch.ops.fastpo_native._set_cpu_capability("baseline")
    try:
        base = forward(logits, labels)
        base_grad = backward(grad, logits, labels, base[1])
    finally:
        torch.ops.fastpo_native._set_cpu_capability(previous)
    delta = fp32_bound(logits, 1.0)
    assert_matches(ours[0], base[0], atol=delta, what="logps")
    assert_matches(backward(grad, logits, labels, ours[1]), base_grad, rel=delta[:, None],
                   atol=(grad.abs() * delta)[:, None], what="grad")


def test_empty_batch(capability):
    logits = torch.zeros(0, 50)
    labels = torch.zeros(0, dtype=torch.int64)
    logps, lse, total = forward(logits, labels)
    assert logps.shape == lse.shape == total.shape == (0,)
    assert backward(torch.zeros(0), logits, labels, lse).shape == (0, 50)
    assert forward(torch.zeros(3, 50), torch.full((3,), IGNORE), with_sum=False)[2].shape == (0,)


# --------------------------------------------------------------------------- bad input


@NEEDS_NATIVE
def test_bad_input_raises_clear_errors():
    x = torch.randn(4, 10)
    lab = torch.tensor([0, 1, IGNORE, 9])
    ops = torch.ops.fastpo_native
    with pytest.raises(ValueError, match="2-D"):
        ops.logps_forward(x[None], lab, IGNORE, 1.0, False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.logps_forward(x.double(), lab, IGNORE, 1.0, False)
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.logps_forward(x, lab.int(), IGNORE, 1.0, False)
    with pytest.raises(ValueError, match="one entry per logits row"):
        ops.logps_forward(x, lab[:3], IGNORE, 1.0, False)
    with pytest.raises(ValueError, match=r"labels\[3\] = 10 is outside the vocab \[0, 10\)"):
        ops.logps_forward(x, torch.tensor([0, 1, 2, 10]), IGNORE, 1.0, False)
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        ops.logps_forward(x, torch.tensor([0, -1, 2, 3]), IGNORE, 1.0, False)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.logps_forward(x, lab, IGNORE, 0.0, False)
    with pytest.raises(ValueError, match="vocab stride 1"):
        ops.logps_forward(torch.randn(10, 4).t(), lab, IGNORE, 1.0, False)
    _, lse, _ = ops.logps_forward(x, lab, IGNORE, 1.0, False)
    with pytest.raises(ValueError, match="grad_logps must have shape"):
        ops.logps_backward(torch.ones(3), x, lab, lse, IGNORE, 1.0, False)
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.logps_backward(torch.ones(4), x, lab, lse[:2], IGNORE, 1.0, False)
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.logps_backward(torch.ones(4), x, lab, lse.double(), IGNORE, 1.0, False)
    with pytest.raises(ValueError, match="non-overlapping rows"):
        ops.logps_backward(torch.ones(4), torch.randn(13).as_strided((4, 10), (1, 1)), lab, lse,
                           IGNORE, 1.0, True)
    with pytest.raises(ValueError, match=r"not available|choose"):
        ops._set_cpu_capability("sse9")


# --------------------------------------------------------------------------- public API


@NEEDS_NATIVE
def test_public_api_runs_the_native_kernel_on_cpu():
    import fastpo.kernels as K
    from fastpo.kernels import ops

    assert native.describe().startswith("native C++ (")
    assert native.cpu_capability() in ("baseline", "avx2")
    with ops.use_cpu_backend("auto"):
        assert K.backend_info()["cpu"] == native.describe()
        logits, labels = make_rows(3 * 5, 1001, torch.bfloat16, seed=23)
        logits, labels = logits.view(3, 5, 1001), labels.view(3, 5)
        grad = torch.randn(3, 5)
        leaf = logits.clone().requires_grad_()
        out = K.token_logps(leaf, labels)
        (out * grad).sum().backward()
    logp, _, _, dx = reference(logits.view(15, -1), labels.view(15), grad.view(15))
    delta = fp32_bound(logits.view(15, -1), 1.0)
    assert_matches(out.view(15), logp, atol=delta, what="token_logps")
    assert_matches(leaf.grad.view(15, -1), dx, rel=ULP[torch.bfloat16] + delta[:, None],
                   atol=(grad.view(15).abs() * delta)[:, None], what="token_logps grad")
    # the same numbers with the gradient written into the logits
    leaf2 = logits.clone().requires_grad_()
    with ops.use_cpu_backend("auto"):
        out2 = K.token_logps(leaf2, labels, inplace_backward=True)
        (out2 * grad).sum().backward()
    assert torch.equal(out2, out)
    assert torch.equal(leaf2.grad, leaf.grad)


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # the test compares whatever is raised
        return type(exc), str(exc)
    return None, ""


@NEEDS_NATIVE
def test_public_api_errors_match_other_backends():
    """Bad input raises the same error type and message whichever backend runs CPU tensors."""
    import fastpo.kernels as K
    from fastpo.kernels import ops

    x = torch.randn(2, 3, 50)
    lab = torch.randint(0, 50, (2, 3))
    cases = {
        "label out of range": lambda: K.token_logps(x, torch.full((2, 3), 50)),
        "labels shape": lambda: K.token_logps(x, lab[:, :2]),
        "labels dtype": lambda: K.token_logps(x, lab.float()),
        "logits dtype": lambda: K.token_logps(x.int(), lab),
        "temperature": lambda: K.token_logps(x, lab, temperature=0.0),
        "1-D logits": lambda: K.token_logps(x[0, 0], lab[0, 0]),
    }
    backends = ["native", "torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    for name, fn in cases.items():
        seen = {}
        for backend in backends:
            with ops.use_cpu_backend(backend):
                seen[backend] = _error_of(fn)
        kind, message = seen["native"]
        assert kind in (ValueError, TypeError), f"{name}: native raised {kind}: {message}"
        for backend, got in seen.items():
            assert got == seen["native"], f"{name}: {backend} raised {got}, native {kind}"


# --------------------------------------------------------------------------- loader


def test_warns_once_when_unavailable(monkeypatch):
    monkeypatch.setattr(native, "AVAILABLE", False)
    monkeypatch.setattr(native, "UNAVAILABLE_REASON", "not built (test)")
    monkeypatch.setitem(ops._state, "warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops._native() is None
        assert ops._native() is None
    assert len(caught) == 1 and "not built (test)" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    assert native.describe().startswith("chunked PyTorch (native kernel unavailable")


@NEEDS_NATIVE
def test_environment_selects_the_baseline_copy():
    code = ("import torch, fastpo.kernels.native as n; "
            "print(n.cpu_capability(), n.describe())")
    env = {**os.environ, "FASTPO_NATIVE_CPU_CAPABILITY": "baseline"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("baseline native C++ (baseline, ")
