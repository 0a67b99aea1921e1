"""The reference strategies: what the trainer calls for reference log-probs, and nothing else.

Every strategy is a :class:`ReferenceStrategy`: ``reference_logps(batch, with_tail_logps=...)``
(no grad; LD-DPO tail sums on request), ``sequence_logps(batch)``, and the few hooks a training
loop needs (``use`` the train or held-out data, ``attach`` the policy as trained, ``soft_update``
towards the policy, ``state_dict`` / ``load_state_dict`` of weights that change). A trainer calls
these and never looks inside a strategy.

    FrozenReference(model, device=None)       a separate frozen model (eval, no grad, own device)
    AdapterDisabledReference(peft_model)      the policy with its PEFT adapter switched off: LoRA
                                              training needs no second copy of the weights
    NoReference()                             reference-free losses (SimPO, CPO, ORPO): zeros, no
                                              forward (TRL's ``reference_free`` convention)
    PrecomputedReference(train, eval)         logps computed once over the train and held-out
                                              sets (:mod:`.reference_cache`), read by index
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..data.batch import PreferenceBatch
from .forward import SequenceLogps, forward_logps, unwrap_model
from .gather import full_state_dict, load_full_state_dict
from .reference_sync import soft_update_lora, soft_update_separate


class ReferenceLogps(NamedTuple):
    """Reference results: per-sequence logps and, when asked, LD-DPO's tail sums ``[S]``."""

    sequence: SequenceLogps
    tail_logps: Tensor | None = None


class ReferenceStrategy(ABC):
    """Reference log-probs for a training loop. Only :meth:`reference_logps` is required; the
    hooks default to "nothing to do" where a strategy has nothing to do."""

    @abstractmethod
    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        """Per-sequence reference logps of ``batch`` (float32 ``[S]``), no gradient."""

    def sequence_logps(self, batch: PreferenceBatch) -> SequenceLogps:
        """Per-sequence reference logps of the batch (float32 ``[S]``), no gradient."""
        return self.reference_logps(batch).sequence

    def use(self, split: str) -> None:
        """The next batches come from ``split`` (``"train"`` or ``"eval"``)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    def attach(self, policy: nn.Module) -> None:  # noqa: B027  (a hook: most need nothing)
        """The policy as it is trained (cast, wrapped or sharded by the backend)."""

    def soft_update(self, policy: nn.Module, alpha: float) -> None:
        """reference ← (1 − α)·reference + α·policy (TR-DPO; α = 1: reset to the policy)."""
        raise ValueError(f"a {type(self).__name__} cannot follow the policy (reference.sync_steps"
                         " / reference.rounds need a separate or adapter-disabled reference)")

    def state_dict(self) -> dict[str, Tensor]:
        """CPU copies of the weights this strategy owns and training changes (saved with a
        checkpoint); empty when it owns none."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor], *, source: str) -> None:
        """Restore :meth:`state_dict` (from the file ``source``)."""
        if state:
            raise ValueError(f"{source}: a {type(self).__name__} has no weights of its own to "
                             "load (was the checkpoint written with another reference.mode?)")


class NoReference(ReferenceStrategy):
    """No reference model: logps are zeros (reference-free losses), nothing is run."""

    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        zeros = torch.zeros(batch.num_sequences, dtype=torch.float32, device=batch.device)
        return ReferenceLogps(SequenceLogps(zeros, batch.completion_tokens, None),
                              zeros.clone() if with_tail_logps else None)


class ModelReference(ReferenceStrategy):
    """A reference that runs a model's forward pass (see the two subclasses)."""

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None,
                 use_fused_linear: bool = True, temperature: float = 1.0) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.use_fused_linear = use_fused_linear
        self.temperature = temperature

    def _run(self, batch: PreferenceBatch, with_tail_logps: bool) -> ReferenceLogps:
        target = batch if self.device is None else batch.to(self.device)
        with torch.no_grad():
            out = forward_logps(self.model, target, use_fused_linear=self.use_fused_linear,
                                temperature=self.temperature, with_tail_logps=with_tail_logps)
        tail = None if out.tail_logps is None else out.tail_logps.to(batch.device)
        return ReferenceLogps(SequenceLogps(out.sequence.logps.to(batch.device),
                                            batch.completion_tokens, None), tail)

    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        return self._run(batch, with_tail_logps)

    def weights_model(self) -> nn.Module:
        """The model whose weights the logps come from (hashed to key a cache)."""
        return self.model


class FrozenReference(ModelReference):
    """A separate reference model, frozen (eval mode, no gradients), optionally on its own device.

    ``device`` puts the reference elsewhere than the policy (e.g. ``"cpu"`` to save accelerator
    memory): batches are moved there and the results moved back.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None,
                 use_fused_linear: bool = True, temperature: float = 1.0) -> None:
        super().__init__(model, device=device, use_fused_linear=use_fused_linear,
                         temperature=temperature)
        self.model.eval()
        self.model.requires_grad_(False)
        if self.device is not None:
            self.model.to(self.device)

    def soft_update(self, policy: nn.Module, alpha: float) -> None:
        soft_update_separate(self.model, policy, alpha)

    def state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Tensor], *, source: str) -> None:
        load_full_state_dict(self.model, state, source=source)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch dropout off for the reference pass and restore every module's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _peft_model(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(f"{type(inner).__name__} has no disable_adapter(); "
                        "AdapterDisabledReference needs a PEFT model")
    return inner


class AdapterDisabledReference(ModelReference):
    """The policy itself with its PEFT adapter(s) disabled: the base model, no second copy. Its
    weights are the policy's (saved with it), so it owns none; no eval()/requires_grad_ here:
    the same model is the policy being trained."""

    def __init__(self, peft_model: nn.Module, *, use_fused_linear: bool = True,
                 temperature: float = 1.0) -> None:
        super().__init__(_peft_model(peft_model), use_fused_linear=use_fused_linear,
                         temperature=temperature)

    def reference_logps(self, batch: PreferenceBatch, *, with_tail_logps: bool = False
                        ) -> ReferenceLogps:
        with self.model.disable_adapter(), _eval_mode(self.model):
            return self._run(batch, with_tail_logps)

    def attach(self, policy: nn.Module) -> None:
        self.model = _peft_model(policy)

    def soft_update(self, policy: nn.Module, alpha: float) -> None:
        soft_update_lora(policy, alpha)
