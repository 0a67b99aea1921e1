"""The training objective: from one batch's policy and reference log-probs to the loss.

Maps the ``loss`` config onto the loss library (``preference_loss`` for the DPO family,
``cpo_loss`` for CPO/SimPO/AlphaPO, ``orpo_loss``, ``kto_loss``), feeding each what it needs
from the forward pass (token counts, logit sums, LD-DPO tails, WPO sums, KTO's mismatched
pairs). Also the per-item statistics that evaluation sums over the held-out split.

Given the step's :class:`~.step_weighting.StepCounts`, the loss to backpropagate is the
micro-batch's share of the whole step's mean loss (every pair weighs the same); without them it
is the micro-batch's own mean (evaluation, a single batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.batch import PreferenceBatch
from ..losses import PairStats, cpo_loss, kto_loss, orpo_loss, preference_loss
from ..losses.listwise import plackett_luce_loss, ranking_metrics
from ..losses.router import RouterSettings
from ..losses.unpaired import kl_reference_point
from ..model.forward import ForwardLogps, ForwardOptions, pair_logps, split_unpaired
from ..model.reference import ReferenceLogps
from .config import ModelConfig
from .loss_config import LossConfig
from .ranked_config import RankedConfig
from .step_weighting import StepCounts

# sums that evaluation accumulates over the held-out split (and across ranks)
EVAL_KEYS = ("items", "loss", "correct", "margin", "chosen_reward", "rejected_reward",
             "chosen_items", "rejected_items")


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar to backpropagate (the step's share with StepCounts, else the mean)
    metrics: dict[str, Tensor]  # TRL names + ref_kl, detached
    eval_sums: Tensor  # [len(EVAL_KEYS)] float64, see EVAL_KEYS


class Objective:
    """``objective(policy, reference, batch)`` for the configured loss (``ranked``: the loss of
    ranked batches, :mod:`.ranked_config`).

    ``with_tails`` / ``with_sum_sq``: whether the forward passes must give the LD-DPO tails and
    WPO's log Σp² sums (the trainer asks for them); ``paired``: pair batches (else KTO's)."""

    def __init__(self, cfg: LossConfig, *, vocab_size: int,
                 all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
                 router: RouterSettings | None = None,
                 ranked: RankedConfig | None = None) -> None:
        self.method = cfg.method
        self.router = router  # a MoE policy's router loss (its weight: router.coef), or None
        self.vocab_size = vocab_size
        self.all_reduce_mean = all_reduce_mean or (lambda t: t)
        self.paired = self.method != "kto"
        self.uses_reference = cfg.needs_reference()
        self.with_kl = cfg.with_kl()
        self.orpo_beta = cfg.beta
        self.dpo = cfg.dpo_options() if self.method == "dpo" else None
        self.cpo = cfg.cpo_options() if self.method in ("cpo", "simpo") else None
        self.kto = cfg.kto_options() if self.method == "kto" else None
        self.with_tails = self.dpo is not None and self.dpo.ld_alpha is not None
        self.with_sum_sq = self.dpo is not None and self.dpo.use_weighting
        # ranked batches: Plackett–Luce over each item's ranking, else the pairs' mean loss
        self.listwise = ranked is not None and ranked.loss == "plackett_luce"

    def forward_options(self, model: ModelConfig) -> ForwardOptions:
        """What the policy forward must give this objective (``model``: the config section)."""
        return ForwardOptions(use_fused_linear=model.use_fused_linear, with_logits_sum=True,
                              with_tail_logps=self.with_tails,
                              with_log_sum_sq_probs=self.with_sum_sq, router=self.router,
                              with_statistics=model.token_statistics)

    def __call__(self, policy: ForwardLogps, reference: ReferenceLogps,
                 batch: PreferenceBatch, counts: StepCounts | None = None) -> ObjectiveOutput:
        """The loss of ``batch``; with the step's ``counts``, its share of the step's mean.
        A MoE policy's router loss (``policy.aux_loss``) is added with its weight (with the
        counts, as the step's mean over its micro-batches and ranks)."""
        if self.paired:
            out = self._paired(policy, reference, batch, counts)
        else:
            out = self._unpaired(policy, reference, batch, counts)
        if policy.statistics is not None:
            out.metrics.update(token_metrics(policy, batch, paired=self.paired))
        if policy.aux_loss is not None and self.router is not None:
            share = self.router.coef * policy.aux_loss.float()
            if counts is not None:
                share = share / counts.micro_batches
            out.loss = out.loss + share
            out.metrics["aux_loss"] = policy.aux_loss.detach().float()
        return out

    # ------------------------------------------------------------------------------ pairs
    def _paired(self, policy: ForwardLogps, reference: ReferenceLogps,
                batch: PreferenceBatch, counts: StepCounts | None) -> ObjectiveOutput:
        if batch.num_pairs < 1:
            raise ValueError(f"loss.method {self.method!r} needs pair batches")
        b = batch.num_pairs
        if batch.ranked is not None and self.listwise:
            return self._listwise(policy, reference, batch, counts)
        chosen, rejected = pair_logps(policy.sequence, batch)
        stats = self._pair_stats(policy, reference, batch, counts)
        if self.dpo is not None:
            ref_c = ref_r = None
            if self.uses_reference:
                ref_c, ref_r = (side.logps for side in pair_logps(reference.sequence, batch))
            out = preference_loss(chosen.logps, rejected.logps, ref_c, ref_r, options=self.dpo,
                                  stats=stats)
        elif self.cpo is not None:
            out = cpo_loss(chosen.logps, rejected.logps, options=self.cpo, stats=stats)
        else:
            out = orpo_loss(chosen.logps, rejected.logps, beta=self.orpo_beta, stats=stats)
        metrics = dict(out.metrics)
        if self.uses_reference:
            metrics["ref_kl"] = _log_ratio_kl(policy, reference)
        if batch.ranked is not None and self.dpo is not None:
            metrics.update(self._ranking_metrics(policy, reference, batch))
        margin = out.chosen_rewards - out.rejected_rewards
        items = margin.new_full((), float(b))  # a fill on the device, not a host copy
        sums = torch.stack([
            items, out.losses.detach().sum(), (margin > 0).sum(), margin.sum(),
            out.chosen_rewards.sum(), out.rejected_rewards.sum(), items, items]).double()
        return ObjectiveOutput(_step_share(out.loss, out.losses, counts), metrics, sums)

    def _pair_stats(self, policy: ForwardLogps, reference: ReferenceLogps,
                    batch: PreferenceBatch, counts: StepCounts | None = None) -> PairStats:
        """The statistics of the pairs beside their log-probs: token counts and logit sums, and
        the LD-DPO tails and WPO sums when the options ask for them."""
        b = batch.num_pairs
        chosen, rejected = pair_logps(policy.sequence, batch)
        extra: dict[str, Tensor | None] = {}
        if self.with_tails and batch.ranked is not None:
            raise ValueError("loss.ld_alpha (LD-DPO) needs pair rows; ranked items lay out no "
                             "shared pair length")
        if self.with_tails:
            extra.update(policy_chosen_tail_logps=policy.tail_logps[:b],
                         policy_rejected_tail_logps=policy.tail_logps[b:])
            if self.uses_reference:
                extra.update(ref_chosen_tail_logps=reference.tail_logps[:b],
                             ref_rejected_tail_logps=reference.tail_logps[b:])
        if self.with_sum_sq:
            sum_sq = policy.log_sum_sq_probs
            if batch.ranked is not None:
                extra.update(chosen_log_sum_sq_probs=sum_sq[batch.ranked.pair_chosen],
                             rejected_log_sum_sq_probs=sum_sq[batch.ranked.pair_rejected])
            else:
                extra.update(chosen_log_sum_sq_probs=sum_sq[:b],
                             rejected_log_sum_sq_probs=sum_sq[b:])
        return PairStats(
            chosen_num_tokens=chosen.num_tokens, rejected_num_tokens=rejected.num_tokens,
            chosen_logits_sum=chosen.logits_sum, rejected_logits_sum=rejected.logits_sum,
            vocab_size=self.vocab_size if chosen.logits_sum is not None else None,
            chosen_tokens_per_pair=None if counts is None else counts.tokens_per_pair(), **extra)

    # ---------------------------------------------------------------------------- ranked
    def _rewards(self, policy: ForwardLogps, reference: ReferenceLogps) -> Tensor:
        """β·(log π − log π_ref) of every sequence (detached; no reference: β·log π)."""
        ratio = policy.sequence.logps.detach().double()
        if self.uses_reference:
            ratio = ratio - reference.sequence.logps.double()
        return self.dpo.beta * ratio

    def _ranking_metrics(self, policy: ForwardLogps, reference: ReferenceLogps,
                         batch: PreferenceBatch) -> dict[str, Tensor]:
        g = batch.ranked
        return ranking_metrics(self._rewards(policy, reference), g.strict_better, g.strict_worse,
                               g.strict_item, g.num_items)

    def _listwise(self, policy: ForwardLogps, reference: ReferenceLogps,
                  batch: PreferenceBatch, counts: StepCounts | None) -> ObjectiveOutput:
        """DPO's Plackett–Luce loss over each ranked item (mean over items)."""
        if self.dpo is None:
            raise ValueError("ranked.loss 'plackett_luce' needs loss.method 'dpo'")
        g = batch.ranked
        ref = reference.sequence.logps if self.uses_reference else None
        out = plackett_luce_loss(policy.sequence.logps, ref, g.order, beta=self.dpo.beta)
        rewards = out.rewards
        chosen, rejected = rewards[g.pair_chosen], rewards[g.pair_rejected]
        margin = chosen - rejected
        metrics = {**out.metrics, **self._ranking_metrics(policy, reference, batch),
                   "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/accuracies": (margin > 0).to(margin.dtype).mean(),
                   "rewards/margins": margin.mean()}
        if self.uses_reference:
            metrics["ref_kl"] = _log_ratio_kl(policy, reference)
        # evaluation sums over items: "correct" is a right full ranking
        items = rewards.new_full((), float(g.num_items))
        right = metrics["rewards/ranking_accuracy"] * items
        pairs = rewards.new_full((), float(batch.num_pairs))
        sums = torch.stack([
            items, out.losses.detach().sum(), right, margin.sum() * items / pairs,
            chosen.sum() * items / pairs, rejected.sum() * items / pairs, items,
            items]).double()
        return ObjectiveOutput(_step_share(out.loss, out.losses, counts), metrics, sums)

    # ------------------------------------------------------------------------------- KTO
    def _unpaired(self, policy: ForwardLogps, reference: ReferenceLogps,
                  batch: PreferenceBatch, counts: StepCounts | None) -> ObjectiveOutput:
        if batch.num_examples < 1 or batch.desirable is None:
            raise ValueError("loss.method 'kto' needs unpaired batches (collate_unpaired)")
        n = batch.num_examples
        examples, kl_policy = split_unpaired(policy.sequence, n)
        ref_examples, kl_ref = split_unpaired(reference.sequence, n)
        kl = None
        if self.with_kl:
            if kl_policy is None or kl_ref is None:
                raise ValueError("loss_type 'kto' needs the mismatched KL sequences in the batch")
            # z0 over the whole global batch: mean of the per-rank means (equal batch sizes)
            kl = self.all_reduce_mean(kl_reference_point(kl_policy.logps, kl_ref.logps))
        desirable = batch.desirable.to(examples.logps.device)
        out = kto_loss(examples.logps, ref_examples.logps, desirable, options=self.kto, kl=kl,
                       num_tokens=examples.num_tokens, logits_sum=examples.logits_sum,
                       vocab_size=self.vocab_size if examples.logits_sum is not None else None)
        metrics = dict(out.metrics)
        metrics["ref_kl"] = _log_ratio_kl(policy, reference)
        rewards = out.rewards
        # "correct": the implicit reward has the sign of the label
        correct = torch.where(desirable, rewards > 0, rewards < 0)
        d = desirable.to(rewards.dtype)
        sums = torch.stack([
            rewards.new_full((), float(n)), out.losses.detach().sum(),
            correct.sum(), (rewards * (2 * d - 1)).sum(), (rewards * d).sum(),
            (rewards * (1 - d)).sum(), d.sum(), (1 - d).sum()]).double()
        return ObjectiveOutput(_step_share(out.loss, out.losses, counts), metrics, sums)


def _step_share(mean: Tensor, losses: Tensor, counts: StepCounts | None) -> Tensor:
    """The loss to backpropagate: the batch's ``mean`` alone, or with the step's ``counts`` its
    per-item ``losses`` summed and scaled so that the step's accumulated gradient is that of
    its mean over every item of every micro-batch and rank."""
    if counts is None:
        return mean
    return losses.sum() * counts.loss_scale().to(losses.dtype)


def token_metrics(policy: ForwardLogps, batch: PreferenceBatch, *, paired: bool
                  ) -> dict[str, Tensor]:
    """TRL's per-token metrics from the head's statistics (device scalars): ``entropy``, the
    mean over the completion tokens of the loss's sequences (KTO: not the KL ones), and
    ``mean_token_accuracy``, how often the label is the top-1 token on the chosen completions
    (KTO: the examples')."""
    stats, seq = policy.statistics, batch.target_sequence
    scope = seq < (2 * batch.num_pairs if paired else batch.num_examples)
    chosen = seq < batch.num_pairs if paired else scope
    entropy = (stats.entropy.float() * scope).sum() / scope.sum().clamp(min=1)
    accuracy = (stats.is_top1 & chosen).sum() / chosen.sum().clamp(min=1)
    return {"entropy": entropy, "mean_token_accuracy": accuracy.float()}


def _log_ratio_kl(policy: ForwardLogps, reference: ReferenceLogps) -> Tensor:
    """Mean over the batch's sequences of log π(y|x) − log π_ref(y|x) on its completions: the
    sequence-level KL estimate (k1) on the data completions."""
    return (policy.sequence.logps.detach().float() - reference.sequence.logps.float()).mean()


def summarize_eval(sums: Tensor, *, paired: bool) -> dict[str, float]:
    """Held-out metrics from the summed statistics (after the all-reduce): the evaluation's one
    device-to-host read."""
    s = dict(zip(EVAL_KEYS, sums.double().cpu().tolist()))
    items = max(s["items"], 1.0)
    out = {
        "items": int(s["items"]),
        "loss": s["loss"] / items,
        "rewards/accuracies": s["correct"] / items,
    }
    if paired:
        out["rewards/margins"] = s["margin"] / items
        out["rewards/chosen"] = s["chosen_reward"] / items
        out["rewards/rejected"] = s["rejected_reward"] / items
    else:
        # a held-out split with no desirable (or no undesirable) example has no value for that
        # side: the key is left out (with its count), never reported as NaN
        out.update({"count/chosen": int(s["chosen_items"]),
                    "count/rejected": int(s["rejected_items"])})
        if s["chosen_items"]:
            out["rewards/chosen"] = s["chosen_reward"] / s["chosen_items"]
        if s["rejected_items"]:
            out["rewards/rejected"] = s["rejected_reward"] / s["rejected_items"]
        if s["chosen_items"] and s["rejected_items"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
