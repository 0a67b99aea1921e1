"""The fused-linear preference losses' two designs (``engine/losses/fused_linear_paths.py``).

"loss-fused" (the loss inside the op, every gradient made in the forward, chunk by chunk of whole
pairs) against "logps" (the op's log-probs, autograd through the loss): the same loss, aux and
gradients of hidden, weight and bias for every loss that decomposes over pairs, with chunks of
one pair so that the batch-level divisors (number of pairs, the batch's scored chosen tokens) are
crossed; against a float64 evaluation on half-precision inputs; which losses "auto" sends where;
no host synchronization in a call.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sync_counter import SyncCounter
from test_liger_parity import GRAD_ULPS, KTO_LABELS, B, V, assert_same, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpo.engine.losses import fused_linear as fl
from fastpo.engine.losses import fused_linear_paths
from fastpo.kernels import linear_logprobs_cost, linear_logprobs_loss_fused

BF16_RTOL = 2.0**-7  # the gradient is cast once to the input dtype


@pytest.fixture
def one_pair_chunks(monkeypatch):
    """A memory budget below one pair's logits: every chunk holds exactly one pair (KTO: one
    example), so each batch is split at every pair boundary."""
    monkeypatch.setattr(linear_logprobs_loss_fused, "BUDGET_BYTES", 1)


def ugly_batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """make_batch (V = 37, prompts, a padded row) with a fully masked chosen sequence."""
    data = make_batch(seed)
    data["target"][1] = -100
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def run(fn, data, *, bias=True, dtype=None, **kw):
    """(loss, aux, grads) of ``fn(x, w, target, b, **kw)`` with fresh leaves."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    x = cast(data["x"]).clone().requires_grad_()
    w = cast(data["w"]).clone().requires_grad_()
    b = cast(data["b"]).clone().requires_grad_() if bias else None
    loss, aux = fn(x, w, data["target"], b, **kw)
    loss.backward()
    return loss, aux, (x.grad, w.grad) + ((b.grad,) if bias else ())


def both_designs(fn, data, **kw):
    fused = run(fn, data, design="loss-fused", **kw)
    assert type(fused[0].grad_fn).__name__ == "_LossFusedLinearBackward"
    logps = run(fn, data, design="logps", **kw)
    assert type(logps[0].grad_fn).__name__ != "_LossFusedLinearBackward"
    assert_same(logps, fused)
    return fused


def _ref(data):
    """Reference hidden states as positional (ref_input, ref_weight, ref_bias)."""
    return {"ref_input": data["rx"], "ref_weight": data["rw"], "ref_bias": data["rb"]}


DPO_CASES = [
    {"loss_type": "sigmoid"},
    {"loss_type": "ipo", "beta": 0.4},
    {"loss_type": "sigmoid", "compute_nll_loss": True, "alpha": 0.7},
    {"loss_type": ["sigmoid", "robust", "bco_pair"], "loss_weights": [1.0, 0.5, 0.3],
     "label_smoothing": 0.1},
    {"loss_type": ["apo_zero", "sigmoid_norm", "discopop"], "average_log_prob": True},
    {"loss_type": "hinge", "use_ref_model": False, "compute_nll_loss": True},
    {"loss_type": "sppo_hard", "precomputed": True},
]


@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: str(c["loss_type"]))
def test_dpo_designs_agree(case, one_pair_chunks):
    data = ugly_batch(1)
    case = dict(case)
    extra = {}
    if case.pop("precomputed", False):
        ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(3)) * 5
        extra = {"ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    elif case.get("use_ref_model", True):
        extra = _ref(data)
    both_designs(fl.fused_linear_dpo_loss, data, **case, **extra)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_cpo_designs_agree(loss_type, average_log_prob, one_pair_chunks):
    both_designs(fl.fused_linear_cpo_loss, ugly_batch(2), loss_type=loss_type,
                 average_log_prob=average_log_prob, label_smoothing=0.1, alpha=0.5)


def test_simpo_orpo_and_kto_designs_agree(one_pair_chunks):
    data = ugly_batch(3)
    both_designs(fl.fused_linear_simpo_loss, data, compute_nll_loss=True, gamma=0.3)
    aux = both_designs(fl.fused_linear_orpo_loss, data, beta=0.2)[1]
    assert len(aux) == 9
    labels = torch.tensor(KTO_LABELS)
    for average in (False, True):
        both_designs(lambda x, w, t, b, **kw: fl.fused_linear_kto_loss(
            x, w, t, labels, b, data["rx"], data["rw"], data["rb"], 0.2, **kw), data,
            average_log_prob=average)


def test_module_forms_take_the_design_of_the_functional_form():
    """Each module passes its ``design`` keyword to its functional form (the same loss and
    gradients either way), and an unknown design fails at construction."""
    from fastpo.engine.losses import modules

    data = ugly_batch(4)
    labels = torch.tensor(KTO_LABELS)
    forms = {
        "dpo": lambda d: lambda x, w, t, b: modules.FusedLinearDPOLoss(
            use_ref_model=False, design=d)(w, x, t, b),
        "orpo": lambda d: lambda x, w, t, b: modules.FusedLinearORPOLoss(design=d)(w, x, t, b),
        "cpo": lambda d: lambda x, w, t, b: modules.FusedLinearCPOLoss(design=d)(w, x, t, b),
        "simpo": lambda d: lambda x, w, t, b: modules.FusedLinearSimPOLoss(design=d)(w, x, t, b),
        "kto": lambda d: lambda x, w, t, b: modules.FusedLinearKTOLoss(design=d)(
            x, w, t, b, labels),
    }
    for name, form in forms.items():
        fused, logps = run(form("loss-fused"), data), run(form("logps"), data)
        assert type(fused[0].grad_fn).__name__ == "_LossFusedLinearBackward", name
        assert type(logps[0].grad_fn).__name__ != "_LossFusedLinearBackward", name
        assert_same(logps, fused)
    for cls in (modules.FusedLinearDPOLoss, modules.FusedLinearORPOLoss,
                modules.FusedLinearCPOLoss, modules.FusedLinearSimPOLoss,
                modules.FusedLinearKTOLoss):
        with pytest.raises(ValueError, match="design must be one of"):
            cls(design="fused")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_fused_half_inputs_match_float64(dtype, one_pair_chunks):
    """Half-precision hidden states and head (odd V = 37, a fully masked chosen sequence, bias):
    loss and aux against the same loss in float64 from the same values, gradients to one
    rounding to the input dtype."""
    data = ugly_batch(4, dtype)
    kw = {"loss_type": ["sigmoid", "ipo"], "compute_nll_loss": True, **_ref(data)}
    got = run(fl.fused_linear_dpo_loss, data, design="loss-fused", **kw)
    kw64 = {**kw, **{k: v.double() for k, v in _ref(data).items()}}
    want = run(fl.fused_linear_dpo_loss, data, dtype=torch.float64, design="logps", **kw64)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for i, (a, e) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=2e-5,
                                   msg=lambda m, i=i: f"aux[{i}]: {m}")
    assert torch.equal(got[1][0][1], torch.zeros((), dtype=torch.float32))  # masked: π = 0
    for name, a, e in zip(("hidden", "weight", "bias"), got[2], want[2]):
        assert a.dtype == dtype
        atol = max(1e-6, GRAD_ULPS * e.abs().max().item())
        torch.testing.assert_close(a.double(), e, rtol=BF16_RTOL, atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_auto_picks_the_design_each_loss_allows():
    data = ugly_batch(5)
    ref = _ref(data)

    def grad_fn(fn, **kw):
        x = data["x"].clone().requires_grad_()
        return type(fn(x, data["w"], data["target"], None, **kw)[0].grad_fn).__name__

    fused = "_LossFusedLinearBackward"
    forced = dict(design="loss-fused")
    assert grad_fn(fl.fused_linear_dpo_loss, loss_type=["sigmoid", "nca_pair"], **forced,
                   **ref) == fused
    assert grad_fn(fl.fused_linear_cpo_loss, **forced) == fused
    assert grad_fn(fl.fused_linear_orpo_loss, **forced) == fused
    # CPU tensors: "auto" keeps the op's chunked path (measured faster and leaner on CPU)
    assert grad_fn(fl.fused_linear_dpo_loss, loss_type="sigmoid", **ref) != fused
    assert grad_fn(fl.fused_linear_cpo_loss) != fused
    for types in ("aot", "aot_unpaired", ["sigmoid", "sft"]):
        assert grad_fn(fl.fused_linear_dpo_loss, loss_type=types, **ref) != fused
        with pytest.raises(ValueError, match="couples the pairs"):
            grad_fn(fl.fused_linear_dpo_loss, loss_type=types, design="loss-fused", **ref)
    nll_target = data["target"].clone()
    nll_target[:, :2] = -100
    assert grad_fn(lambda *a, **k: fl.fused_linear_orpo_loss(*a, nll_target, **k)) != fused
    with pytest.raises(ValueError, match="design must be one of"):
        grad_fn(fl.fused_linear_cpo_loss, design="fast")


def test_auto_follows_the_cost_model_on_cuda():
    """"auto" on CUDA takes the loss-fused design where the roofline model predicts it faster
    than the op + loss (the 8B head × 32k tokens), not where it predicts it slower (a 135M
    model's head × 4k tokens); never on CPU."""
    from fastpo.engine.losses.fused_linear_inputs import prefer_loss_fused
    from fastpo.kernels.linear_logprobs_roofline import Shape

    big = Shape(tokens=32768, hidden=4096, vocab=128256, unit_tokens=2048)
    small = Shape(tokens=4096, hidden=576, vocab=49152, unit_tokens=1024)
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        assert prefer_loss_fused(big, "cuda", name)
        assert not prefer_loss_fused(small, "cuda", name)
    assert not prefer_loss_fused(big, "cpu", None)


def test_aot_on_the_logps_design_still_matches_a_whole_batch_evaluation():
    """The sorting losses are exact because they never see a chunk: the call's loss equals the
    loss of its own per-sequence log-probs, evaluated on the whole batch."""
    data = ugly_batch(6)
    both = [run(fl.fused_linear_dpo_loss, data, loss_type="aot", label_smoothing=0.1,
                design=d, **_ref(data)) for d in ("auto", "logps")]
    assert_same(both[1], both[0])


def test_a_call_does_not_synchronize():
    """Forward + backward of the loss-fused DPO and KTO losses, batch divisors and aux included:
    no scalar read, no copy to the host, no output size read from the device. (The reference
    log-probs are given: from reference hidden states they come from the op's forward, whose
    CPU-only path selects rows with ``nonzero``, see tests/engine/train/test_host_syncs.py.)"""
    data = ugly_batch(7)
    labels = torch.tensor(KTO_LABELS)
    ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(3))

    def call():
        run(fl.fused_linear_dpo_loss, data, compute_nll_loss=True, loss_type=["sigmoid", "ipo"],
            ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:], design="loss-fused")
        run(lambda x, w, t, b: fl.fused_linear_kto_loss(x, w, t, labels, b, kl=0.1,
                                                         use_ref_model=False,
                                                         design="loss-fused"), data)

    call()
    with SyncCounter(data_dependent=True) as counter:
        call()
    assert counter.hits == [], counter.hits
    assert V % 2 == 1  # the odd vocabulary this file relies on


class _OpCount(TorchDispatchMode):
    """ATen ops that launch work (views and metadata ops left out)."""

    VIEWS = frozenset({"view", "_unsafe_view", "slice", "expand", "t", "transpose", "unsqueeze",
                       "squeeze", "select", "alias", "detach", "as_strided", "reshape",
                       "lift_fresh"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in self.VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_chunk_loss_launches_fit_the_cost_model(monkeypatch, one_pair_chunks):
    """The cost model charges CHUNK_LOSS_LAUNCHES small kernels per loss-fused chunk: the sigmoid
    DPO chunk loss with its NLL term and its autograd gradient, plus the driver's dozen (sums,
    copies, the per-token upstream gradient, the loss sum), fit in it."""
    counts = []
    inner = fused_linear_paths.loss_fused_linear

    def counting_driver(hidden, weight, target, chunk_loss, **kw):
        def counted(chunk):
            with _OpCount() as mode:
                part = chunk_loss(chunk)
                torch.autograd.grad(part, chunk.logps, retain_graph=True)
            counts.append(sum(mode.ops.values()))
            return part

        return inner(hidden, weight, target, counted, **kw)

    monkeypatch.setattr(fused_linear_paths, "loss_fused_linear", counting_driver)
    data = ugly_batch(8)
    ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(3))
    run(fl.fused_linear_dpo_loss, data, compute_nll_loss=True, ref_chosen_logps=ref[:B],
        ref_rejected_logps=ref[B:], design="loss-fused")
    assert len(counts) == B  # one chunk per pair
    assert 0 < max(counts) <= linear_logprobs_cost.CHUNK_LOSS_LAUNCHES - 12, counts
