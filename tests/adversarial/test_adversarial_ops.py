"""Adversarial input to the log-probability ops: every mistake gets a clear error naming what is
wrong, and every legal-but-ugly input gets the float64 reference's numbers, on every backend."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpo.kernels as K
from fastpo.kernels import checks, ops
from fastpo.kernels.logprobs_torch import token_logps_reference

IGNORE = -100
BACKENDS = ["native", "torch", "triton"]




def _inputs(shape=(2, 3), vocab=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, shape, generator=gen)
    return logits, labels


def _reference(logits, labels, grad_out, temperature=1.0):
    """float64 (token logps, d/dlogits) through log_softmax."""
    x = logits.detach().double().requires_grad_()
    out = token_logps_reference(x, labels, ignore_index=IGNORE, temperature=temperature)
    (out * grad_out.double()).sum().backward()
    return out.detach(), x.grad


def _assert_matches(ours, ref, *, scale, what):
    """Within fp32 accumulation of the reference: 64 fp32 ulps of the value's scale."""
    err = (ours.double() - ref).abs()
    both_inf = torch.isinf(ref) & (ours.double() == ref)
    bad = ~both_inf & ~(err <= 64 * 2**-23 * scale)
    assert not bad.any(), f"{what}: error {err[bad].max()} at {bad.nonzero()[0].tolist()}"


# --------------------------------------------------------------------------- wrong types/shapes


@pytest.mark.parametrize("make, error, message", [
    (lambda x, y: (x.long(), y), TypeError,
     r"logits must be float32, bfloat16, float16 or float64, got torch\.int64"),
    (lambda x, y: (x.to(torch.complex64), y), TypeError, r"logits must be .* got torch\.complex64"),
    (lambda x, y: (x, y.float()), TypeError, r"labels must be int64 or int32, got torch\.float32"),
    (lambda x, y: (x, y.to(torch.uint8)), TypeError, r"labels must be int64 or int32, got "
                                                     r"torch\.uint8"),
    (lambda x, y: (x.tolist(), y), TypeError, r"logits and labels must be tensors, got list"),
    (lambda x, y: (x, y.tolist()), TypeError, r"must be tensors, got Tensor and list"),
    (lambda x, y: (x, y[:, :2]), ValueError,
     r"labels shape \(2, 2\) does not match logits shape \(2, 3, 10\): expected labels of shape "
     r"\(2, 3\)"),
    (lambda x, y: (x[0, 0], y[0, 0]), ValueError,
     r"logits must have shape \[N, V\] or \[B, T, V\], got \(10,\)"),
    (lambda x, y: (x[None], y[None]), ValueError,
     r"logits must have shape \[N, V\] or \[B, T, V\], got \(1, 2, 3, 10\)"),
    (lambda x, y: (x[..., :0], y), ValueError, r"empty vocabulary dimension \(V = 0\)"),
], ids=["int-logits", "complex-logits", "float-labels", "uint8-labels", "list-logits",
        "list-labels", "labels-shape", "1d-logits", "4d-logits", "empty-vocab"])
def test_bad_tensors_are_named(make, error, message):
    logits, labels = make(*_inputs())
    with pytest.raises(error, match=message):
        K.token_logps(logits, labels)


@pytest.mark.parametrize("ignore_index", [-100.0, "-100", True, None])
def test_ignore_index_must_be_an_int(ignore_index):
    logits, labels = _inputs()
    with pytest.raises(TypeError, match=rf"ignore_index must be an int, got {ignore_index!r}"):
        K.sequence_logps(logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["max", "SUM", None, ""])
def test_unknown_reduction(reduction):
    logits, labels = _inputs()
    with pytest.raises(ValueError, match=rf"unknown reduction {reduction!r}; expected one of "
                                         r"\('sum', 'mean'\)"):
        K.sequence_logps(logits, labels, reduction=reduction)


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("temperature", [float("inf"), float("-inf"), float("nan"), 0.0, -1.0,
                                         0, True, "1.0", torch.tensor(1.0)],
                         ids=["inf", "-inf", "nan", "zero", "negative", "int-zero", "bool", "str",
                              "tensor"])
def test_temperature_one_rule_for_every_backend(backend, temperature):
    logits, labels = _inputs()
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite") as info:
        K.token_logps(logits, labels, temperature=temperature)
    assert repr(temperature) in str(info.value)


def test_valid_temperatures_accepted():
    logits, labels = _inputs()
    ref, _ = _reference(logits, labels, torch.ones(labels.shape), temperature=2.0)
    for temperature in (2, 2.0, torch.tensor(2.0).numpy().item()):
        _assert_matches(K.token_logps(logits, labels, temperature=temperature), ref,
                        scale=1 + ref.abs(), what=f"temperature {temperature!r}")


# --------------------------------------------------------------------------- label values


@pytest.mark.parametrize("value, where", [(10, (1, 2)), (-5, (0, 1)), (2**40, (1, 0))])
def test_label_out_of_range_names_value_and_position(backend, value, where):
    logits, labels = _inputs((2, 4))
    labels[where] = value
    labels[1, 3] = 99  # a second bad label, later in order: counted, not reported first
    with pytest.raises(ValueError, match=rf"label {value} at position \({where[0]}, {where[1]}\) "
                                         r"is outside \[0, 10\) and is not ignore_index=-100 "
                                         r"\(2 such labels\)"):
        K.sequence_logps(logits, labels)


def test_label_check_opt_out_reads_nan_not_memory(monkeypatch):
    """FASTPO_CHECK_LABELS=0 skips the check; the Triton kernel then reads NaN, never past a row."""
    monkeypatch.setenv("FASTPO_CHECK_LABELS", "0")
    logits, labels = _inputs()
    labels[0, 1] = 10
    with ops.use_cpu_backend("triton"):
        out = K.token_logps(logits, labels)
    assert torch.isnan(out[0, 1]) and torch.isfinite(out[labels != 10]).all()


def test_int32_labels_give_the_int64_result(backend):
    logits, labels = _inputs(seed=3)
    labels[0, 0] = IGNORE
    x64, x32 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a = K.token_logps(x64, labels)
    b = K.token_logps(x32, labels.int())
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(a, b) and torch.equal(x64.grad, x32.grad)


# --------------------------------------------------------------------------- packed sequences


@pytest.mark.parametrize("kwargs, error, message", [
    ({"bad": (0, 4, 3), "num_sequences": 3}, ValueError,
     r"sequence_ids 3 at position \(0, 4\) is outside \[-1, num_sequences=3\) \(1 such id\)"),
    ({"bad": (1, 0, 7), "num_sequences": 3}, ValueError,
     r"sequence_ids 7 at position \(1, 0\) is outside \[-1, num_sequences=3\)"),
    ({"bad": (0, 0, -2), "num_sequences": 3}, ValueError,
     r"sequence_ids -2 at position \(0, 0\) is outside \[-1, num_sequences=3\)"),
    ({"bad": (0, 0, -2), "num_sequences": None}, ValueError,
     r"sequence_ids -2 at position \(0, 0\) is outside \[-1, num_sequences\)"),
    ({"num_sequences": -1}, ValueError, r"num_sequences must be an int >= 0, got -1"),
    ({"num_sequences": True}, ValueError, r"num_sequences must be an int >= 0, got True"),
    ({"dtype": torch.float32, "num_sequences": 3}, TypeError,
     r"sequence_ids must be an integer tensor, got torch\.float32"),
    ({"shape": (2, 4), "num_sequences": 3}, ValueError,
     r"sequence_ids shape \(2, 4\) does not match labels shape \(2, 5\)"),
], ids=["beyond", "far-beyond", "below-minus-one", "below-minus-one-no-count",
        "negative-count", "bool-count", "float-ids", "ids-shape"])
def test_bad_sequence_ids(backend, kwargs, error, message):
    logits, labels = _inputs((2, 5), seed=4)
    ids = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    if "bad" in kwargs:
        row, col, value = kwargs["bad"]
        ids[row, col] = value
    ids = ids.to(kwargs.get("dtype", torch.int64))
    if "shape" in kwargs:
        ids = ids[:, :kwargs["shape"][1]]
    with pytest.raises(error, match=message):
        K.sequence_logps(logits, labels, sequence_ids=ids, num_sequences=kwargs["num_sequences"])


def test_num_sequences_without_ids_must_match_rows():
    logits, labels = _inputs((2, 5))
    with pytest.raises(ValueError, match=r"num_sequences=3 without sequence_ids, but the input "
                                         r"has 2 rows"):
        K.sequence_logps(logits, labels, num_sequences=3)


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a device synchronization on a GPU)."""

    SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
             "aten.nonzero", "aten.tolist")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SYNCS):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_value_checks_read_nothing_on_the_host(backend):
    """Label and sequence-id checks go through torch._assert_async (never a host read). The
    checks are also called directly: a dispatch mode does not see inside a custom op."""
    logits, labels = _inputs((2, 5), seed=6)
    labels[0, 0] = IGNORE
    ids = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    x = logits.clone().requires_grad_()
    with _SyncCounter() as counter:
        checks.check_label_range(labels, 10, IGNORE)
        checks.check_sequence_ids(ids, 3)
        seq = K.sequence_logps(x, labels, sequence_ids=ids, num_sequences=3, reduction="mean")
        seq.logps.sum().backward()
        K.token_logps(x * 1, labels, inplace_backward=True).sum().backward()
    assert counter.seen == []


# --------------------------------------------------------------------------- ugly values


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0,)], ids=["no-rows", "no-tokens", "empty-2d"])
def test_zero_token_batches(backend, shape):
    x = torch.randn(*shape, 11, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.long)
    seq = K.sequence_logps(x, labels, reduction="mean")
    rows = 1 if len(shape) == 1 else shape[0]
    assert seq.logps.shape == (rows,) and (seq.logps == 0).all() and (seq.num_tokens == 0).all()
    seq.logps.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_masked_rows_exact_zero(backend, reduction):
    logits, labels = _inputs((3, 4), seed=7)
    labels[1] = IGNORE
    logits[1, 2] = float("nan")  # what an ignored row holds never leaks out
    x = logits.clone().requires_grad_()
    seq = K.sequence_logps(x, labels, reduction=reduction)
    assert seq.logps[1].item() == 0.0 and seq.num_tokens[1].item() == 0
    seq.logps.sum().backward()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(seq.logps).all()


def test_neg_inf_at_non_label_positions_is_finite(backend):
    logits, labels = _inputs((6,), vocab=23, seed=8)
    logits[:, 1::2] = float("-inf")  # masked vocabulary entries
    labels = (labels // 2) * 2  # every label on a finite logit
    grad_out = torch.randn(6, generator=torch.Generator().manual_seed(1))
    ref, ref_grad = _reference(logits, labels, grad_out)
    x = logits.clone().requires_grad_()
    out = K.token_logps(x, labels)
    (out * grad_out).sum().backward()
    assert torch.isfinite(out).all()
    _assert_matches(out, ref, scale=1 + ref.abs(), what="forward")
    _assert_matches(x.grad, ref_grad, scale=grad_out.abs()[:, None] * 8, what="gradient")
    assert (x.grad[:, 1::2] == 0).all()


def test_neg_inf_at_the_label_gives_neg_inf_like_the_reference(backend):
    logits, labels = _inputs((4,), vocab=9, seed=9)
    logits[0, 3] = float("-inf")
    labels[0] = 3
    ref, ref_grad = _reference(logits, labels, torch.ones(4))
    x = logits.clone().requires_grad_()
    out = K.token_logps(x, labels)
    out[1:].sum().backward()  # the -inf row's own gradient: softmax terms, finite
    assert ref[0].item() == float("-inf") and out[0].item() == float("-inf")
    _assert_matches(out[1:], ref[1:], scale=1 + ref[1:].abs(), what="other rows")
    x.grad = None
    out = K.token_logps(x, labels)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    _assert_matches(x.grad, ref_grad, scale=torch.full_like(ref_grad, 8.0), what="gradient")


# --------------------------------------------------------------------------- strides


def test_expanded_logits_with_inplace_backward(backend):
    """Logits expanded over the batch share memory: the gradient goes to a fresh buffer."""
    base, labels = _inputs((1, 4), vocab=13, seed=10)
    labels = torch.cat([labels, labels.flip(-1)])
    leaf = base.clone().requires_grad_()
    x = (leaf * 1).expand(2, 4, 13)
    x.retain_grad()
    grad_out = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    out = K.token_logps(x, labels, inplace_backward=True)
    (out * grad_out).sum().backward()
    _, ref_grad = _reference(base.expand(2, 4, 13), labels, grad_out)
    _assert_matches(x.grad, ref_grad, scale=grad_out.abs()[..., None] * 8, what="d/dlogits")
    _assert_matches(leaf.grad, ref_grad.sum(0, keepdim=True), scale=torch.full_like(leaf, 16.0),
                    what="d/dbase")
    assert torch.equal(x.detach()[0], base[0])  # the logits were not overwritten


class _TinyLM(torch.nn.Module):
    """Embedding -> linear head: stands in for ``model(ids).logits``."""

    def __init__(self, vocab, hidden, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen).to(dtype))
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen).to(dtype))

    def forward(self, ids):
        return self.embed[ids] @ self.head.t()


def test_readme_example_shifted_logits(backend):
    """``logits = model(ids).logits[:, :-1]`` with the default out-of-place backward: the head's
    gradient equals the float64 model's."""
    vocab, hidden = 29, 8
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(12))
    labels = ids[:, 1:].clone()
    labels[0, :2] = IGNORE  # a prompt
    model, model64 = _TinyLM(vocab, hidden, torch.float32), _TinyLM(vocab, hidden, torch.float64)
    logits = model(ids)[:, :-1]
    assert logits.stride() == (7 * vocab, vocab, 1)  # not viewable as [N, V]
    seq = K.sequence_logps(logits, labels)
    (-seq.logps.sum()).backward()
    logits64 = model64(ids)[:, :-1]
    ref = token_logps_reference(logits64, labels, ignore_index=IGNORE).sum(-1)
    (-ref.sum()).backward()
    _assert_matches(seq.logps, ref.detach(), scale=1 + ref.detach().abs(), what="sequence logps")
    # d/dhead = sum over tokens of dlogits ⊗ h: bound by that sum of magnitudes
    h = model64.embed.detach()[ids[:, :-1]].abs().reshape(-1, hidden)
    scale = 8 * (torch.ones(h.shape[0], vocab, dtype=torch.float64).t() @ h)
    _assert_matches(model.head.grad, model64.head.grad, scale=scale, what="d/dhead")


# --------------------------------------------------------------------------- fused linear


def _linear_inputs():
    gen = torch.Generator().manual_seed(13)
    return (torch.randn(2, 3, 4, generator=gen), torch.randn(11, 4, generator=gen),
            torch.randint(0, 11, (2, 3), generator=gen))


@pytest.mark.parametrize("change, error, message", [
    (lambda h, w, y, kw: (h, w[:, :3], y, kw), ValueError,
     r"weight shape \(11, 3\) does not match hidden shape \(2, 3, 4\): expected weight of shape "
     r"\[V, 4\]"),
    (lambda h, w, y, kw: (h, w[None], y, kw), ValueError,
     r"weight must have shape \[V, H\], got \(1, 11, 4\)"),
    (lambda h, w, y, kw: (h[0, 0], w, y, kw), ValueError,
     r"hidden must have shape \[N, H\] or \[B, T, H\], got \(4,\)"),
    (lambda h, w, y, kw: (h, w.long(), y, kw), TypeError,
     r"weight must be float32, bfloat16, float16 or float64, got torch\.int64"),
    (lambda h, w, y, kw: (h.int(), w, y, kw), TypeError, r"hidden must be float32, .* got "
                                                         r"torch\.int32"),
    (lambda h, w, y, kw: (h, w, y, {"bias": torch.zeros(10)}), ValueError,
     r"bias shape \(10,\) does not match weight shape \(11, 4\): expected \(11,\)"),
    (lambda h, w, y, kw: (h, w, y, {"bias": [0.0] * 11}), TypeError,
     r"bias must be a tensor or None, got list"),
    (lambda h, w, y, kw: (h, w, y[:, :2], kw), ValueError,
     r"labels shape \(2, 2\) does not match hidden shape \(2, 3, 4\)"),
    (lambda h, w, y, kw: (h, w, y.float(), kw), TypeError, r"labels must be int64 or int32"),
    (lambda h, w, y, kw: (h, w, torch.full_like(y, 11), kw), ValueError,
     r"label 11 at position \(0, 0\) is outside \[0, 11\)"),
    (lambda h, w, y, kw: (h, w, y, {"temperature": float("inf")}), ValueError,
     r"temperature must be > 0 and finite, got inf"),
    (lambda h, w, y, kw: (h, w, y, {"temperature": float("nan")}), ValueError,
     r"temperature must be > 0 and finite, got nan"),
    (lambda h, w, y, kw: (h, w, y, {"temperature": True}), ValueError,
     r"temperature must be > 0 and finite \(a float\), got True of type bool"),
    (lambda h, w, y, kw: (h, w, y, {"reduction": "max"}), ValueError, r"unknown reduction 'max'"),
    (lambda h, w, y, kw: (h, w, y, {"sequence_ids": torch.tensor([[0, 0, 1], [1, 2, -1]]),
                                    "num_sequences": 2}), ValueError,
     r"sequence_ids 2 at position \(1, 1\) is outside \[-1, num_sequences=2\)"),
], ids=["weight-H", "weight-3d", "hidden-1d", "weight-dtype", "hidden-dtype", "bias-shape",
        "bias-list", "labels-shape", "labels-dtype", "label-range", "temperature-inf",
        "temperature-nan", "temperature-bool", "reduction", "sequence-ids"])
def test_linear_sequence_logps_validation(change, error, message):
    hidden, weight, labels, kwargs = change(*_linear_inputs(), {})
    with pytest.raises(error, match=message):
        K.linear_sequence_logps(hidden, weight, labels, **kwargs)
