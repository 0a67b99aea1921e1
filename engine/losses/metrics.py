"""Training metrics of the preference losses, under TRL's names, as detached 0-d tensors.

    rewards/chosen, rewards/rejected   mean implicit reward of the chosen / rejected completions
    rewards/accuracies                 fraction of pairs with reward_c > reward_r (paired only)
    rewards/margins                    mean of reward_c − reward_r
    logps/chosen, logps/rejected       mean per-sequence log-prob entering the loss
    logits/chosen, logits/rejected     mean logit over the vocabulary and the scored tokens
    nll_loss                           NLL per chosen token
    log_odds_ratio, log_odds_chosen    ORPO: mean log σ(L) and mean L (L the log odds ratio)
    kl                                 KTO: the clamped KL reference point

Values are local to the batch and stay on the device: nothing here reads them on the host, so
the caller decides when (and after which all-reduce) to turn them into numbers.
"""

from __future__ import annotations

from torch import Tensor

from .inputs import PairStats, PreferenceLossOutput


def mean_logit(logits_sum: Tensor, num_tokens: Tensor, *, vocab_size: int) -> Tensor:
    """Σ_b logits_sum[b] / (V · Σ_b num_tokens[b]): the mean over every scored token of the batch
    of its mean logit (TRL's ``logits/*``). ``logits_sum[b]`` is Σ over the scored tokens of b of
    Σ over the vocabulary of the logits (``SequenceLogps.logits_sum``). 0 with no tokens."""
    total = num_tokens.to(logits_sum.dtype).sum().clamp(min=1.0) * vocab_size
    return (logits_sum.sum() / total).detach()


def preference_output(
    losses: Tensor,
    *,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    stats: PairStats,
    nll: Tensor | None,
) -> PreferenceLossOutput:
    """The output of a pairwise loss: mean loss, per-pair losses ``[B]``, detached rewards
    ``[B]`` and the metrics of the batch. ``logits/*`` are included when ``stats`` has the logit
    sums, the token counts and ``vocab_size`` (the logit sums cast to the losses' dtype),
    ``nll_loss`` when ``nll`` (0-d) is given."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    if stats.vocab_size is not None:
        for side, logits_sum, num_tokens in (
            ("chosen", stats.chosen_logits_sum, stats.chosen_num_tokens),
            ("rejected", stats.rejected_logits_sum, stats.rejected_num_tokens),
        ):
            if logits_sum is not None and num_tokens is not None:
                metrics[f"logits/{side}"] = mean_logit(
                    logits_sum.to(losses.dtype), num_tokens, vocab_size=stats.vocab_size
                )
    if nll is not None:
        metrics["nll_loss"] = nll.detach()
    return PreferenceLossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # Mean over the selected entries; NaN (0/0) when none is selected, as a "no value" marker.
    values = values.detach()
    return (values * mask.to(values.dtype)).sum() / mask.to(values.dtype).sum()


def unpaired_metrics(
    rewards: Tensor,
    logps: Tensor,
    desirable: Tensor,
    *,
    kl: Tensor,
    logits_sum: Tensor | None = None,
    num_tokens: Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """Metrics of a batch of unpaired (KTO) examples; ``desirable`` is a bool ``[N]``.

    "chosen" means the desirable examples and "rejected" the undesirable ones. A metric of a kind
    absent from the batch is NaN (TRL logs nothing for it); skip NaN when averaging over steps.
    """
    undesirable = ~desirable
    metrics = {
        "kl": kl.detach(),
        "rewards/chosen": _masked_mean(rewards, desirable),
        "rewards/rejected": _masked_mean(rewards, undesirable),
        "logps/chosen": _masked_mean(logps, desirable),
        "logps/rejected": _masked_mean(logps, undesirable),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if logits_sum is not None and num_tokens is not None and vocab_size is not None:
        logits_sum = logits_sum.detach()
        num_tokens = num_tokens.to(logits_sum.dtype)
        for side, mask in (("chosen", desirable), ("rejected", undesirable)):
            weight = mask.to(logits_sum.dtype)
            metrics[f"logits/{side}"] = (logits_sum * weight).sum() / (
                (num_tokens * weight).sum() * vocab_size
            )
    return metrics
