"""fastpo's fused hidden-state loss modules against the chunked fused-linear loss modules they are
call-compatible with: the same inputs through both, the same loss, aux outputs and gradients for
the hidden states, the head weight and its bias (fp32, tight tolerance). Then what only fastpo
has: IPO and other TRL loss types, weighted loss lists, precomputed reference log-probs."""

from __future__ import annotations

# liger-kernel is a dev dependency (setup.py): without it this module fails, it is not skipped.
import liger_kernel.chunked_loss as chunked
import pytest
import torch

from fastpo.engine.losses import preference_loss
from fastpo.engine.losses.fused_linear import fused_linear_dpo_loss, fused_linear_kto_loss
from fastpo.engine.losses.modules import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from fastpo.kernels import linear_sequence_logps

B, T, H, V = 3, 7, 16, 37
TOL = {"rtol": 1e-5, "atol": 1e-6}
# A gradient entry is an fp32 sum of per-token terms as large as the largest entries; one that
# cancels to near zero keeps their rounding error (~ulp · ‖g‖∞) in absolute terms. Hence the
# gradients' atol: 1e-6, or 2 fp32 ulps (2.4e-7) of ‖g‖∞ where that is larger. Only sppo_hard,
# whose summed log-ratios make ‖grad weight‖∞ ≈ 10, reaches it: there Liger and fastpo differ by
# 1.4e-6 at one entry of 0.02, and lie 1.5e-6 and 4.1e-6 from a float64 evaluation.
GRAD_ULPS = 2 * torch.finfo(torch.float32).eps
DPO_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
             "apo_zero", "apo_down", "discopop")
KTO_LABELS = (True, False, True, True, False, False)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """2B rows (chosen then rejected): a prompt of 1-3 ignored tokens per row, row 4 padded."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (2 * B, T), generator=g)
    for row in range(2 * B):
        target[row, : 1 + row % 3] = -100
    target[4, 4:] = -100
    return {
        "x": torch.randn(2 * B, T, H, generator=g),
        "w": torch.randn(V, H, generator=g) * 0.3,
        "b": torch.randn(V, generator=g) * 0.3,
        "target": target,
        "rx": torch.randn(2 * B, T, H, generator=g),
        "rw": torch.randn(V, H, generator=g) * 0.3,
        "rb": torch.randn(V, generator=g) * 0.3,
    }


def run(call, data, *, bias: bool):
    """(loss, aux, grads) of ``call(x, w, b)`` with fresh leaf tensors."""
    x = data["x"].clone().requires_grad_()
    w = data["w"].clone().requires_grad_()
    b = data["b"].clone().requires_grad_() if bias else None
    loss, aux = call(x, w, b)
    loss.backward()
    grads = (x.grad, w.grad) + ((b.grad,) if bias else ())
    return loss, aux, grads


def assert_same(expected, actual):
    loss_e, aux_e, grads_e = expected
    loss_a, aux_a, grads_a = actual
    torch.testing.assert_close(loss_a, loss_e, **TOL)
    assert len(aux_a) == len(aux_e)
    for i, (a, e) in enumerate(zip(aux_a, aux_e)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, i=i: f"aux[{i}]: {m}")
        assert not a.requires_grad
    for name, a, e in zip(("_input", "weight", "bias"), grads_a, grads_e):
        atol = max(TOL["atol"], GRAD_ULPS * e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=TOL["rtol"], atol=atol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", DPO_TYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_ref", [True, False])
def test_dpo_matches(loss_type, bias, use_ref):
    data = make_batch(1)
    # ε = 0.1 everywhere: robust and exo_pair use it, the others ignore it (sigmoid included).
    opts = {"beta": 0.2, "loss_type": loss_type, "label_smoothing": 0.1, "use_ref_model": use_ref,
            "compute_nll_loss": True, "alpha": 0.7}
    ref = (data["rx"], data["rw"], data["rb"] if bias else None) if use_ref else (None,) * 3

    def call(module):
        return lambda x, w, b: module(w, x, data["target"], b, *ref)

    expected = run(call(chunked.LigerFusedLinearDPOLoss(compiled=False, **opts)), data, bias=bias)
    assert_same(expected, run(call(FusedLinearDPOLoss(**opts)), data, bias=bias))


@pytest.mark.parametrize("average_log_prob", [True, False])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_dpo_options_match(average_log_prob, compute_nll_loss):
    data = make_batch(2)
    opts = {"average_log_prob": average_log_prob, "compute_nll_loss": compute_nll_loss,
            "beta": 0.5, "ignore_index": -100}

    def call(module):
        return lambda x, w, b: module(w, x, data["target"], b, data["rx"], data["rw"], data["rb"])

    expected = run(call(chunked.LigerFusedLinearDPOLoss(compiled=False, **opts)), data, bias=True)
    assert_same(expected, run(call(FusedLinearDPOLoss(**opts)), data, bias=True))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("own_nll_target", [True, False])
def test_orpo_matches(bias, compute_nll_loss, own_nll_target):
    data = make_batch(3)
    nll_target = None
    if own_nll_target:  # score the prompt too in the NLL, except on row 0
        nll_target = data["target"].clone()
        nll_target[1:, :2] = torch.arange(2)
    opts = {"beta": 0.3, "compute_nll_loss": compute_nll_loss}

    def call(module):
        return lambda x, w, b: module(w, x, data["target"], b, nll_target)

    expected = run(call(chunked.LigerFusedLinearORPOLoss(compiled=False, **opts)), data, bias=bias)
    assert_same(expected, run(call(FusedLinearORPOLoss(**opts)), data, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average_log_prob", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo_matches(bias, average_log_prob, label_smoothing):
    data = make_batch(4)
    opts = {"beta": 0.2, "alpha": 0.5, "label_smoothing": label_smoothing,
            "average_log_prob": average_log_prob}

    def call(module):
        return lambda x, w, b: module(w, x, data["target"], b)

    expected = run(call(chunked.LigerFusedLinearCPOLoss(compiled=False, **opts)), data, bias=bias)
    assert_same(expected, run(call(FusedLinearCPOLoss(**opts)), data, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_simpo_matches(bias, compute_nll_loss):
    data = make_batch(5)
    opts = {"beta": 2.0, "gamma": 0.3, "label_smoothing": 0.1, "alpha": 0.4,
            "compute_nll_loss": compute_nll_loss}

    def call(module):
        return lambda x, w, b: module(w, x, data["target"], b)

    expected = run(call(chunked.LigerFusedLinearSimPOLoss(compiled=False, **opts)), data,
                   bias=bias)
    assert_same(expected, run(call(FusedLinearSimPOLoss(**opts)), data, bias=bias))
    # SimPO is CPO's simpo loss type on per-token averages
    cpo = FusedLinearCPOLoss(loss_type="simpo", simpo_gamma=0.3, average_log_prob=True,
                             **{k: v for k, v in opts.items() if k != "gamma"})
    assert_same(expected, run(call(cpo), data, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_ref", [True, False])
@pytest.mark.parametrize("kl", [None, 0.2])
@pytest.mark.parametrize("average_log_prob", [True, False])
def test_kto_matches(bias, use_ref, kl, average_log_prob):
    data = make_batch(6)
    labels = torch.tensor(KTO_LABELS)
    kl_t = None if kl is None else torch.tensor(kl)
    ref = (data["rx"], data["rw"], data["rb"] if bias else None) if use_ref else (None,) * 3
    opts = {"beta": 0.3, "use_ref_model": use_ref, "average_log_prob": average_log_prob}

    def call(module):
        return lambda x, w, b: module(x, w, data["target"], b, labels, *ref, kl_t)

    expected = run(call(chunked.LigerFusedLinearKTOLoss(compiled=False, **opts)), data, bias=bias)
    assert_same(expected, run(call(FusedLinearKTOLoss(**opts)), data, bias=bias))


# ----------------------------------------------------------------------------------------------
# fastpo-only features
# ----------------------------------------------------------------------------------------------
def _policy_and_ref(data):
    """Per-sequence policy log-probs (with gradient) and float64 reference log-probs."""
    x = data["x"].clone().requires_grad_()
    w = data["w"].clone().requires_grad_()
    pol = linear_sequence_logps(x, w, data["target"], bias=data["b"])
    ref = linear_sequence_logps(data["rx"].double(), data["rw"].double(), data["target"],
                                bias=data["rb"].double()).logps
    return x, w, pol, ref


def test_ipo_matches_preference_loss_with_float64_reference():
    """The module (loss-fused: its own fp32 GEMMs, so equal to fp32 rounding) and the logps
    design (the same computation as preference_loss on the op's log-probs: equal to 1e-12)."""
    data = make_batch(7)
    x, w, pol, ref = _policy_and_ref(data)
    out = preference_loss(pol.logps[:B], pol.logps[B:], ref[:B], ref[B:], loss_type="ipo",
                          beta=0.4, chosen_num_tokens=pol.num_tokens[:B],
                          rejected_num_tokens=pol.num_tokens[B:])
    out.loss.backward()
    expected = (out.loss, x.grad, w.grad, out.chosen_rewards, out.rejected_rewards)

    x2 = data["x"].clone().requires_grad_()
    w2 = data["w"].clone().requires_grad_()
    loss, aux = FusedLinearDPOLoss(loss_type="ipo", beta=0.4)(
        w2, x2, data["target"], data["b"], ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    loss.backward()
    assert loss.dtype == torch.float64  # the float64 reference keeps the loss in float64
    assert_same((expected[0], expected[3:], expected[1:3]), (loss, aux[5:], (x2.grad, w2.grad)))

    x3 = data["x"].clone().requires_grad_()
    w3 = data["w"].clone().requires_grad_()
    loss, aux = fused_linear_dpo_loss(x3, w3, data["target"], data["b"], loss_type="ipo",
                                      beta=0.4, ref_chosen_logps=ref[:B],
                                      ref_rejected_logps=ref[B:], design="logps")
    loss.backward()
    assert loss.dtype == torch.float64
    for a, e in zip((loss, x3.grad, w3.grad, aux[5], aux[6]), expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_loss_list_and_weights_match_preference_loss():
    data = make_batch(8)
    x, w, pol, ref = _policy_and_ref(data)
    types, weights = ["sigmoid", "ipo", "sft", "robust"], [1.0, 0.5, 0.2, 0.3]
    kw = {"beta": 0.2, "chosen_num_tokens": pol.num_tokens[:B],
          "rejected_num_tokens": pol.num_tokens[B:]}
    args = (pol.logps[:B], pol.logps[B:], ref[:B], ref[B:])
    # sigmoid is not smoothed, robust is (ipo and sft ignore ε; grouped as the function does,
    # so that the float64 sums round alike)
    expected = (preference_loss(*args, loss_type=types[:1], loss_weights=weights[:1],
                                label_smoothing=0.0, **kw).loss
                + preference_loss(*args, loss_type=types[1:], loss_weights=weights[1:],
                                  label_smoothing=0.1, **kw).loss)
    expected.backward()
    x2 = data["x"].clone().requires_grad_()
    w2 = data["w"].clone().requires_grad_()
    loss, _ = fused_linear_dpo_loss(x2, w2, data["target"], data["b"], loss_type=types,
                                    loss_weights=weights, label_smoothing=0.1, beta=0.2,
                                    ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2.grad, w.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("average_log_prob", [True, False])
def test_precomputed_reference_equals_reference_hidden_states(average_log_prob):
    data = make_batch(9)
    module = FusedLinearDPOLoss(average_log_prob=average_log_prob, loss_type=["sigmoid", "ipo"])
    from_hidden = run(lambda x, w, b: module(w, x, data["target"], b, data["rx"], data["rw"],
                                             data["rb"]), data, bias=True)
    ref = linear_sequence_logps(data["rx"], data["rw"], data["target"], bias=data["rb"],
                                reduction="mean" if average_log_prob else "sum").logps
    given = run(lambda x, w, b: module(w, x, data["target"], b, ref_chosen_logps=ref[:B],
                                       ref_rejected_logps=ref[B:]), data, bias=True)
    assert_same(from_hidden, given)

    labels = torch.tensor(KTO_LABELS)
    kto = FusedLinearKTOLoss(use_ref_model=True, average_log_prob=average_log_prob)
    from_hidden = run(lambda x, w, b: kto(x, w, data["target"], b, labels, data["rx"],
                                          data["rw"], data["rb"], 0.1), data, bias=True)
    given = run(lambda x, w, b: kto(x, w, data["target"], b, labels, kl=0.1, ref_logps=ref),
                data, bias=True)
    assert_same(from_hidden, given)


def test_kto_negative_kl_is_clamped_to_zero():
    # z₀ = max(0, kl) as in kto_loss (TRL clamps it before it reaches the chunked loss, which
    # would take a negative value as given)
    data = make_batch(12)
    labels = torch.tensor(KTO_LABELS)
    kto = FusedLinearKTOLoss()
    at_zero = run(lambda x, w, b: kto(x, w, data["target"], b, labels), data, bias=False)
    negative = run(lambda x, w, b: kto(x, w, data["target"], b, labels, kl=torch.tensor(-0.3)),
                   data, bias=False)
    assert_same(at_zero, negative)
    positive = kto(data["x"], data["w"], data["target"], None, labels, kl=0.3)[0]
    assert not torch.allclose(positive, at_zero[0])


def test_row_without_scored_tokens_gives_zero_average_not_nan():
    data = make_batch(10)
    target = data["target"].clone()
    target[1] = -100
    loss, aux = FusedLinearDPOLoss(average_log_prob=True, compute_nll_loss=True)(
        data["w"], data["x"], target, None, data["rx"], data["rw"])
    assert torch.isfinite(loss)
    assert aux[0][1] == 0


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: FusedLinearDPOLoss(loss_type="nope"), ValueError, "unknown loss_type"),
    (lambda: FusedLinearDPOLoss(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError,
     "loss_weights has 1"),
    (lambda: FusedLinearDPOLoss(loss_type="exo_pair"), ValueError, "label_smoothing"),
    (lambda: FusedLinearDPOLoss(loss_type="sft", average_log_prob=True), ValueError, "sft"),
    (lambda: FusedLinearDPOLoss(beta=0.0), ValueError, "beta"),
    (lambda: FusedLinearDPOLoss(compiled="yes"), TypeError, "compiled"),
    (lambda: FusedLinearORPOLoss(chunk_size=0), ValueError, "chunk_size"),
    (lambda: FusedLinearCPOLoss(loss_type="alphapo"), ValueError, "loss_type"),
    (lambda: FusedLinearSimPOLoss(alpha=float("nan")), ValueError, "alpha"),
    (lambda: FusedLinearKTOLoss(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs():
    d = make_batch(11)
    x, w, y = d["x"], d["w"], d["target"]
    dpo = FusedLinearDPOLoss()
    with pytest.raises(ValueError, match="2B rows"):
        dpo(w, x[:5], y[:5], None, d["rx"][:5], d["rw"])
    with pytest.raises(ValueError, match="target shape"):
        dpo(w, x, y[:, :5], None, d["rx"], d["rw"])
    with pytest.raises(ValueError, match=r"_input must have shape \[2B, T, H\]"):
        dpo(w, x.reshape(-1, H), y.reshape(-1), None, d["rx"], d["rw"])
    with pytest.raises(ValueError, match="needs ref_input and ref_weight"):
        dpo(w, x, y)
    with pytest.raises(ValueError, match="not both"):
        dpo(w, x, y, None, d["rx"], d["rw"], ref_chosen_logps=torch.zeros(B),
            ref_rejected_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape"):
        dpo(w, x, y, ref_chosen_logps=torch.zeros(2 * B), ref_rejected_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="use_ref_model=False"):
        FusedLinearDPOLoss(use_ref_model=False)(w, x, y, None, d["rx"], d["rw"])
    with pytest.raises(ValueError, match="nll_target shape"):
        FusedLinearORPOLoss()(w, x, y, None, y[:B])
    kto = FusedLinearKTOLoss()
    with pytest.raises(ValueError, match="preference_labels is required"):
        kto(x, w, y)
    with pytest.raises(TypeError, match="preference_labels must be a bool"):
        kto(x, w, y, None, torch.ones(2 * B))
    with pytest.raises(ValueError, match=r"preference_labels must have shape \(6,\)"):
        kto(x, w, y, None, torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError, match="kl must be"):
        fused_linear_kto_loss(x, w, y, torch.ones(2 * B, dtype=torch.bool), kl=torch.zeros(3),
                              use_ref_model=False)
