"""DPO-family losses (``preference_loss``): every loss type and f-divergence against the
independent double-precision references of ``loss_references``, extreme inputs, gradients, the
absence of host reads, and bad input."""

from __future__ import annotations

import random

import pytest
import torch

from fastpo.engine.losses import LOSS_TYPES, cpo_loss, kto_loss, orpo_loss, preference_loss
from fastpo.engine.losses.weighting import shared_length_tail_logps

try:  # the references sit next to the tests; works with or without package-style test dirs
    from .loss_references import (
        BETA,
        dpo,
        extreme_batch,
        finite_grads,
        moderate_batch,
        ref_dpo,
        smoothing_for,
        tensors,
    )
except ImportError:
    from loss_references import (
        BETA,
        dpo,
        extreme_batch,
        finite_grads,
        moderate_batch,
        ref_dpo,
        smoothing_for,
        tensors,
    )


# ----------------------------------------------------------------------------------------------
# every DPO loss type
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_dpo_loss_matches_reference(loss_type):
    batch = moderate_batch()
    eps = smoothing_for(loss_type)
    out = dpo(loss_type, tensors(batch), label_smoothing=eps)
    expected = torch.tensor(ref_dpo(loss_type, **batch, eps=eps), dtype=torch.float64)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_dpo_loss_extreme_logps_finite_and_exact(loss_type):
    batch = extreme_batch()
    eps = smoothing_for(loss_type)
    x = tensors(batch, dtype=torch.float32, grad=True)
    out = dpo(loss_type, x, label_smoothing=eps)
    out.loss.backward()
    expected = torch.tensor(ref_dpo(loss_type, **batch, eps=eps), dtype=torch.float64)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    assert finite_grads(x["pc"], x["pr"])
    torch.testing.assert_close(out.losses.double(), expected, rtol=2e-6, atol=1e-6)


def test_dpo_gradients_match_finite_differences():
    # every loss type at once, each with its own weight, against central differences
    x = tensors(moderate_batch(5, seed=3))
    types = [t for t in LOSS_TYPES if t != "exo_pair"]
    weights = [1.0 + 0.1 * i for i in range(len(types))]

    def f(pc, pr, rc, rr):
        common = {"chosen_num_tokens": x["nc"], "rejected_num_tokens": x["nr"]}
        smoothed = preference_loss(
            pc, pr, rc, rr, loss_type="exo_pair", label_smoothing=1e-3, **common
        )
        rest = preference_loss(
            pc, pr, rc, rr, loss_type=types, loss_weights=weights, label_smoothing=0.1, **common
        )
        return smoothed.loss + rest.loss

    inputs = tuple(x[k].clone().requires_grad_(True) for k in ("pc", "pr", "rc", "rr"))
    assert torch.autograd.gradcheck(f, inputs)


NEAR_ZERO_TYPES = [t for t in LOSS_TYPES if t not in ("discopop", "sft", "apo_down")]


@pytest.mark.parametrize("loss_type", NEAR_ZERO_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # log-ratios near 0: inside every margin (hinge, ipo, sppo), where each loss prefers chosen
    rng = random.Random(5)
    n = 6
    ref_c = [-rng.uniform(5, 30) for _ in range(n)]
    ref_r = [-rng.uniform(5, 30) for _ in range(n)]
    batch = {
        "pc": [v + rng.uniform(-1, 1) for v in ref_c],
        "pr": [v + rng.uniform(-1, 1) for v in ref_r],
        "rc": ref_c,
        "rr": ref_r,
        "nc": [7] * n,
        "nr": [9] * n,
    }
    x = tensors(batch, grad=True)
    dpo(loss_type, x, label_smoothing=smoothing_for(loss_type)).loss.backward()
    assert (x["pc"].grad < 0).all(), x["pc"].grad
    assert (x["pr"].grad > 0).all(), x["pr"].grad


def test_gradient_direction_sft_apo_down_discopop():
    x = tensors(moderate_batch(), grad=True)
    dpo("sft", x).loss.backward()
    assert (x["pc"].grad < 0).all() and x["pr"].grad is None  # the NLL ignores rejected
    # APO-down lowers the rejected completion (more than the chosen one)
    x = tensors(moderate_batch(), grad=True)
    dpo("apo_down", x).loss.backward()
    assert (x["pr"].grad > 0).all()
    # DiscoPOP is not monotone near Δ = 0; away from it, it prefers chosen
    for delta in (-8.0, -3.0, 5.0, 12.0):
        pc = torch.tensor([-10.0 + delta], dtype=torch.float64, requires_grad=True)
        pr = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
        ref = torch.tensor([-10.0], dtype=torch.float64)
        preference_loss(pc, pr, ref, ref, loss_type="discopop").loss.backward()
        assert pc.grad.item() < 0 < pr.grad.item(), delta


# ----------------------------------------------------------------------------------------------
# f-divergences
# ----------------------------------------------------------------------------------------------
F_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_TYPES)
def test_f_divergence_matches_reference(fdiv, loss_type):
    batch = moderate_batch(seed=1)
    eps = smoothing_for(loss_type)
    a = 0.3
    out = dpo(
        loss_type,
        tensors(batch),
        label_smoothing=eps,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=a,
    )
    expected = ref_dpo(loss_type, **batch, eps=eps, fdiv=fdiv, a=a)
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    # rewards stay β · log-ratio whatever the divergence
    rho = [batch["pc"][i] - batch["rc"][i] for i in range(7)]
    torch.testing.assert_close(out.chosen_rewards, BETA * torch.tensor(rho, dtype=torch.float64))


def test_alpha_divergence_limits():
    x = tensors(moderate_batch(seed=2))
    forward = dpo("sigmoid", x, f_divergence_type="forward_kl").losses
    reverse = dpo("sigmoid", x).losses
    alpha1 = dpo("sigmoid", x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    alpha0 = dpo("sigmoid", x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0)
    torch.testing.assert_close(alpha1.losses, forward)
    torch.testing.assert_close(alpha0.losses, reverse)
    near0 = dpo("sigmoid", x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e-7)
    torch.testing.assert_close(near0.losses, reverse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_extreme_logps_finite(fdiv):
    x = tensors(extreme_batch(), dtype=torch.float32, grad=True)
    out = dpo(["sigmoid", "ipo", "discopop"], x, f_divergence_type=fdiv)
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    assert finite_grads(x["pc"], x["pr"])


# ----------------------------------------------------------------------------------------------
# no host synchronization: everything runs on meta tensors, which refuse to be read
# ----------------------------------------------------------------------------------------------
def test_no_host_reads_meta_device():
    m = {"device": "meta", "dtype": torch.float32}
    pc = torch.empty(6, **m, requires_grad=True)
    pr, rc, rr, lc, lr = (torch.empty(6, **m) for _ in range(5))
    n = torch.empty(6, device="meta", dtype=torch.int64)
    kw = {"chosen_num_tokens": n, "rejected_num_tokens": n}
    outs = [
        preference_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=list(LOSS_TYPES),
            label_smoothing=0.1,
            chosen_logits_sum=lc,
            rejected_logits_sum=lr,
            vocab_size=9,
            **kw,
        ),
        preference_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=["sigmoid", "ipo"],
            use_weighting=True,
            chosen_log_sum_sq_probs=lc,
            rejected_log_sum_sq_probs=lr,
            ld_alpha=0.5,
            policy_chosen_tail_logps=lc,
            policy_rejected_tail_logps=lr,
            ref_chosen_tail_logps=lc,
            ref_rejected_tail_logps=lr,
            f_divergence_type="js_divergence",
            **kw,
        ),
        cpo_loss(pc, pr, loss_type="simpo", alpha=0.3, **kw),
        orpo_loss(pc, pr, chosen_logits_sum=lc, rejected_logits_sum=lr, vocab_size=9, **kw),
        kto_loss(
            pc,
            rc,
            torch.empty(6, device="meta", dtype=torch.bool),
            policy_kl_logps=pr,
            ref_kl_logps=rr,
            num_tokens=n,
            logits_sum=lc,
            vocab_size=9,
        ),
    ]
    sum(o.loss for o in outs).backward()
    assert pc.grad is not None and pc.grad.device.type == "meta"
    with pytest.raises(RuntimeError):  # the check has teeth: a host read fails on meta tensors
        bool(outs[0].loss > 0)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _base():
    x = tensors(moderate_batch())
    args = (x["pc"], x["pr"], x["rc"], x["rr"])
    return args, {"chosen_num_tokens": x["nc"], "rejected_num_tokens": x["nr"]}


BAD = [
    (
        {"loss_type": "dpo"},
        ValueError,
        r"unknown loss_type 'dpo'; valid loss types are \['sigmoid'",
    ),
    ({"loss_type": []}, ValueError, "loss_type is empty"),
    (
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
        ValueError,
        "loss_weights has 1 entries but loss_type has 2",
    ),
    ({"loss_weights": [float("nan")]}, ValueError, r"loss_weights\[0\] must be a finite float"),
    ({"beta": 0.0}, ValueError, "beta must be a finite number > 0"),
    ({"beta": -1.0}, ValueError, "beta must be a finite number > 0"),
    ({"label_smoothing": 0.5}, ValueError, r"label_smoothing must lie in \[0, 0.5\)"),
    ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must lie in \[0, 0.5\)"),
    ({"loss_type": "exo_pair"}, ValueError, "exo_pair needs label_smoothing > 0"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, "discopop_tau must be"),
    ({"f_divergence_type": "kl"}, ValueError, "unknown f_divergence_type 'kl'"),
    (
        {"f_divergence_type": "js_divergence", "loss_type": ["sigmoid", "bco_pair"]},
        ValueError,
        r"is defined only for loss types .*got \['bco_pair'\]",
    ),
    (
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
        ValueError,
        r"f_alpha_divergence_coef must lie in \[0, 1\]",
    ),
    (
        {"use_weighting": True, "loss_type": "aot"},
        ValueError,
        r"use_weighting is not defined for \['aot'\]",
    ),
    ({"use_weighting": True}, ValueError, r"use_weighting needs \['chosen_log_sum_sq_probs'"),
    ({"ld_alpha": 1.5}, ValueError, r"ld_alpha must lie in \[0, 1\]"),
    (
        {"ld_alpha": 0.5},
        ValueError,
        r"ld_alpha needs the log-probs beyond the shared length: \['policy",
    ),
    ({"chosen_logits_sum": torch.zeros(7, dtype=torch.float64)}, ValueError, "need vocab_size"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD)
def test_bad_knobs(kwargs, exc, match):
    args, base = _base()
    with pytest.raises(exc, match=match):
        preference_loss(*args, **{**base, **kwargs})


def test_bad_tensors():
    (pc, pr, rc, rr), counts = _base()
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(6,\) but the policy"):
        preference_loss(pc, pr[:6], rc, rr)
    with pytest.raises(ValueError, match=r"ref_chosen_logps has shape \(7, 1\)"):
        preference_loss(pc, pr, rc[:, None], rr)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[B\]"):
        preference_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="is empty"):
        preference_loss(pc[:0], pr[:0], rc[:0], rr[:0])
    with pytest.raises(TypeError, match="policy_chosen_logps must be a floating tensor"):
        preference_loss(pc.long(), pr, rc, rr)
    with pytest.raises(TypeError, match="policy_chosen_logps must be a tensor, got list"):
        preference_loss(pc.tolist(), pr, rc, rr)
    with pytest.raises(ValueError, match=r"need reference log-probs; \['ref_rejected_logps'\]"):
        preference_loss(pc, pr, rc)
    for t in ("ipo", "sigmoid_norm", "sft"):
        with pytest.raises(ValueError, match=rf"\['{t}'\] need chosen_num_tokens"):
            preference_loss(pc, pr, rc, rr, loss_type=t)
    with pytest.raises(ValueError, match=r"chosen_num_tokens has shape \(3,\)"):
        preference_loss(
            pc,
            pr,
            rc,
            rr,
            chosen_num_tokens=counts["chosen_num_tokens"][:3],
            rejected_num_tokens=counts["rejected_num_tokens"],
        )
    with pytest.raises(ValueError, match="the logits/\\* metrics need chosen_num_tokens"):
        preference_loss(pc, pr, rc, rr, chosen_logits_sum=pc, vocab_size=3)
    with pytest.raises(ValueError, match=r"chosen_mask shape \(2, 3\) does not match"):
        shared_length_tail_logps(
            torch.zeros(2, 4),
            torch.zeros(2, 4),
            chosen_mask=torch.ones(2, 3),
            rejected_mask=torch.ones(2, 4),
        )
