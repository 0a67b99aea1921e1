"""The load-balancing (router auxiliary) loss of mixture-of-experts policies.

A MoE decoder returns, with ``output_router_logits=True``, each layer's router logits over the
batch's tokens; the auxiliary loss (Fedus et al., 2021, "Switch Transformers", Eq. 4-6, as
transformers implements it for every MoE family) pushes the routers toward balanced experts. A
trainer adds ``router_aux_loss_coef`` times it to the preference loss, as TRL's DPO and KTO
trainers do (the coefficient defaults to the model config's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class RouterSettings:
    """What the load-balancing loss needs to know of a MoE model (from its config)."""

    num_experts: int
    top_k: int
    coef: float  # the config's router_aux_loss_coef (0.0 when it declares none)


def router_settings(config: Any) -> RouterSettings | None:
    """The MoE settings of a model ``config`` (its text config for a multimodal one), or None
    when the model is not a mixture of experts (its config has no ``output_router_logits``)."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not hasattr(text, "output_router_logits"):
        return None
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if not isinstance(experts, int) or not isinstance(top_k, int):
        raise ValueError(f"{type(text).__name__} returns router logits but declares no "
                         "num_experts / num_local_experts and num_experts_per_tok")
    return RouterSettings(experts, top_k, float(getattr(text, "router_aux_loss_coef", 0.0)
                                                or 0.0))


def router_aux_loss(router_logits: tuple[Tensor, ...] | Tensor, settings: RouterSettings, *,
                    token_mask: Tensor | None) -> Tensor:
    """The load-balancing loss of one forward's router logits (one ``[tokens, experts]`` tensor
    per MoE layer); ``token_mask`` ``[rows, length]`` is 1 on real tokens (None: all count).
    transformers' implementation (the Mixtral one every MoE family shares), as TRL uses it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, settings.num_experts, settings.top_k,
                                    token_mask)
