"""CPO / SimPO / AlphaPO / ORPO and KTO against the independent double-precision references of
``loss_references`` (plain ``math``; ``mpmath`` for log1mexp)."""

from __future__ import annotations

import math
import random

import mpmath
import pytest
import torch

from fastpo.engine.losses import CPO_LOSS_TYPES, cpo_loss, kto_loss, orpo_loss
from fastpo.engine.losses.pairwise import log1mexp
from fastpo.engine.losses.unpaired import kl_reference_point

try:  # the references sit next to the tests; works with or without package-style test dirs
    from .loss_references import (
        extreme_batch,
        finite_grads,
        logsig,
        moderate_batch,
        ref_cpo,
        ref_kto,
        tensors,
    )
except ImportError:
    from loss_references import (
        extreme_batch,
        finite_grads,
        logsig,
        moderate_batch,
        ref_cpo,
        ref_kto,
        tensors,
    )


# ----------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO / ORPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_family_matches_reference(loss_type, alpha):
    batch = moderate_batch(seed=9)
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    x = tensors(batch, grad=True)
    out = cpo_loss(
        x["pc"],
        x["pr"],
        chosen_num_tokens=x["nc"],
        rejected_num_tokens=x["nr"],
        loss_type=loss_type,
        label_smoothing=eps,
        cpo_alpha=0.7,
        simpo_gamma=0.3,
        alpha=alpha,
    )
    expected = ref_cpo(
        loss_type,
        batch["pc"],
        batch["pr"],
        batch["nc"],
        batch["nr"],
        eps=eps,
        cpo_alpha=0.7,
        gamma=0.3,
        alpha=alpha,
    )
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(
        out.metrics["nll_loss"], torch.tensor(-sum(batch["pc"]) / sum(batch["nc"])).double()
    )
    # without smoothing, with chosen and rejected close (inside the hinge margin): chosen up,
    # rejected down
    close = {
        "pc": [-12.0, -30.0, -7.5, -20.0],
        "pr": [-13.0, -29.0, -8.0, -21.0],
        "nc": [6, 15, 3, 10],
        "nr": [6, 14, 4, 10],
    }
    pc = torch.tensor(close["pc"], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(close["pr"], dtype=torch.float64, requires_grad=True)
    cpo_loss(
        pc,
        pr,
        chosen_num_tokens=torch.tensor(close["nc"]),
        loss_type=loss_type,
        rejected_num_tokens=torch.tensor(close["nr"]),
        alpha=alpha,
    ).loss.backward()
    if loss_type == "hinge" and alpha:  # the AlphaPO map can move a pair past the margin
        assert (pc.grad <= 0).all() and (pr.grad >= 0).all() and (pr.grad > 0).any()
    else:
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), (pc.grad, pr.grad)


def test_cpo_orpo_extreme_finite():
    x = tensors(extreme_batch(), dtype=torch.float32, grad=True)
    kw = {"chosen_num_tokens": x["nc"], "rejected_num_tokens": x["nr"]}
    outs = [
        cpo_loss(x["pc"], x["pr"], loss_type=t, alpha=a, **kw)
        for t in CPO_LOSS_TYPES
        for a in (0.0, 0.5)
    ]
    outs.append(orpo_loss(x["pc"], x["pr"], **kw))
    sum(o.loss for o in outs).backward()
    for o in outs:
        assert torch.isfinite(o.losses).all()
        assert all(torch.isfinite(v) for v in o.metrics.values())
    assert finite_grads(x["pc"], x["pr"])


def test_log1mexp_accuracy():
    xs = [-1e-12, -1e-6, -1e-3, -0.5, -0.6931, -0.6932, -1.0, -5.0, -40.0, -700.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    with mpmath.workdps(60):
        want = [float(mpmath.log1p(-mpmath.exp(mpmath.mpf(v)))) for v in xs]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    assert log1mexp(torch.tensor([-1e4])).item() == 0.0  # exp(−1e4) underflows: log 1


def test_orpo_matches_reference():
    batch = moderate_batch(seed=10)
    batch["nc"][2], batch["pc"][2] = 5, -3.0  # ORPO's odds need p < 1: no empty completion here
    x = tensors(batch, grad=True)
    out = orpo_loss(
        x["pc"], x["pr"], chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"], beta=0.2
    )
    nll = -sum(batch["pc"]) / sum(batch["nc"])
    log_odds, losses = [], []
    for i in range(7):
        c, r = batch["pc"][i] / batch["nc"][i], batch["pr"][i] / batch["nr"][i]
        lo = (c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r)))
        log_odds.append(lo)
        # the NLL per pair, −π_c[i] / (mean chosen length): its mean is the NLL per token
        losses.append(-batch["pc"][i] * 7 / sum(batch["nc"]) - 0.2 * logsig(lo))
    torch.testing.assert_close(out.losses, torch.tensor(losses, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["nll_loss"], torch.tensor(nll, dtype=torch.float64))
    torch.testing.assert_close(
        out.metrics["log_odds_chosen"], torch.tensor(sum(log_odds) / 7, dtype=torch.float64)
    )
    torch.testing.assert_close(
        out.metrics["log_odds_ratio"], torch.tensor(sum(map(logsig, log_odds)) / 7).double()
    )
    out.loss.backward()
    assert (x["pr"].grad > 0).all()
    # an empty completion (mean log-prob 0, p = 1) stays finite
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    empty = orpo_loss(
        zero,
        torch.tensor([-3.0], dtype=torch.float64),
        chosen_num_tokens=torch.tensor([0]),
        rejected_num_tokens=torch.tensor([2]),
    )
    empty.loss.backward()
    assert empty.loss.isfinite() and zero.grad.isfinite().all()


# ----------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------


def test_kto_matches_reference_and_metrics():
    rng = random.Random(11)
    n = 8
    p = [-rng.uniform(5, 60) for _ in range(n)]
    r = [v + rng.gauss(0, 4) for v in p]
    d = [True, False, True, True, False, False, True, False]
    kp = [-rng.uniform(5, 60) for _ in range(5)]
    kr = [v - rng.uniform(0.5, 2) for v in kp]  # policy above reference: z₀ > 0
    z0 = sum(a - b for a, b in zip(kp, kr)) / 5
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    pol = t(p).requires_grad_(True)
    out = kto_loss(
        pol,
        t(r),
        torch.tensor(d),
        beta=0.2,
        desirable_weight=1.5,
        undesirable_weight=0.5,
        policy_kl_logps=t(kp),
        ref_kl_logps=t(kr),
    )
    expected = ref_kto(p, r, d, z0, beta=0.2, wd=1.5, wu=0.5)
    torch.testing.assert_close(out.losses, t(expected))
    torch.testing.assert_close(out.loss, t(sum(expected) / n))
    torch.testing.assert_close(out.kl, t(z0))
    out.loss.backward()
    grad_sign = torch.where(torch.tensor(d), -1.0, 1.0).double()
    assert (pol.grad * grad_sign > 0).all()
    rewards = [0.2 * (a - b) for a, b in zip(p, r)]
    des = [v for v, k in zip(rewards, d) if k]
    und = [v for v, k in zip(rewards, d) if not k]
    torch.testing.assert_close(out.metrics["rewards/chosen"], t(sum(des) / len(des)))
    torch.testing.assert_close(out.metrics["rewards/rejected"], t(sum(und) / len(und)))
    torch.testing.assert_close(
        out.metrics["rewards/margins"], t(sum(des) / len(des) - sum(und) / len(und))
    )
    torch.testing.assert_close(out.metrics["kl"], t(z0))
    # the same with a precomputed (e.g. all-reduced) estimate
    again = kto_loss(
        t(p),
        t(r),
        torch.tensor(d),
        beta=0.2,
        desirable_weight=1.5,
        undesirable_weight=0.5,
        kl=kl_reference_point(t(kp), t(kr)),
    )
    torch.testing.assert_close(again.losses, out.losses)


def test_kto_kl_clamped_apo_unpaired_and_one_sided_batch():
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    p, r = [-10.0, -20.0, -5.0], [-12.0, -15.0, -5.5]
    d = torch.tensor([True, False, True])
    negative = kto_loss(t(p), t(r), d, kl=t(-3.0))  # a negative estimate clamps to 0
    assert negative.kl == 0
    torch.testing.assert_close(negative.losses, t(ref_kto(p, r, d.tolist(), 0.0)))
    apo = kto_loss(t(p), t(r), d, loss_type="apo_zero_unpaired", undesirable_weight=2.0)
    torch.testing.assert_close(apo.losses, t(ref_kto(p, r, d.tolist(), 0, wu=2.0, apo=True)))
    only = kto_loss(
        t(p),
        t(r),
        torch.ones(3, dtype=torch.bool),
        kl=t(0.5),
        num_tokens=t([3, 4, 5]),
        logits_sum=t([3.0, 8.0, 10.0]),
        vocab_size=2,
    )
    assert only.loss.isfinite()
    assert only.metrics["rewards/rejected"].isnan() and only.metrics["logps/rejected"].isnan()
    torch.testing.assert_close(only.metrics["logits/chosen"], t(21.0 / 24.0))
    x = tensors(extreme_batch(), dtype=torch.float32, grad=True)
    ext = kto_loss(
        x["pc"], x["rc"], torch.arange(7) % 2 == 0, policy_kl_logps=x["pr"], ref_kl_logps=x["rr"]
    )
    ext.loss.backward()
    assert torch.isfinite(ext.losses).all() and torch.isfinite(x["pc"].grad).all()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _base():
    x = tensors(moderate_batch())
    return (x["pc"], x["pr"], x["rc"]), {
        "chosen_num_tokens": x["nc"],
        "rejected_num_tokens": x["nr"],
    }


def test_bad_input_cpo_orpo_kto():
    (pc, pr, rc), counts = _base()
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'; valid loss types are \['sigm"):
        cpo_loss(pc, pr, loss_type="kto", **counts)
    with pytest.raises(ValueError, match="cpo_alpha must be a finite float"):
        cpo_loss(pc, pr, cpo_alpha=float("inf"), **counts)
    with pytest.raises(ValueError, match="beta must be"):
        orpo_loss(pc, pr, beta=0, **counts)
    with pytest.raises(TypeError, match="orpo_loss needs chosen_num_tokens and rejected_num_tok"):
        orpo_loss(pc, pr)  # ORPO averages per token: counts are required
    with pytest.raises(TypeError, match="cpo_loss needs chosen_num_tokens and rejected_num_tok"):
        cpo_loss(pc, pr, chosen_num_tokens=counts["chosen_num_tokens"])
    with pytest.raises(TypeError, match=r"cpo_loss\(\) got an unexpected keyword argument 'gamma'"):
        cpo_loss(pc, pr, gamma=0.5, **counts)  # SimPO's γ is simpo_gamma
    d = torch.tensor([True, False] * 3 + [True])
    with pytest.raises(ValueError, match="valid loss types are \\['kto', 'apo_zero_unpaired'\\]"):
        kto_loss(pc, rc, d, loss_type="sigmoid")
    with pytest.raises(ValueError, match="needs the KL reference point"):
        kto_loss(pc, rc, d)
    with pytest.raises(ValueError, match="not both"):
        kto_loss(pc, rc, d, kl=torch.tensor(0.0), policy_kl_logps=pc, ref_kl_logps=rc)
    with pytest.raises(TypeError, match=r"desirable must be a bool tensor, got torch\.int64"):
        kto_loss(pc, rc, d.long(), kl=torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"desirable has shape \(6,\)"):
        kto_loss(pc, rc, d[:6], kl=torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"ref_kl_logps has shape \(2,\)"):
        kto_loss(pc, rc, d, policy_kl_logps=pc[:3], ref_kl_logps=rc[:2])
