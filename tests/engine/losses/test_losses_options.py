"""``preference_loss`` options: the options and statistics objects against the keyword form,
multi-loss weighting, WPO weights, LD-DPO, reference-free, input dtypes and the metrics, against
the independent references of ``loss_references``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastpo.engine.losses import (
    CPOOptions,
    DPOOptions,
    KTOOptions,
    OptionError,
    PairStats,
    cpo_loss,
    kto_loss,
    preference_loss,
)
from fastpo.engine.losses.weighting import shared_length_tail_logps

try:  # the references sit next to the tests; works with or without package-style test dirs
    from .loss_references import (
        BETA,
        dpo,
        moderate_batch,
        ref_cpo,
        ref_dpo,
        ref_kto,
        sig,
        tensors,
    )
except ImportError:
    from loss_references import (
        BETA,
        dpo,
        moderate_batch,
        ref_cpo,
        ref_dpo,
        ref_kto,
        sig,
        tensors,
    )


def test_options_and_stats_objects_match_the_keyword_form():
    batch = moderate_batch(seed=3)
    x = tensors(batch)
    options = DPOOptions(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 1], label_smoothing=0.1)
    stats = PairStats(chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"])
    out = preference_loss(x["pc"], x["pr"], x["rc"], x["rr"], options=options, stats=stats)
    expected = [0.5 * s + n for s, n in zip(ref_dpo("sigmoid", **batch, eps=0.1),
                                            ref_dpo("sft", **batch))]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    keywords = dpo(["sigmoid", "sft"], x, loss_weights=[0.5, 1.0], label_smoothing=0.1)
    torch.testing.assert_close(keywords.losses, out.losses)
    # a keyword replaces that field of the object
    beta = preference_loss(x["pc"], x["pr"], x["rc"], x["rr"], options=options, stats=stats,
                           beta=0.3)
    same = dpo(["sigmoid", "sft"], x, loss_weights=[0.5, 1.0], label_smoothing=0.1, beta=0.3)
    torch.testing.assert_close(beta.losses, same.losses)
    assert not torch.allclose(beta.losses, out.losses)
    assert options.beta == BETA  # the object is unchanged (and frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 0.3  # type: ignore[misc]


def test_options_are_normalized_and_errors_name_the_option():
    assert DPOOptions(loss_type="ipo").loss_type == ("ipo",)
    assert DPOOptions(loss_type=["ipo", "sft"]).weights == (1.0, 1.0)
    assert DPOOptions(loss_weights=[2]).loss_weights == (2.0,)
    assert DPOOptions() == DPOOptions(loss_type=["sigmoid"])  # hashable, compared by value
    for kwargs, option, error in [
        ({"loss_type": "exo_pair"}, "label_smoothing", ValueError),
        ({"loss_weights": 1.0}, "loss_weights", TypeError),
        ({"loss_type": "aot", "use_weighting": True}, "use_weighting", ValueError),
        ({"reference_free": 1}, "reference_free", TypeError),
        ({"ld_alpha": -0.1}, "ld_alpha", ValueError),
    ]:
        with pytest.raises(error) as info:
            DPOOptions(**kwargs)
        assert isinstance(info.value, OptionError) and info.value.option == option
    with pytest.raises(OptionError, match="simpo_gamma must be a finite float") as info:
        CPOOptions(simpo_gamma=math.nan)
    assert info.value.option == "simpo_gamma"
    with pytest.raises(OptionError, match="undesirable_weight must be a finite number > 0"):
        KTOOptions(undesirable_weight=0.0)
    assert CPOOptions(loss_type="alphapo", cpo_alpha=1.0).nll_weight == 0.0
    with pytest.raises(OptionError, match="cpo_alpha is the weight of the chosen answers' NLL "
                                          "term and must be >= 0, got -0\\.5") as info:
        CPOOptions(cpo_alpha=-0.5)  # once accepted: it trained the chosen answers' NLL upward
    assert info.value.option == "cpo_alpha"
    with pytest.raises(OptionError, match="cpo_alpha"):
        cpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), cpo_alpha=-1.0)
    assert KTOOptions().uses_kl_reference_point
    assert not KTOOptions(loss_type="apo_zero_unpaired").uses_kl_reference_point


def test_fronts_refuse_unknown_keywords_and_wrong_objects():
    x = tensors(moderate_batch())
    with pytest.raises(TypeError, match="preference_loss\\(\\) got an unexpected keyword "
                                        "argument 'betta'"):
        dpo("sigmoid", x, betta=0.1)
    with pytest.raises(TypeError, match="options must be a DPOOptions, got dict"):
        preference_loss(x["pc"], x["pr"], x["rc"], x["rr"], options={"beta": 0.1})
    with pytest.raises(TypeError, match="stats must be a PairStats, got dict"):
        preference_loss(x["pc"], x["pr"], x["rc"], x["rr"], stats={})
    with pytest.raises(TypeError, match="kto_loss\\(\\) got an unexpected keyword argument"):
        kto_loss(x["pc"], x["rc"], x["nc"] > 5, kl=torch.tensor(0.0), cpo_alpha=1.0)


def test_cpo_and_kto_options_objects():
    batch = moderate_batch(seed=5)
    x = tensors(batch)
    stats = PairStats(chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"])
    options = CPOOptions(loss_type="simpo", cpo_alpha=0.5, simpo_gamma=0.3)
    out = cpo_loss(x["pc"], x["pr"], options=options, stats=stats)
    expected = ref_cpo("simpo", batch["pc"], batch["pr"], batch["nc"], batch["nr"],
                       cpo_alpha=0.5, gamma=0.3)
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    desirable = x["nc"] % 2 == 0
    kto = kto_loss(x["pc"], x["rc"], desirable, options=KTOOptions(desirable_weight=2.0),
                   kl=torch.tensor(0.25, dtype=torch.float64))
    expected = ref_kto(batch["pc"], batch["rc"], desirable.tolist(), 0.25, wd=2.0)
    torch.testing.assert_close(kto.losses, torch.tensor(expected, dtype=torch.float64))


def test_multi_loss_is_weighted_sum_of_means():
    batch = moderate_batch(seed=4)
    x = tensors(batch)
    mpo = dpo(["sigmoid", "bco_pair", "sft"], x, loss_weights=[0.8, 0.2, 1.0])
    expected = [
        0.8 * s + 0.2 * b + 1.0 * n
        for s, b, n in zip(
            ref_dpo("sigmoid", **batch), ref_dpo("bco_pair", **batch), ref_dpo("sft", **batch)
        )
    ]
    torch.testing.assert_close(mpo.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(mpo.loss, torch.tensor(sum(expected) / 7, dtype=torch.float64))
    equal = dpo(["sigmoid", "hinge"], x)  # default weights are 1
    torch.testing.assert_close(equal.loss, dpo("sigmoid", x).loss + dpo("hinge", x).loss)
    assert dpo("sigmoid", x).loss == dpo(["sigmoid"], x).loss  # a bare string is one type


def test_wpo_weighting():
    batch = moderate_batch(seed=6)
    x = tensors(batch, grad=True)
    lc = [-0.5 * n for n in batch["nc"]]  # Σ_t log Σ_v p² per sequence
    lr = [-0.8 * n for n in batch["nr"]]
    out = dpo(
        "sigmoid",
        x,
        use_weighting=True,
        chosen_log_sum_sq_probs=torch.tensor(lc, dtype=torch.float64),
        rejected_log_sum_sq_probs=torch.tensor(lr, dtype=torch.float64),
    )
    w = [
        math.exp((batch["pc"][i] - lc[i]) / max(1, batch["nc"][i]))
        * math.exp((batch["pr"][i] - lr[i]) / max(1, batch["nr"][i]))
        for i in range(7)
    ]
    base = ref_dpo("sigmoid", **batch)
    torch.testing.assert_close(
        out.losses, torch.tensor([w[i] * base[i] for i in range(7)], dtype=torch.float64)
    )
    # the weights carry no gradient: d/dπ_c = w · dℓ/dπ_c = −w β σ(−z) / B
    out.loss.backward()
    z = [
        BETA * ((batch["pc"][i] - batch["rc"][i]) - (batch["pr"][i] - batch["rr"][i]))
        for i in range(7)
    ]
    grad = [-w[i] * BETA * sig(-z[i]) / 7 for i in range(7)]
    torch.testing.assert_close(x["pc"].grad, torch.tensor(grad, dtype=torch.float64))


def _ld_tokens(seed: int):
    """Token log-probs [B, T] with prompt/padding gaps, masks, and the per-pair tails by loop."""
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 13
    masks, logps = [], []
    for _ in range(2):
        mask = torch.zeros(b, t, dtype=torch.bool)
        for i in range(b):
            start = int(torch.randint(0, 4, (1,), generator=g))
            length = int(torch.randint(0, t - start, (1,), generator=g))
            mask[i, start : start + length] = True
        mask[0, 5] = mask[0, 5] ^ True  # a gap inside a completion
        tok = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
        masks.append(mask)
        logps.append(torch.where(mask, tok, torch.zeros_like(tok)))
    tails = [[0.0] * b, [0.0] * b]
    for i in range(b):
        shared = min(int(masks[0][i].sum()), int(masks[1][i].sum()))
        for side in range(2):
            seen = 0
            for j in range(t):
                if masks[side][i, j]:
                    seen += 1
                    if seen > shared:
                        tails[side][i] += float(logps[side][i, j])
    return logps, masks, tails


def test_shared_length_tail_logps_matches_loop():
    (lc, lr), (mc, mr), (tc, tr) = _ld_tokens(0)
    got_c, got_r = shared_length_tail_logps(lc, lr, chosen_mask=mc, rejected_mask=mr)
    torch.testing.assert_close(got_c, torch.tensor(tc, dtype=torch.float64))
    torch.testing.assert_close(got_r, torch.tensor(tr, dtype=torch.float64))
    assert ((got_c == 0) | (got_r == 0)).all()  # only the longer completion has a tail


def test_ld_alpha():
    (pc_tok, pr_tok), (mc, mr), _ = _ld_tokens(1)
    (rc_tok, rr_tok), _, _ = _ld_tokens(2)
    rc_tok, rr_tok = torch.where(mc, rc_tok, 0.0), torch.where(mr, rr_tok, 0.0)
    tails = {}
    tails["policy_chosen_tail_logps"], tails["policy_rejected_tail_logps"] = (
        shared_length_tail_logps(pc_tok, pr_tok, chosen_mask=mc, rejected_mask=mr)
    )
    tails["ref_chosen_tail_logps"], tails["ref_rejected_tail_logps"] = shared_length_tail_logps(
        rc_tok, rr_tok, chosen_mask=mc, rejected_mask=mr
    )
    x = {
        "pc": pc_tok.sum(1),
        "pr": pr_tok.sum(1),
        "rc": rc_tok.sum(1),
        "rr": rr_tok.sum(1),
        "nc": mc.sum(1),
        "nr": mr.sum(1),
    }
    plain = dpo(["sigmoid", "sft"], x)
    torch.testing.assert_close(
        dpo(["sigmoid", "sft"], x, ld_alpha=1.0, **tails).losses, plain.losses
    )
    alpha = 0.3
    out = dpo(["sigmoid", "sft"], x, ld_alpha=alpha, **tails)
    ld = {
        k: (x[k] - (1 - alpha) * tails[n]).tolist()
        for k, n in (
            ("pc", "policy_chosen_tail_logps"),
            ("pr", "policy_rejected_tail_logps"),
            ("rc", "ref_chosen_tail_logps"),
            ("rr", "ref_rejected_tail_logps"),
        )
    }
    counts = {"nc": x["nc"].tolist(), "nr": x["nr"].tolist()}
    sigmoid = ref_dpo("sigmoid", **ld, **counts)
    full = {k: x[k].tolist() for k in ("pc", "pr", "rc", "rr")}
    sft = ref_dpo("sft", **full, **counts)  # the NLL keeps the full sums
    torch.testing.assert_close(
        out.losses, torch.tensor([s + n for s, n in zip(sigmoid, sft)], dtype=torch.float64)
    )
    torch.testing.assert_close(out.metrics["logps/chosen"], torch.tensor(ld["pc"]).double().mean())


def test_reference_free_is_zero_reference():
    x = tensors(moderate_batch())
    zeros = torch.zeros(7, dtype=torch.float64)
    for t in ("sigmoid", "ipo", "aot"):
        free = preference_loss(
            x["pc"],
            x["pr"],
            loss_type=t,
            reference_free=True,
            chosen_num_tokens=x["nc"],
            rejected_num_tokens=x["nr"],
        )
        zero = preference_loss(
            x["pc"],
            x["pr"],
            zeros,
            zeros,
            loss_type=t,
            chosen_num_tokens=x["nc"],
            rejected_num_tokens=x["nr"],
        )
        ignored = dpo(t, x, reference_free=True)  # a reference given is not used
        torch.testing.assert_close(free.losses, zero.losses)
        torch.testing.assert_close(ignored.losses, zero.losses)
    sft_only = preference_loss(
        x["pc"], x["pr"], loss_type="sft", chosen_num_tokens=x["nc"], rejected_num_tokens=x["nr"]
    )
    torch.testing.assert_close(sft_only.losses, dpo("sft", x).losses)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_computed_in_fp32(dtype):
    batch = moderate_batch()
    x = tensors(batch, dtype=dtype)
    out = dpo(["sigmoid", "ipo"], x)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    rounded = {k: [float(v) for v in x[k].float()] for k in ("pc", "pr", "rc", "rr")}
    ref = [
        s + i
        for s, i in zip(
            ref_dpo("sigmoid", **rounded, nc=batch["nc"], nr=batch["nr"]),
            ref_dpo("ipo", **rounded, nc=batch["nc"], nr=batch["nr"]),
        )
    ]
    torch.testing.assert_close(
        out.losses.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_metrics_values_and_no_grad():
    batch = moderate_batch(seed=8)
    x = tensors(batch, grad=True)
    vocab = 11
    logits_c = torch.tensor([0.5 * n * vocab for n in batch["nc"]], dtype=torch.float64)
    logits_r = torch.tensor([-0.25 * n * vocab for n in batch["nr"]], dtype=torch.float64)
    out = dpo(
        "sigmoid", x, chosen_logits_sum=logits_c, rejected_logits_sum=logits_r, vocab_size=vocab
    )
    rc = [BETA * (batch["pc"][i] - batch["rc"][i]) for i in range(7)]
    rr = [BETA * (batch["pr"][i] - batch["rr"][i]) for i in range(7)]
    expected = {
        "rewards/chosen": sum(rc) / 7,
        "rewards/rejected": sum(rr) / 7,
        "rewards/accuracies": sum(c > r for c, r in zip(rc, rr)) / 7,
        "rewards/margins": sum(c - r for c, r in zip(rc, rr)) / 7,
        "logps/chosen": sum(batch["pc"]) / 7,
        "logps/rejected": sum(batch["pr"]) / 7,
        "logits/chosen": 0.5,
        "logits/rejected": -0.25,
        "nll_loss": -sum(batch["pc"]) / sum(batch["nc"]),
    }
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        metric = out.metrics[name]
        assert isinstance(metric, torch.Tensor) and metric.dim() == 0, name
        assert not metric.requires_grad, name
        torch.testing.assert_close(metric, torch.tensor(value, dtype=torch.float64), msg=name)
    assert 0 < expected["rewards/accuracies"] < 1  # the batch exercises both outcomes
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(rc, dtype=torch.float64))
    # no scored token at all: logits/* is 0, not 0/0
    zero = torch.zeros(7, dtype=torch.int64)
    empty = preference_loss(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        chosen_num_tokens=zero,
        rejected_num_tokens=zero,
        chosen_logits_sum=torch.zeros(7),
        rejected_logits_sum=torch.zeros(7),
        vocab_size=vocab,
    )
    assert empty.metrics["logits/chosen"] == 0 and empty.metrics["nll_loss"].isfinite()
