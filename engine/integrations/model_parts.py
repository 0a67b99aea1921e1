"""Completion log-probs in your own ``compute_loss`` (HF ``Trainer``, plain PyTorch), any causal LM.

    from fastpo.engine.integrations.model_parts import completion_logps
    from fastpo.engine.losses import preference_loss

    # input_ids/attention_mask [2B, T]: chosen rows then rejected rows; labels = input_ids with
    # -100 on prompt and padding (a causal LM's unshifted ``labels``)
    policy = completion_logps(model, labels, input_ids=ids, attention_mask=mask)
    with torch.no_grad():                       # the reference: one of the three below
        ref = completion_logps(ref_model, labels, input_ids=ids, attention_mask=mask)
    chosen, rejected = policy.logps[:B], policy.logps[B:]
    loss = preference_loss(chosen, rejected, ref.logps[:B], ref.logps[B:], beta=0.1).loss

Where the reference log-probs come from:

- a frozen copy of the starting model (``ref_model``), evaluated as above under ``no_grad``;
- with a PEFT adapter, the same model with the adapter switched off:
  ``with torch.no_grad(), model.disable_adapter(): ref = completion_logps(model, ...)``;
- precomputed once before training (the same call over the dataset, stored as columns such as
  ``ref_chosen_logps``), then read from the batch: no reference forward during training.

How the parts are found, without naming any architecture's attributes (no ``model.model``):

- PEFT and DeepSpeed/DDP wrappers are unwrapped (``get_base_model()``, ``.module``); a PEFT
  prompt-learning adapter (prompt/prefix tuning, P-tuning) is refused: its virtual tokens are
  added by the wrapper's forward, which the body call would skip;
- the body is ``model.base_model`` (the module named by ``base_model_prefix``): it takes the same
  inputs as the model (a vision-language model's images too) and returns ``last_hidden_state``;
  ``get_decoder()`` when the model is its own base model;
- the head is ``model.get_output_embeddings()``.

The ``[tokens, vocab]`` logits are never built when the head is a plain ``nn.Linear``: its weight
goes to :func:`fastpo.kernels.linear_sequence_logps` (gathered under DeepSpeed ZeRO-3). Any other
head (a PEFT adapter on the lm_head, a quantized head) runs as a module, on the scored positions
only, and :func:`fastpo.kernels.token_logps` takes its logits. A model that scales its logits
(``logit_scale``, ``logits_scaling``, ...) or soft-caps them (Gemma-2's
``final_logit_softcapping``) keeps the fused path: the op applies the same transform
(``logit_scale=``, ``softcap=``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastpo import kernels
from fastpo.kernels.logit_transform import config_logit_transform, transform_logits
from fastpo.kernels.zero3 import find_lm_head, gathered_lm_head, unwrap_engine

IGNORE_INDEX = -100



def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DeepSpeed/DDP and PEFT wrappers (adapter layers stay on)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_engine(model)
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and hasattr(model, "get_base_model"):
        active = getattr(model, "active_adapter", None)
        config = peft_config.get(active) if isinstance(active, str) else None
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(f"{type(model).__name__} has a prompt-learning PEFT adapter "
                             f"({type(config).__name__}); its virtual tokens are added by the "
                             "PEFT forward, so the body cannot be called directly: use "
                             "model(...).logits with fastpo.kernels.sequence_logps instead")
        model = model.get_base_model()
    return model


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that maps the model's inputs to its final hidden states (``last_hidden_state``).

    ``model.base_model`` (named by ``base_model_prefix``), else ``model.get_decoder()``; raises
    ``TypeError`` for a module with neither (not a transformers causal LM).
    """
    model = unwrap(model)
    body = getattr(model, "base_model", None)
    if (body is None or body is model) and hasattr(model, "get_decoder"):
        body = model.get_decoder()
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"{type(model).__name__} has no decoder body (base_model / "
                        "get_decoder()); pass a transformers causal LM such as "
                        "AutoModelForCausalLM, not its body")
    return body


def lm_head(model: nn.Module) -> nn.Module:
    """The output head of ``model`` (``get_output_embeddings()``), after unwrapping."""
    return find_lm_head(unwrap(model))


def final_hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """Run the decoder body on ``inputs`` (the model's own keyword inputs) -> ``[B, T, H]``.

    No logits are computed and no cache is built (``use_cache=False``).
    """
    if "labels" in inputs:
        raise TypeError("final_hidden_states takes the model inputs only; labels go to "
                        "completion_logps")
    out = decoder_body(model)(**{**inputs, "use_cache": False})
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, Tensor):
        raise TypeError(f"the body of {type(unwrap(model)).__name__} returned "
                        f"{type(out).__name__} without a last_hidden_state tensor")
    return hidden


def head_transform(model: nn.Module) -> tuple[float, float | None]:
    """(logit scale, soft-cap or None) that the model applies to its head's output."""
    inner = unwrap(model)
    return config_logit_transform(getattr(inner, "config", None), type(inner).__name__)


def _check_labels(labels: Tensor, hidden: Tensor) -> None:
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64/int32 tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the inputs "
                         f"{tuple(hidden.shape[:-1])} (labels are unshifted, like input_ids)")


def completion_logps(model: nn.Module, labels: Tensor, *, temperature: float = 1.0,
                     fused_linear: bool | None = None, **inputs: Any) -> kernels.SequenceLogps:
    """Per-sequence sums of the label log-probs (and token counts) of a causal LM.

    ``labels``: ``[B, T]`` like a causal LM's ``labels`` (unshifted: the label of position t+1
    is scored from position t), ``-100`` where not scored. ``inputs``: the model's keyword inputs
    (``input_ids``, ``attention_mask``, ...). ``fused_linear``: None picks the fused linear op
    when the head allows it, False always builds the logits of the scored positions. Returns
    ``SequenceLogps(logps [B] float32, num_tokens [B])``, differentiable w.r.t. the model.
    """
    if fused_linear not in (None, True, False):
        raise TypeError(f"fused_linear must be None, True or False, got {fused_linear!r}")
    hidden = final_hidden_states(model, **inputs)
    _check_labels(labels, hidden)
    hidden, labels = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    head = lm_head(model)
    scale, cap = head_transform(model)
    plain = type(head) is nn.Linear and head.weight.is_floating_point()
    if fused_linear and not plain:
        raise ValueError(f"fused_linear=True but the head is a {type(head).__name__}, "
                         "not a plain torch.nn.Linear with a float weight")
    if fused_linear and not scale > 0:
        raise ValueError(f"fused_linear=True but the model's logit scale {scale} is not > 0")
    if fused_linear is not False and plain and scale > 0:
        with gathered_lm_head(head) as (weight, bias):
            return kernels.linear_sequence_logps(hidden, weight, labels, bias=bias,
                                                 temperature=temperature, logit_scale=scale,
                                                 softcap=cap)
    scored = labels != IGNORE_INDEX
    logits = transform_logits(head(hidden[scored]), logit_scale=scale, softcap=cap,
                              temperature=1.0)
    per_token = kernels.token_logps(logits, labels[scored], temperature=temperature)
    full = per_token.new_zeros(labels.shape).masked_scatter(scored, per_token)
    return kernels.SequenceLogps(*kernels.reduce_sequences(full, scored))


__all__ = [
    "completion_logps",
    "decoder_body",
    "final_hidden_states",
    "head_transform",
    "lm_head",
    "unwrap",
]
