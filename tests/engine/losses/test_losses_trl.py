"""Cross-check against TRL's own loss code on the same log-probs (skipped when TRL is absent).

TRL 1.16 computes the DPO loss inside ``DPOTrainer._compute_loss`` from a model's per-token
outputs. The trainer here is built without ``__init__`` and given only the attributes that
method reads, and a stand-in model that returns prescribed per-token log-probs; the result is
compared with ``preference_loss`` on the per-sequence sums of those same log-probs.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is not installed")

from fastpo.engine.losses import cpo_loss, kto_loss, orpo_loss, preference_loss  # noqa: E402
from fastpo.engine.losses.weighting import shared_length_tail_logps  # noqa: E402

B, L, VOCAB = 6, 12, 17


class _TokenModel(torch.nn.Module):
    """Returns fixed per-token outputs, as TRL's fused LM head would for these labels."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, mean_logits=None, log_sum_sq_probs=None):
        super().__init__()
        n, t = log_probs.shape
        self.outputs = SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.ones(n, t, dtype=log_probs.dtype),
            mean_logits=torch.zeros(n, t) if mean_logits is None else mean_logits,
            is_top1=torch.zeros(n, t, dtype=torch.bool),
            log_sum_sq_probs=torch.zeros(n, t) if log_sum_sq_probs is None else log_sum_sq_probs,
        )

    def forward(self, **kwargs):
        return self.outputs


def _batch(seed: int):
    """A concatenated [chosen; rejected] batch: completion masks with empty and full rows."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * B, L, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(1, L - start + 1, (1,), generator=g))
        completion[i, start : start + length] = 1
    completion[B - 1, 3:] = 0  # a chosen completion shorter than its rejected one
    shift = completion[:, 1:].bool()
    tok = lambda scale: torch.where(
        shift, -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * scale, 0.0
    )
    return {
        "completion": completion,
        "shift": shift,
        "policy": tok(2.0),
        "ref": tok(2.0),
        "mean_logits": torch.randn(2 * B, L - 1, generator=g, dtype=torch.float64),
        "log_sum_sq": -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64),
    }


def _trl_dpo(
    batch,
    *,
    loss_type,
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha=0.5,
    ld_alpha=None,
    use_weighting=False,
    discopop_tau=0.05,
):
    trainer = object.__new__(trl_dpo.DPOTrainer)
    policy = _TokenModel(batch["policy"], batch["mean_logits"], batch["log_sum_sq"])
    reference = _TokenModel(batch["ref"])
    attributes = {
        "model": policy,
        "ref_model": reference,
        "precompute_ref_logps": False,
        "accelerator": SimpleNamespace(
            device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        "args": SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        "aux_loss_enabled": False,
        "beta": beta,
        "loss_types": list(loss_type),
        "loss_weights": loss_weights or [1.0] * len(loss_type),
        "ld_alpha": ld_alpha,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": f_alpha,
        "label_smoothing": label_smoothing,
        "use_weighting": use_weighting,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for name, value in attributes.items():
        object.__setattr__(trainer, name, value)
    inputs = {
        "input_ids": torch.zeros(2 * B, L, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, L, dtype=torch.long),
        "completion_mask": batch["completion"],
    }
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours(batch, **kwargs):
    shift = batch["shift"]
    counts = shift.sum(1)
    pol, ref = batch["policy"].sum(1), batch["ref"].sum(1)
    extra = {}
    if kwargs.get("ld_alpha") is not None:
        for who, tok in (("policy", batch["policy"]), ("ref", batch["ref"])):
            tails = shared_length_tail_logps(
                tok[:B], tok[B:], chosen_mask=shift[:B], rejected_mask=shift[B:]
            )
            extra[f"{who}_chosen_tail_logps"], extra[f"{who}_rejected_tail_logps"] = tails
    if kwargs.get("use_weighting"):
        lss = (batch["log_sum_sq"] * shift).sum(1)
        extra["chosen_log_sum_sq_probs"], extra["rejected_log_sum_sq_probs"] = lss[:B], lss[B:]
    logits_sum = (batch["mean_logits"] * shift).sum(1) * VOCAB
    return preference_loss(
        pol[:B],
        pol[B:],
        ref[:B],
        ref[B:],
        chosen_num_tokens=counts[:B],
        rejected_num_tokens=counts[B:],
        chosen_logits_sum=logits_sum[:B],
        rejected_logits_sum=logits_sum[B:],
        vocab_size=VOCAB,
        **extra,
        **kwargs,
    )


CASES = [
    ({"loss_type": ["sigmoid"]}),
    ({"loss_type": ["ipo"], "beta": 0.3}),
    ({"loss_type": ["hinge"], "beta": 0.5}),
    ({"loss_type": ["robust"], "label_smoothing": 0.2}),
    ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    ({"loss_type": ["nca_pair"]}),
    ({"loss_type": ["bco_pair"]}),
    ({"loss_type": ["sppo_hard"]}),
    ({"loss_type": ["aot"], "label_smoothing": 0.1}),
    ({"loss_type": ["aot_unpaired"], "label_smoothing": 0.1}),
    ({"loss_type": ["apo_zero"]}),
    ({"loss_type": ["apo_down"]}),
    ({"loss_type": ["discopop"], "discopop_tau": 0.1}),
    ({"loss_type": ["sigmoid_norm"]}),
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    ({"loss_type": ["sigmoid", "ipo"], "f_divergence_type": "js_divergence"}),
    ({"loss_type": ["robust"], "label_smoothing": 0.1, "f_divergence_type": "forward_kl"}),
    # the one coefficient where TRL's code and the paper's α agree (see divergence_scores)
    ({"loss_type": ["sigmoid", "hinge"], "f_divergence_type": "alpha_divergence", "f_alpha": 0.5}),
    # elsewhere TRL's coefficient c is the paper's α = 1 − c
    ({"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha": 0.2}),
    ({"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.4}),
    ({"loss_type": ["sigmoid", "ipo"], "use_weighting": True}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_dpo_matches_trl(case):
    batch = _batch(seed=len(str(case)))
    fp32 = case.get("f_divergence_type") == "alpha_divergence"  # TRL's α-divergence: ≤ fp32 only
    if fp32:
        batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    trl_loss, trl_metrics = _trl_dpo(batch, **case)
    ours_kwargs = dict(case)
    if "f_alpha" in ours_kwargs:
        ours_kwargs["f_alpha_divergence_coef"] = 1.0 - ours_kwargs.pop("f_alpha")
    out = _ours(batch, **ours_kwargs)
    # TRL forms exo_pair's log ε and log(1 − ε) from a float32 tensor: ~1e-8 relative off
    rtol = 1e-7 if "exo_pair" in case["loss_type"] else 1e-10
    if fp32:
        rtol = 2e-6  # float32 throughout, exp − 1 (TRL) against expm1 (here)
    torch.testing.assert_close(out.loss, trl_loss.to(out.loss.dtype), rtol=rtol, atol=1e-12)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ):
        tol = max(rtol, 1e-7) if name == "rewards/accuracies" else rtol  # TRL's is float32
        torch.testing.assert_close(
            out.metrics[name].item(), float(trl_metrics[name]), rtol=tol, atol=1e-12, msg=name
        )


def _fake_trainer(module, cls, **attributes):
    trainer = object.__new__(getattr(module, cls))
    attributes.setdefault("accelerator", SimpleNamespace(device=torch.device("cpu")))
    for name, value in attributes.items():
        object.__setattr__(trainer, name, value)
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_cpo_pair_loss_matches_trl(loss_type, alpha):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    g = torch.Generator().manual_seed(7)
    counts = torch.randint(1, 30, (2, B), generator=g)
    sums = -torch.rand(2, B, generator=g, dtype=torch.float64) * counts * 1.5
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    trainer = _fake_trainer(
        cpo,
        "CPOTrainer",
        alpha=alpha,
        beta=0.2,
        loss_type=loss_type,
        label_smoothing=eps,
        simpo_gamma=0.4,
    )
    averaged = loss_type in ("ipo", "simpo")  # TRL hands its loss the per-token average for these
    trl_in = sums / counts if averaged else sums
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(trl_in[0], trl_in[1])
    out = cpo_loss(
        sums[0],
        sums[1],
        chosen_num_tokens=counts[0],
        rejected_num_tokens=counts[1],
        loss_type=loss_type,
        beta=0.2,
        label_smoothing=eps,
        simpo_gamma=0.4,
        alpha=alpha,
        cpo_alpha=0.0,
    )
    torch.testing.assert_close(out.losses, trl_losses)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected)


def test_orpo_odds_ratio_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(8)
    counts = torch.randint(1, 30, (2, B), generator=g)
    sums = -torch.rand(2, B, generator=g, dtype=torch.float64) * counts * 1.5
    sums[0, 0] = -1e-3  # near-certain completion: the stable log1mexp branch
    sums = sums.float()  # TRL computes the odds ratio in float32
    trainer = _fake_trainer(orpo, "ORPOTrainer", beta=0.25)
    trl_losses, _, _, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(*(sums / counts))
    out = orpo_loss(
        sums[0], sums[1], chosen_num_tokens=counts[0], rejected_num_tokens=counts[1], beta=0.25
    )
    nll = -sums[0].sum() / counts[0].sum()
    # TRL: loss = nll − mean(β · log σ(L)); its per-pair term is β · log σ(L), ours adds the
    # pair's share of the NLL, −π_c / (mean chosen length)
    pair_nll = -sums[0] * B / counts[0].sum()
    torch.testing.assert_close(out.losses, pair_nll - trl_losses)
    torch.testing.assert_close(out.loss, nll - trl_losses.mean())
    torch.testing.assert_close(out.metrics["log_odds_ratio"], trl_ratio)
    torch.testing.assert_close(out.metrics["log_odds_chosen"], trl_log_odds)


class _KTOModel(torch.nn.Module):
    """Per-token log-probs for the examples, or for the mismatched (KL) pairs by input width."""

    is_gradient_checkpointing = False

    def __init__(self, examples: _TokenModel, kl_log_probs):
        super().__init__()
        self.examples, self.kl_log_probs = examples, kl_log_probs

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] == self.kl_log_probs.shape[1] + 1:
            return SimpleNamespace(log_probs=self.kl_log_probs)
        return self.examples.outputs


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_matches_trl(loss_type, kl_sign):
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    batch = _batch(seed=11)
    n, kl_width = 2 * B, 7
    g = torch.Generator().manual_seed(12)
    kl_policy = -torch.rand(n, kl_width, generator=g, dtype=torch.float64)
    kl_ref = kl_policy - kl_sign * torch.rand(n, kl_width, generator=g, dtype=torch.float64)
    desirable = torch.rand(n, generator=g) < 0.5
    desirable[:2] = torch.tensor([True, False])
    model = _KTOModel(_TokenModel(batch["policy"], batch["mean_logits"]), kl_policy)
    trainer = _fake_trainer(
        trl_kto,
        "KTOTrainer",
        model=model,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        calculate_KL=loss_type == "kto",
        loss_type=loss_type,
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),
    )
    inputs = {
        "input_ids": torch.zeros(n, L, dtype=torch.long),
        "attention_mask": torch.ones(n, L, dtype=torch.long),
        "completion_mask": batch["completion"],
        "KL_input_ids": torch.zeros(n, kl_width + 1, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, kl_width + 1, dtype=torch.long),
        "KL_completion_mask": torch.ones(n, kl_width + 1, dtype=torch.long),
        "label": desirable.long(),
        "ref_logps": batch["ref"].sum(1),
        "ref_KL_logps": kl_ref.sum(1),
    }
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    shift = batch["shift"]
    kl = {"policy_kl_logps": kl_policy.sum(1), "ref_kl_logps": kl_ref.sum(1)}
    out = kto_loss(
        batch["policy"].sum(1),
        batch["ref"].sum(1),
        desirable,
        loss_type=loss_type,
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        **(kl if loss_type == "kto" else {}),
        num_tokens=shift.sum(1),
        logits_sum=(batch["mean_logits"] * shift).sum(1) * VOCAB,
        vocab_size=VOCAB,
    )
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-10, atol=1e-12)
    for name in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ):
        torch.testing.assert_close(
            out.metrics[name].item(), float(trl_metrics[name]), rtol=1e-9, atol=1e-12, msg=name
        )
