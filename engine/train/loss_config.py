"""The ``loss`` section of the job config, and the options it gives the loss library.

``LossConfig`` names the loss as TRL does; ``dpo_options`` / ``cpo_options`` / ``kto_options``
build the typed options of ``preference_loss`` / ``cpo_loss`` / ``kto_loss``, whose validation
is the loss library's (``fastpo.engine.losses.options``): ``check`` turns its errors into a
ConfigError naming the ``loss.`` key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..losses import CPOOptions, DPOOptions, KTOOptions, OptionError
from .config_base import ConfigError, Section


# ------------------------------------------------------------------------------------- loss
class LossConfig(Section):
    """The loss, with TRL's names. ``method`` picks the family (TRL trainer): ``dpo``
    (``loss_type`` a list, weighted sum), ``cpo``, ``simpo`` (= cpo + simpo, cpo_alpha 0),
    ``orpo`` or ``kto`` (unpaired; paired data is split into desirable/undesirable)."""

    method: Literal["dpo", "cpo", "simpo", "orpo", "kto"] = "dpo"
    loss_type: list[str] | None = None  # default: sigmoid (dpo, cpo), simpo, kto
    loss_weights: list[float] | None = None
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence",
                               "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = Field(0.5, ge=0.0, le=1.0)
    discopop_tau: float = Field(0.05, gt=0.0)
    reference_free: bool = False
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0)
    use_weighting: bool = False
    cpo_alpha: float | None = None  # default 1.0 (cpo), 0.0 (simpo)
    simpo_gamma: float = 0.5
    alphapo_alpha: float = 0.0
    desirable_weight: float = Field(1.0, gt=0.0)
    undesirable_weight: float = Field(1.0, gt=0.0)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def resolved_loss_types(self) -> list[str]:
        """The loss types, with each method's default filled in."""
        if self.loss_type:
            return list(self.loss_type)
        return {"dpo": ["sigmoid"], "cpo": ["sigmoid"], "simpo": ["simpo"], "orpo": ["orpo"],
                "kto": ["kto"]}[self.method]

    def dpo_options(self) -> DPOOptions:
        """The options of ``preference_loss`` (method dpo)."""
        return DPOOptions(
            loss_type=tuple(self.resolved_loss_types()), loss_weights=self.loss_weights,
            beta=self.beta, label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau,
            reference_free=self.reference_free, ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting)

    def cpo_options(self) -> CPOOptions:
        """The options of ``cpo_loss`` (methods cpo, simpo: cpo_alpha 1.0, 0.0 by default)."""
        cpo_alpha = self.cpo_alpha
        if cpo_alpha is None:
            cpo_alpha = 0.0 if self.method == "simpo" else 1.0
        return CPOOptions(loss_type=self.resolved_loss_types()[0], beta=self.beta,
                          label_smoothing=self.label_smoothing, cpo_alpha=cpo_alpha,
                          simpo_gamma=self.simpo_gamma, alpha=self.alphapo_alpha)

    def kto_options(self) -> KTOOptions:
        """The options of ``kto_loss`` (method kto)."""
        return KTOOptions(loss_type=self.resolved_loss_types()[0], beta=self.beta,
                          desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight)

    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        if self.method in ("cpo", "simpo", "orpo"):
            return False
        return self.method == "kto" or self.dpo_options().uses_reference

    def with_kl(self) -> bool:
        """Whether the batches carry KTO's mismatched (prompt, completion) sequences, on which the
        loss estimates its KL reference point."""
        return self.method == "kto" and self.kto_options().uses_kl_reference_point

    def check(self) -> None:
        """The loss types, their weights and knobs, as the loss will take them; raises
        ConfigError naming the key."""
        types_ = self.resolved_loss_types()
        if self.method != "dpo" and len(types_) != 1:
            raise ConfigError(f"loss.loss_type: loss.method {self.method!r} takes one loss type, "
                              f"got {types_}; combined losses are a dpo feature")
        if self.method != "dpo" and self.loss_weights is not None and len(self.loss_weights) != 1:
            raise ConfigError(f"loss.loss_weights has {len(self.loss_weights)} entries for "
                              f"{len(types_)} loss types {types_}")
        if self.method in ("simpo", "orpo") and types_ != [self.method]:
            raise ConfigError(f"loss.loss_type: unknown {types_[0]!r} for loss.method "
                              f"{self.method!r}; valid: {self.method}")
        try:
            if self.method == "dpo":
                self.dpo_options()
            elif self.method in ("cpo", "simpo"):
                self.cpo_options()
            elif self.method == "kto":
                self.kto_options()
        except OptionError as exc:
            raise ConfigError(f"loss.{exc.option}: {exc} (loss.method {self.method!r})") from None
