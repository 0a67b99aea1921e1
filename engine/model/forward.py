"""Policy forward: per-sequence completion log-probs from a causal LM, one forward per batch.

    out = sequence_logps_from_model(model, batch)             # SequenceLogps, S sequences
    chosen, rejected = split_pairs(out, batch.num_pairs)

The decoder body (``model.get_decoder()``) runs to the final hidden states; only the hidden
states at scored positions (``batch.target_index``: completion tokens, never prompt or padding)
go to the output head, through the fused linear log-prob op with the model's output-embedding
weight, so the ``[tokens, vocab]`` logits never exist whole and the model's own ``lm_head``
forward never runs. ``use_fused_linear=False`` builds the logits of the scored positions only
and applies the from-logits op instead. Per-sequence sums are a segment sum over
``batch.target_sequence``; the same code serves padded and packed batches.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor, nn

from fastpo import kernels
from fastpo.kernels.linear_logprobs import linear_logits_sum, linear_token_logps
from fastpo.kernels.linear_logprobs_stats import (
    TokenStatistics,
    linear_token_logps_with_statistics,
    logits_statistics,
)
from fastpo.kernels.logit_transform import (
    config_logit_transform,
    transform_logits,
)
from fastpo.kernels.zero3 import find_lm_head, gathered_lm_head, resolve_lm_head
from fastpo.kernels.zero3 import unwrap_engine as unwrap_model

from ..data.batch import PreferenceBatch
from ..data.shared_prompt import shared_prompt_attention_mask
from ..losses.router import RouterSettings, router_aux_loss
from . import attention as segment_attention

SequenceLogps = kernels.SequenceLogps
logger = logging.getLogger(__name__)


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                 cap: float | None) -> Tensor:
    """The model's logits of the hidden rows ``h``: ``(h Wᵀ + b)·s``, soft-capped."""
    return transform_logits(torch.nn.functional.linear(h, weight, bias), logit_scale=scale,
                            softcap=cap)


_WARNED_QUANTIZED_HEAD: set[str] = set()


def _warn_quantized_head(model: nn.Module, weight: Tensor) -> None:
    """Logged once per model class: a quantized head cannot feed the fused linear op."""
    name = type(model).__name__
    if name not in _WARNED_QUANTIZED_HEAD:
        _WARNED_QUANTIZED_HEAD.add(name)
        logger.warning("%s: the output head is quantized (%s weight); the fused linear op needs "
                       "a float head, so the head module builds the logits of the scored "
                       "positions and the from-logits op takes them (keep the head unquantized "
                       "for the fused path: the default of model.quantization)", name,
                       weight.dtype)


def _compute_dtype(model: nn.Module, device_type: str) -> torch.dtype:
    """The dtype of the model's activations (autocast's, else its input embedding's)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() \
        else torch.float32


def uses_varlen_attention(attn_implementation: str | None) -> bool:
    """Whether the attention takes packed sequences as ``cu_seqlens`` (flash-attention 2/3 and
    hub flash kernels); SDPA, eager and flex read them from the position ids instead."""
    return "flash" in (attn_implementation or "")


def final_hidden_states(model: nn.Module, batch: PreferenceBatch) -> Tensor:
    """Run the decoder body on the batch and return the final hidden states ``[R, L, H]``."""
    return decoder_outputs(model, batch)[0]


def decoder_outputs(model: nn.Module, batch: PreferenceBatch, *,
                    output_router_logits: bool = False) -> tuple[Tensor, Any]:
    """The decoder body on the batch: the final hidden states ``[R, L, H]`` and, with
    ``output_router_logits`` (a MoE model), its routers' logits per layer (else None)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder body (get_decoder())")
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,  # a cache would switch off the packed-sequence detection
    }
    if output_router_logits:
        kwargs["output_router_logits"] = True
    config = getattr(model, "config", None)
    plan = batch.attention_plan
    if plan is not None and segment_attention.applies(config, plan, batch.max_seqlen):
        # packed / shared-prompt rows: attention per piece, the masked blocks never computed
        kwargs.update(segment_attention.forward_kwargs(plan, batch.input_ids.shape[0],
                                                       batch.input_ids.device))
    elif batch.prompt_shared:
        dtype = _compute_dtype(model, batch.input_ids.device.type)
        kwargs["attention_mask"] = shared_prompt_attention_mask(
            batch, getattr(model, "config", None), dtype=dtype)
    elif batch.packed and batch.cu_seqlens is not None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if uses_varlen_attention(impl):
            # transformers' flash path takes these kwargs (FlashAttentionKwargs) and runs the
            # varlen kernel over the packed row instead of inferring them from position_ids
            cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                          max_length_k=batch.max_seqlen)
    out = body(**kwargs)
    if segment_attention.PLAN_KWARG in kwargs:
        segment_attention.check_ran(plan, model)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.shape[:2] != batch.input_ids.shape:
        raise RuntimeError(f"decoder returned hidden states of shape {tuple(hidden.shape)} for "
                           f"input_ids {tuple(batch.input_ids.shape)}")
    router_logits = getattr(out, "router_logits", None) if output_router_logits else None
    if output_router_logits and not router_logits:
        raise TypeError(f"{type(model).__name__}: the decoder returned no router logits with "
                        "output_router_logits=True (set model.router_aux_loss_coef: 0 to train "
                        "without the MoE load-balancing loss)")
    return hidden, router_logits


class ForwardOptions(TypedDict, total=False):
    """The keyword options of :func:`forward_logps` a trainer fixes once for its policy."""

    use_fused_linear: bool
    with_logits_sum: bool
    with_tail_logps: bool
    with_log_sum_sq_probs: bool
    router: RouterSettings | None
    with_statistics: bool


class ForwardLogps(NamedTuple):
    """Everything one forward gives: per-sequence results and per-token log-probs.

    ``token_logps`` ``[N]`` (with grad) follow ``batch.target_index``. ``tail_logps`` ``[S]``:
    the part of each sequence's logps beyond its pair's shared completion length (LD-DPO's
    input). ``log_sum_sq_probs`` ``[S]``: ``Σ_t log Σ_v π(v|·)²`` over the scored tokens (WPO
    weights; detached). ``aux_loss`` (0-d, with grad): a MoE policy's router load-balancing
    loss over the batch's real tokens. ``statistics``: per scored token, the entropy, mean logit,
    top-1 and log Σ p² of the next-token distribution, from the head's own pass (no grad).
    """

    sequence: SequenceLogps
    token_logps: Tensor
    tail_logps: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    aux_loss: Tensor | None = None
    statistics: TokenStatistics | None = None


def forward_logps(model: nn.Module, batch: PreferenceBatch, *, use_fused_linear: bool = True,
                  temperature: float = 1.0, with_logits_sum: bool = False,
                  with_tail_logps: bool = False, with_log_sum_sq_probs: bool = False,
                  router: RouterSettings | None = None, with_statistics: bool = False
                  ) -> ForwardLogps:
    """One forward of ``model`` on ``batch``: see :func:`sequence_logps_from_model`.

    ``with_tail_logps`` (pair batches) adds LD-DPO's tail sums; ``with_log_sum_sq_probs`` adds
    WPO's per-sequence ``Σ_t log Σ_v π²``; ``router`` (a MoE policy's settings) adds the router
    load-balancing loss; ``with_statistics`` the per-token statistics. On the fused path both
    come from the op's own pass over the vocabulary; the logits path reads its logits.
    """
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"batch must be a PreferenceBatch, got {type(batch).__name__}")
    if with_tail_logps and batch.target_tail is None:
        raise ValueError("tail logps need a pair batch (collate_pairs / collate_batch)")
    model = unwrap_model(model)
    # the scale and soft-cap the model applies to its head's logits: both paths apply them
    scale, cap = config_logit_transform(getattr(model, "config", None), type(model).__name__)
    resolve_lm_head(model)  # a clear error for a model without output embeddings
    hidden, router_logits = decoder_outputs(model, batch, output_router_logits=router is not None)
    aux = None
    if router is not None:  # every real token counts, whatever the layout
        aux = router_aux_loss(router_logits, router,
                              token_mask=(batch.sequence_ids >= 0).to(torch.long))
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)
    if batch.shared_prompt is not None:  # a prompt's last position scores two tokens
        labels = batch.shared_prompt.target_labels
    else:
        labels = batch.labels.reshape(-1).index_select(0, batch.target_index)
    logits_sum_tokens = sum_sq = stats = None
    want_stats = with_statistics or with_log_sum_sq_probs
    # ZeRO-3: the head is gathered for the op and its gradient still reaches the shards
    with gathered_lm_head(model) as (weight, bias):
        quantized_head = not weight.is_floating_point()
        if quantized_head and use_fused_linear:
            _warn_quantized_head(model, weight)
        if use_fused_linear and not quantized_head:
            options = {"bias": bias, "ignore_index": batch.ignore_index,
                       "temperature": temperature, "softcap": cap, "logit_scale": scale}
            if want_stats:
                token_logps, stats = linear_token_logps_with_statistics(h, weight, labels,
                                                                        **options)
            else:
                token_logps = linear_token_logps(h, weight, labels, **options)
            if with_logits_sum:  # a mat-vec without soft-cap, chunked logits with one
                logits_sum_tokens = linear_logits_sum(h, weight, bias, logit_scale=scale,
                                                      softcap=cap).float()
        else:
            if quantized_head:  # the head module runs (bitsandbytes dequantizes it)
                logits = transform_logits(find_lm_head(model)(h), logit_scale=scale, softcap=cap)
            else:
                logits = _head_logits(h, weight, bias, scale, cap)
            token_logps = kernels.token_logps(logits, labels, ignore_index=batch.ignore_index,
                                              temperature=temperature)
            if with_logits_sum:
                logits_sum_tokens = logits.detach().float().sum(-1)
            if want_stats:
                stats = logits_statistics(transform_logits(logits, temperature=temperature),
                                          labels, ignore_index=batch.ignore_index)
    if with_log_sum_sq_probs:
        sum_sq = stats.log_sum_sq_probs.float()
    token_logps = token_logps.float()
    segments, count = batch.target_sequence, batch.num_sequences
    logps = kernels.segment_sum(token_logps, segments, count)
    logits_sum = None
    if logits_sum_tokens is not None:
        logits_sum = kernels.segment_sum(logits_sum_tokens, segments, count)
    tail = None
    if with_tail_logps:
        tail = kernels.segment_sum(token_logps * batch.target_tail, segments, count)
    return ForwardLogps(
        SequenceLogps(logps, batch.completion_tokens, logits_sum), token_logps, tail,
        None if sum_sq is None else kernels.segment_sum(sum_sq, segments, count), aux,
        stats if with_statistics else None)


def sequence_logps_from_model(model: nn.Module, batch: PreferenceBatch, *,
                              use_fused_linear: bool = True, temperature: float = 1.0,
                              with_logits_sum: bool = False) -> SequenceLogps:
    """Summed completion log-probs of each sequence of the batch (float32 ``[S]``).

    ``logps[s] = Σ_{t scored in s} log softmax((h_t Wᵀ + b) / T)[labels_t]``, ``num_tokens[s]``
    the scored-token count and, with ``with_logits_sum``, ``logits_sum[s] = Σ_t Σ_v (h_t Wᵀ +
    b)_v`` (raw logits, for the ``logits/*`` metrics; no gradient).
    """
    return forward_logps(model, batch, use_fused_linear=use_fused_linear,
                         temperature=temperature, with_logits_sum=with_logits_sum).sequence


def split_pairs(seq_logps: SequenceLogps, num_pairs: int) -> tuple[SequenceLogps, SequenceLogps]:
    """``(chosen, rejected)`` of a pair batch's results (sequences ``0..B−1``, ``B..2B−1``)."""
    n = seq_logps.logps.shape[0]
    if n != 2 * num_pairs or num_pairs < 1:
        raise ValueError(f"{n} sequences cannot be split into {num_pairs} chosen/rejected pairs")
    return _slice(seq_logps, 0, num_pairs), _slice(seq_logps, num_pairs, 2 * num_pairs)


def pair_logps(seq_logps: SequenceLogps, batch: PreferenceBatch
               ) -> tuple[SequenceLogps, SequenceLogps]:
    """``(chosen, rejected)`` of the pairs of a pair batch (:func:`split_pairs`) or of a ranked
    batch (its per-completion results gathered by the pair indices: a completion in several
    pairs is computed once)."""
    groups = batch.ranked
    if groups is None:
        return split_pairs(seq_logps, batch.num_pairs)
    if seq_logps.logps.shape[0] != batch.num_sequences:
        raise ValueError(f"{seq_logps.logps.shape[0]} results for a ranked batch of "
                         f"{batch.num_sequences} completions")
    return _take(seq_logps, groups.pair_chosen), _take(seq_logps, groups.pair_rejected)


def _take(s: SequenceLogps, index: Tensor) -> SequenceLogps:
    index = index.to(s.logps.device)
    return SequenceLogps(s.logps[index], s.num_tokens[index.to(s.num_tokens.device)],
                         None if s.logits_sum is None else s.logits_sum[index])


def split_unpaired(seq_logps: SequenceLogps, num_examples: int
                   ) -> tuple[SequenceLogps, SequenceLogps | None]:
    """``(examples, kl)`` of an unpaired batch; ``kl`` is None when it has no KL sequences."""
    n = seq_logps.logps.shape[0]
    if num_examples < 1 or n not in (num_examples, 2 * num_examples):
        raise ValueError(f"{n} sequences do not hold {num_examples} examples (+ KL sequences)")
    kl = _slice(seq_logps, num_examples, n) if n == 2 * num_examples else None
    return _slice(seq_logps, 0, num_examples), kl


def _slice(s: SequenceLogps, start: int, stop: int) -> SequenceLogps:
    return SequenceLogps(s.logps[start:stop], s.num_tokens[start:stop],
                         None if s.logits_sum is None else s.logits_sum[start:stop])
