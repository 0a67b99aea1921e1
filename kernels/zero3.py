"""DeepSpeed ZeRO-3 and the fused linear op: gather the lm_head for it, keep its gradient right.

Under ZeRO-3 every rank keeps a 1/world shard of each parameter; outside the forward of the
module that owns it, ``param.data`` is an empty tensor. The fused op reads ``lm_head.weight``
directly (the lm_head module's forward never runs), so the weight has to be gathered around the
call, stay whole until the op's backward has used it, and its gradient must still reach ZeRO-3's
partitioned gradient. :func:`gathered_lm_head` does the three:

1. ``deepspeed.zero.GatheredParameters(params, modifier_rank=None)`` all-gathers the weight (and
   bias) for the duration of the block, and partitions them again on exit.
2. Inside the block the op is handed an alias of the gathered data made by an autograd function
   whose backward passes the gradient straight through to the parameter. The alias holds the
   gathered storage alive until the op's backward has run (ZeRO-3 re-partitions by pointing
   ``param.data`` at an empty tensor; the storage itself is freed when its last user lets go).
3. The gradient reaches the parameter through its ``AccumulateGrad`` node, where ZeRO-3's
   gradient hook reduce-scatters it into this rank's gradient shard, as for any parameter.
   ZeRO-3 counts the parameters it waits for from the autograd graph, so this one is included.

It works wherever the op is called: inside a module's forward or after the model returned its
hidden states. The price is that one full copy of the lm_head (per rank) lives from the forward to
the backward of the step. When the op runs inside the forward of a module of the DeepSpeed engine,
``fwd_module=that_module`` avoids it: the parameters are registered as that module's external
parameters, so ZeRO-3's own hooks gather them again before the module's backward and release them
after, and the op is handed the parameters themselves. Without ZeRO-3 parameters (plain PyTorch,
ZeRO-0/1/2) the context is a no-op that yields the parameters.

    with gathered_lm_head(model) as (weight, bias):
        out = linear_sequence_logps(hidden, weight, labels, bias=bias)
    loss = dpo_loss(out.logps, ...)
    engine.backward(loss)          # may be outside the block

    class PolicyLogps(nn.Module):  # or inside a module that the engine wraps
        def forward(self, batch):
            hidden = self.lm.model(batch.input_ids).last_hidden_state
            with gathered_lm_head(self.lm, fwd_module=self) as (weight, bias):
                return linear_sequence_logps(hidden, weight, batch.labels, bias=bias)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def is_zero3_parameter(param: Tensor | None) -> bool:
    """True for a parameter managed (partitioned) by DeepSpeed ZeRO-3: the one test of it."""
    return param is not None and hasattr(param, "ds_id")


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The whole shape of a parameter, also of a ZeRO-3 partitioned one (whose local data is an
    empty shard: its whole shape is ``ds_shape``)."""
    shape = getattr(param, "ds_shape", None) if is_zero3_parameter(param) else None
    return tuple(shape) if shape is not None else tuple(param.shape)


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine or a DDP wrapper (hooks stay on the submodules)."""
    while type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel") and hasattr(
            model, "module"):
        model = model.module
    return model


def find_lm_head(model: nn.Module) -> nn.Module:
    """The output head of a causal LM, ``model.get_output_embeddings()``; ``TypeError`` naming the
    model when it has none (a decoder body, say)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no output embeddings "
                        "(get_output_embeddings()); pass the causal LM with its lm_head, not its "
                        "decoder body")
    return head


def resolve_lm_head(model_or_module: nn.Module | Tensor) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of an lm_head: a model with ``get_output_embeddings()``, a module with a
    ``weight`` (``nn.Linear``, ``nn.Embedding``), or a weight tensor itself. The weight is 2-D
    ``[V, H]`` (a ZeRO-3 partitioned one by its :func:`full_shape`)."""
    if isinstance(model_or_module, Tensor):
        return model_or_module, None
    if not isinstance(model_or_module, nn.Module):
        raise TypeError("gathered_lm_head expects a model, a module or a weight tensor, got "
                        f"{type(model_or_module).__name__}")
    head = model_or_module
    getter = getattr(model_or_module, "get_output_embeddings", None)
    if callable(getter):
        found = getter()
        if found is not None:
            head = found
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or len(full_shape(weight)) != 2:
        raise TypeError(f"{type(model_or_module).__name__} has no output embeddings with a weight "
                        "[V, H] (get_output_embeddings() returned nothing usable and it has no "
                        "2-D .weight); pass the causal LM with its lm_head, not its decoder body")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def _release(param: Tensor) -> None:
    """Partition a parameter that the backward gathered, unless a module still uses it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status == ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
        param.partition()


class _GatheredAlias(torch.autograd.Function):
    """Identity on a gathered ZeRO-3 parameter: an alias of its full data whose gradient goes to it.

    Backward: the gradient leaves through the parameter's ``AccumulateGrad`` node, which needs
    the parameter at full shape (it lays the new gradient out like the parameter), so the
    parameter is all-gathered again if it was partitioned meanwhile; ZeRO-3's post-accumulate
    hook then reduce-scatters the gradient into this rank's shard, and the parameter is
    partitioned again when the backward pass ends.
    """

    @staticmethod
    def forward(ctx, param: Tensor) -> Tensor:
        ctx.param = param
        return param.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        param = ctx.param
        if param.data.numel() != param.ds_numel:
            param.all_gather()
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _release(param))
        return grad


@contextlib.contextmanager
def gathered_lm_head(
    model_or_module: nn.Module | Tensor,
    *,
    fwd_module: nn.Module | None = None,
    enabled: bool = True,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(weight, bias)`` of the lm_head, gathered if ZeRO-3 partitions them.

    Pass the yielded tensors (not ``model.lm_head.weight``) to the fused op; the backward may run
    after the block ends. ``fwd_module``: when the op runs inside the forward of a module of the
    DeepSpeed engine, name that module to let ZeRO-3 itself gather the parameters again for its
    backward (registered as its external parameters) instead of keeping the gathered copy alive
    from the forward to the backward. ``enabled=False`` yields the parameters untouched.
    """
    weight, bias = resolve_lm_head(model_or_module)
    params = [p for p in (weight, bias) if p is not None]
    if not enabled or not any(is_zero3_parameter(p) for p in params):
        yield weight, bias
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, fwd_module=fwd_module):
        if fwd_module is not None:
            yield weight, bias
            return

        def alias(p: Tensor | None) -> Tensor | None:
            if p is None or not is_zero3_parameter(p):
                return p
            if p.requires_grad and torch.is_grad_enabled():
                return _GatheredAlias.apply(p)
            return p.detach()

        yield alias(weight), alias(bias)
