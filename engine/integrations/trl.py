"""Drop-in fastpo for TRL: ``DPOTrainer`` and ``KTOTrainer`` compute their logps with fastpo's ops.

    from fastpo.engine.integrations.trl import patch_trainer

    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    patch_trainer(trainer)          # the one line
    trainer.train()

How TRL (1.15 and later; ``trl_compat`` says why not before) computes logps: while a trainer is
built, ``trl.trainer.utils.add_fused_lm_head`` replaces the ``forward`` of the policy (and of the
reference model). Called with ``fused_lm_head=True`` and ``labels``, that forward runs the
transformer body and a chunked log-prob function over the final hidden states and
``lm_head.weight``, and returns a ``FusedCausalLMOutput`` (``log_probs`` per token, and the
``entropy``, ``mean_logits``, ``is_top1`` and ``log_sum_sq_probs`` the trainer asked for).
Every loss type and metric of ``DPOTrainer`` and ``KTOTrainer`` reads only that output.

``patch_trainer`` replaces the ``fused_lm_head=True`` branch of that forward — any other call still
goes to TRL's forward — with one that fills the same output from fastpo:

- ``log_probs`` (with gradient): ``fastpo.kernels.linear_token_logps`` on the hidden states and
  the lm_head weight (gathered by ``fastpo.kernels.zero3.gathered_lm_head`` under ZeRO-3); the
  ``[N, V]`` logits are never built and prompt/padding positions are never computed. When the head
  is not a plain ``nn.Linear`` with a float weight (quantized, FSDP2 DTensor) or the model
  soft-caps its logits, the head module runs on the scored positions only and the from-logits op
  (``fastpo.kernels.token_logps``) takes its logits (``fused_linear=False`` forces this path).
- the statistics TRL logs (no gradient: TRL detaches them, and WPO uses its weights as constants):
  on the fused linear path they come from the op's own pass over the vocabulary
  (``fastpo.kernels.linear_logprobs_stats``: no second V×H pass), on the logits path from the
  logits; only the fields TRL asked this model for (none for a reference model).

The loss types, config, metrics, data pipeline, PEFT and reference handling stay TRL's own; the
trainer's temperature, logit scale, soft-cap and lm_head dtype settings are read from the forward
TRL installed. A reference model whose forward accelerate already wrapped for mixed precision gets
the same autocast wrapper around fastpo's forward. MoE models keep fastpo's head too: when the
trainer (or the config) asks for router logits, the body returns them and the output carries
the router load-balancing loss (``aux_loss``, added to ``loss`` with the config's
``router_aux_loss_coef``), as TRL's forward does; the trainer adds it to its loss. Only the
per-token log-probabilities (and that loss) carry a gradient: the trainers supported here use the
statistics as detached metrics or constant weights.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from fastpo.kernels.zero3 import find_lm_head

from ..losses.router import router_aux_loss, router_settings
from .trl_compat import MIN_TRL_VERSION, check_trl, fused_head_closure
from .trl_head import HeadSettings, choose_path, linear_path, logits_path, settings_from

IGNORE_INDEX = -100
SUPPORTED_TRAINERS = ("DPOTrainer", "KTOTrainer")


@dataclass
class PatchState:
    """What ``patch_model`` keeps on a model: TRL's forward, the settings, and path counters."""

    trl_forward: Callable[..., Any]
    settings: HeadSettings
    fused_linear: bool | None
    calls: Counter = field(default_factory=Counter)
    outer_forward: Callable[..., Any] | None = None  # model.forward before patching


# --------------------------------------------------------------------------- reading TRL's patch


def _trl_forward_of(model: torch.nn.Module) -> tuple[Any, dict[str, Any] | None, bool]:
    """(TRL's fused forward of ``model`` or None, its closure settings, whether accelerate
    wrapped it for autocast).

    With mixed precision, ``Accelerator.prepare_model`` (run by the trainers on the reference
    model) keeps the forward it wraps as ``model._original_forward``.
    """
    own = model.__dict__.get("forward")
    closure = fused_head_closure(own)
    if closure is not None:
        return own, closure, False
    inner = model.__dict__.get("_original_forward")
    closure = fused_head_closure(inner)
    if closure is not None:
        return inner, closure, True
    return None, None, False


def _output_class():
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput


def _fused_forward(model: torch.nn.Module, state: PatchState, args: tuple, kwargs: dict,
                   labels: Tensor | None, shift_labels: Tensor | None,
                   num_items_in_batch: Any) -> Any:
    settings = state.settings
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
    kwargs["use_cache"] = False
    router = router_settings(getattr(model, "config", None))
    if router is not None and getattr(_text_config(model), "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)  # as the model's own forward would
    body = getattr(model, settings.backbone_attr)
    body_out = body(*args, **kwargs)
    hidden = body_out.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = find_lm_head(model)
    device = head.weight.device if isinstance(getattr(head, "weight", None), Tensor) \
        else hidden.device
    hidden, labels = hidden.to(device), labels.to(device)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the hidden states "
                         f"{tuple(hidden.shape[:-1])}")
    mask = labels != IGNORE_INDEX
    path, _why = choose_path(head, settings, state.fused_linear)
    state.calls[path] += 1
    run = linear_path if path == "linear" else logits_path
    log_probs, stats = run(head, hidden, labels, mask, settings)
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denominator
    aux_loss = None
    if kwargs.get("output_router_logits"):
        if router is None:
            raise ValueError(f"output_router_logits=True but {type(model).__name__} is not a "
                             "mixture-of-experts model (its config has no output_router_logits)")
        # padding-free rows carry no attention mask: every token counts
        aux_loss = router_aux_loss(body_out.router_logits, router,
                                   token_mask=kwargs.get("attention_mask"))
        loss = loss + router.coef * aux_loss
    values = {"loss": loss, "log_probs": log_probs, "label_mask": mask, "aux_loss": aux_loss,
              **stats}
    cls = _output_class()
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_patched(model: torch.nn.Module) -> bool:
    """Whether ``patch_model`` (or ``patch_trainer``) has been applied to ``model``."""
    return isinstance(getattr(model, "_fastpo_trl_state", None), PatchState)


def patch_state(model: torch.nn.Module) -> PatchState:
    """The patch state of ``model`` (settings, and how many calls took each path)."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by fastpo")
    return model._fastpo_trl_state


def patch_model(model: torch.nn.Module, *, fused_linear: bool | None = None,
                accelerator: Any = None) -> PatchState:
    """Route the ``fused_lm_head=True`` calls of a TRL-patched model through fastpo's ops.

    ``model`` is one that ``trl.trainer.utils.add_fused_lm_head`` has patched (the trainers do
    this for the policy and the reference model). ``fused_linear``: None picks the fused linear
    op when the head allows it, True requires it, False always uses the from-logits op.
    ``accelerator``: the trainer's, needed when it already wrapped the model's forward for mixed
    precision (the wrapper is rebuilt around fastpo's forward with the same autocast settings).
    Idempotent; :func:`unpatch_model` restores TRL's forward.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}")
    if fused_linear not in (None, True, False):
        raise TypeError(f"fused_linear must be None, True or False, got {fused_linear!r}")
    if is_patched(model):
        state = patch_state(model)
        state.fused_linear = fused_linear
        return state
    trl_forward, closure, wrapped = _trl_forward_of(model)
    if trl_forward is None:
        raise ValueError(
            f"{type(model).__name__}.forward was not patched by TRL's add_fused_lm_head; "
            f"build the TRL trainer first (TRL >= {MIN_TRL_VERSION} patches the models in its "
            "constructor), or call trl.trainer.utils.add_fused_lm_head(model) yourself")
    if wrapped and accelerator is None:
        raise ValueError(f"{type(model).__name__}.forward is wrapped by accelerate for mixed "
                         "precision; pass the trainer's accelerator= (or use patch_trainer)")
    state = PatchState(trl_forward=trl_forward, settings=settings_from(closure),
                       fused_linear=fused_linear)
    head = find_lm_head(model)
    path, why = choose_path(head, state.settings, fused_linear)  # fused_linear=True fails here
    if path == "logits" and fused_linear is None:
        warnings.warn(f"fastpo: {type(model).__name__}: {why}; its log-probs come from the "
                      "head's logits on the scored positions (fastpo.token_logps), not from the "
                      "fused linear op", RuntimeWarning, stacklevel=2)

    @functools.wraps(type(model).forward)
    def fastpo_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                       num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                               shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               **kwargs)
        return _fused_forward(self, state, args, kwargs, labels, shift_labels,
                              num_items_in_batch)

    state.outer_forward = model.__dict__.get("forward")
    if wrapped:
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        autocast = get_mixed_precision_context_manager(accelerator.native_amp,
                                                       accelerator.autocast_handler)
        model._original_forward = types.MethodType(fastpo_forward, model)
        model.forward = types.MethodType(convert_outputs_to_fp32(autocast(fastpo_forward)), model)
    else:
        model.forward = types.MethodType(fastpo_forward, model)
    model._fastpo_trl_state = state
    return state


def unpatch_model(model: torch.nn.Module) -> None:
    """Give ``model`` back the forward it had before :func:`patch_model`."""
    state = patch_state(model)
    if "_original_forward" in model.__dict__:
        model._original_forward = state.trl_forward
    model.forward = state.outer_forward
    del model._fastpo_trl_state


# --------------------------------------------------------------------------- trainers


def _check_trainer(trainer: Any) -> None:
    check_trl()  # TRL installed, and a release with the fused LM head (else ImportError)
    import trl

    supported = tuple(getattr(trl, name) for name in SUPPORTED_TRAINERS if hasattr(trl, name))
    if not isinstance(trainer, supported):
        raise TypeError(f"patch_trainer supports {', '.join(SUPPORTED_TRAINERS)} (and their "
                        f"subclasses), got {type(trainer).__name__}")


def trainer_models(trainer: Any) -> list[tuple[str, torch.nn.Module]]:
    """The (role, model) pairs whose forward TRL patched: the policy and the reference model."""
    from accelerate.utils import is_peft_model

    unwrap = trainer.accelerator.unwrap_model
    policy = unwrap(trainer.model)
    if is_peft_model(policy):
        policy = policy.get_base_model()
    found = [("policy", policy)]
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        found.append(("reference", unwrap(ref)))
    return found


def patch_trainer(trainer: Any, *, fused_linear: bool | None = None) -> Any:
    """Make a TRL ``DPOTrainer`` / ``KTOTrainer`` compute its logps with fastpo; returns it.

    Call it after building the trainer and before ``train()``. Losses, metrics and config are
    TRL's; only the per-token log-probabilities (and the statistics TRL logs) come from fastpo.
    See the module docstring for what is replaced and when the from-logits op is used. Needs
    TRL >= 1.15 (the first release with the fused LM head); an older TRL raises ``ImportError``
    naming the installed version (see ``trl_compat``).
    """
    _check_trainer(trainer)
    for _role, model in trainer_models(trainer):
        patch_model(model, fused_linear=fused_linear, accelerator=trainer.accelerator)
    return trainer


def unpatch_trainer(trainer: Any) -> Any:
    """Undo :func:`patch_trainer`."""
    for _role, model in trainer_models(trainer):
        if is_patched(model):
            unpatch_model(model)
    return trainer


def path_counts(trainer: Any) -> dict[str, dict[str, int]]:
    """role -> {"linear" | "logits": calls}, to see which path each model took."""
    return {role: dict(patch_state(m).calls) for role, m in trainer_models(trainer)
            if is_patched(m)}


__all__ = [
    "HeadSettings",
    "PatchState",
    "is_patched",
    "patch_model",
    "patch_state",
    "patch_trainer",
    "path_counts",
    "trainer_models",
    "unpatch_model",
    "unpatch_trainer",
]
