"""How a fused-linear preference loss reaches the hidden states: two designs, shared statistics.

    logps        per-sequence log-probs from the fused linear op (``linear_sequence_logps``), the
                 loss on them, autograd back through the op, whose backward recomputes the
                 logits: 8·N·V·H of matmul work per step
    loss-fused   the loss inside the op (``fastpo.kernels.linear_logprobs_loss_fused``), chunk by
                 chunk of whole pairs, every gradient made in the forward: 6·N·V·H

A loss is given to both as ``terms(policy, counts, take)``: from the policy's per-sequence
log-probs (π, or π̄ with ``average``) and scored-token counts of some rows, a tuple whose first
item is their per-pair (unpaired: per-example) losses; ``take`` picks the same rows of any
per-row tensor of the caller's (reference log-probs, KTO labels). The batch loss is the mean of
those losses plus ``nll_weight`` · NLL (per scored chosen token of the batch). The loss-fused
chunks each add their losses' sum over the batch's number of pairs and their NLL share over the
batch's scored chosen tokens (divisors computed on the device before the chunk loop), so the two
designs agree up to rounding. A loss that sorts or normalizes across the batch is no such sum
and takes the logps design (``fused_linear`` says which).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastpo.kernels.linear_logits_sum import linear_logits_sum
from fastpo.kernels.linear_logprobs import linear_sequence_logps
from fastpo.kernels.linear_logprobs_loss_fused import (
    SequenceChunk,
    loss_fused_linear,
    sequence_token_counts,
)

from . import pairwise as pl
from .fused_linear_inputs import check_batch, check_ref_logps

Aux = tuple[Tensor, ...]
Take = Callable[[Tensor], Tensor]
Terms = Callable[[Tensor, Tensor, Take], tuple[Tensor, ...]]


def whole_batch(t: Tensor) -> Tensor:
    """The ``take`` of the whole batch."""
    return t


def design_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
                terms: Terms, *, paired: bool, average: bool, nll_weight: float | None,
                fused: bool, ignore_index: int, nll_target: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, π or π̄ per row, scored-token counts per row, NLL) by the loss-fused design
    (``fused``) or the logps design; the log-probs are differentiable on the logps design only,
    the NLL is detached (0 when ``nll_weight`` is None: no NLL term). ``nll_target``: the NLL's
    own labels (logps design only)."""
    rows = hidden.shape[0]
    half = rows // 2 if paired else rows
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if not fused:
        logps, sums, counts = sequence_logps(hidden, weight, target, bias,
                                             ignore_index=ignore_index, average=average)
        loss = terms(logps, counts, whole_batch)[0].mean()
        nll = zero
        if nll_weight is not None:
            nll = chosen_nll(sums, counts, hidden, weight, bias, nll_target,
                             ignore_index=ignore_index)
            loss = loss + nll_weight * nll
        return loss, logps, counts, nll.detach()
    chosen_tokens = sequence_token_counts(target, ignore_index)[:half].sum()
    chosen_tokens = chosen_tokens.to(torch.float32).clamp(min=1.0)

    def chunk_loss(chunk: SequenceChunk) -> Tensor:
        ranges = [(chunk.start, chunk.stop)]
        if paired:
            ranges.append((half + chunk.start, half + chunk.stop))

        def take(t: Tensor) -> Tensor:
            parts = [t[a:b] for a, b in ranges]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        sums, counts = chunk.logps, chunk.num_tokens
        policy = pl.per_token(sums, counts) if average else sums
        part = terms(policy, counts, take)[0].sum() / half
        if nll_weight is not None:
            part = part + nll_weight * (-sums[:chunk.stop - chunk.start].sum() / chosen_tokens)
        return part

    out = loss_fused_linear(hidden, weight, target, chunk_loss, bias=bias, paired=paired,
                            ignore_index=ignore_index)
    logps = pl.per_token(out.logps, out.num_tokens) if average else out.logps
    nll = zero
    if nll_weight is not None:
        nll = pl.nll_loss(out.logps[:half], chosen_num_tokens=out.num_tokens[:half]).mean()
    return out.loss, logps, out.num_tokens, nll


def sequence_logps(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, *,
                   ignore_index: int, average: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(π or π̄ per row, π per row, scored-token counts per row)."""
    out = linear_sequence_logps(hidden, weight, target, bias=bias, ignore_index=ignore_index)
    sums, counts = out.logps, out.num_tokens
    return (pl.per_token(sums, counts) if average else sums), sums, counts


def reference_logps(use_ref_model: bool, given: dict[str, Tensor | None],
                    ref_input: Tensor | None, ref_weight: Tensor | None, ref_bias: Tensor | None,
                    target: Tensor, _input: Tensor, *, ignore_index: int,
                    average: bool) -> Tensor | None:
    """Reference log-probs per row: precomputed ones, else from the reference hidden states
    (no gradient), else None without a reference model."""
    have = {k: v for k, v in given.items() if v is not None}
    if not use_ref_model:
        if have or ref_input is not None:
            raise ValueError(f"use_ref_model=False but reference inputs were given "
                             f"({[*have, *(['ref_input'] if ref_input is not None else [])]})")
        return None
    if have:
        if len(have) != len(given):
            raise ValueError(f"give all of {list(given)} or none; got only {list(have)}")
        if ref_input is not None:
            raise ValueError(f"give either ref_input (with ref_weight) or {list(given)}, not both")
        rows = target.shape[0] // len(given)
        return torch.cat([check_ref_logps(k, v, rows, _input) for k, v in given.items()])
    if ref_input is None or ref_weight is None:
        raise ValueError("use_ref_model=True needs ref_input and ref_weight (the reference "
                         f"model's hidden states and head), or precomputed {list(given)}")
    check_batch(ref_input, target, paired=False, name="ref_input")
    with torch.no_grad():
        return sequence_logps(ref_input, ref_weight, target, ref_bias,
                              ignore_index=ignore_index, average=average)[0]


def logit_sums_per_row(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Per row, Σ over every position t and vocabulary entry v of the logits, in closed form (no
    gradient, no logits built)."""
    return linear_logits_sum(hidden, weight, bias).sum(dim=1)


def chosen_nll(sums: Tensor, counts: Tensor, hidden: Tensor, weight: Tensor,
               bias: Tensor | None, nll_target: Tensor | None, *, ignore_index: int) -> Tensor:
    """NLL per scored chosen token (``nll_target``'s chosen half when given, else the target)."""
    half = hidden.shape[0] // 2
    if nll_target is not None:
        check_batch(hidden, nll_target, paired=True, target_name="nll_target")
        _, sums, counts = sequence_logps(hidden[:half], weight, nll_target[:half], bias,
                                 ignore_index=ignore_index, average=False)
        return pl.nll_loss(sums, chosen_num_tokens=counts).mean()
    return pl.nll_loss(sums[:half], chosen_num_tokens=counts[:half]).mean()


def paired_aux(logps: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
               nll: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Aux:
    """The paired losses' aux tuple (see ``fused_linear``)."""
    half, positions = hidden.shape[0] // 2, hidden.shape[1]
    logit_sums = logit_sums_per_row(hidden, weight, bias)
    scale = half * positions * weight.shape[0]
    logps = logps.detach()
    return (logps[:half], logps[half:], logit_sums[:half].sum() / scale,
            logit_sums[half:].sum() / scale, nll.detach(), chosen_rewards.detach(),
            rejected_rewards.detach())
