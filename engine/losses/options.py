"""The options of the loss fronts as typed, frozen objects, validated once when built.

    DPOOptions   preference_loss: loss types and weights, β, ε, f-divergence, DiscoPOP τ,
                 reference-free, LD-DPO α, WPO weighting
    CPOOptions   cpo_loss: loss type, β, ε, the NLL weight, SimPO γ, AlphaPO α
    KTOOptions   kto_loss: loss type, β, the desirable / undesirable weights

A bad value raises ``OptionError`` (a ``ValueError``; ``OptionTypeError`` is also a
``TypeError``) whose ``option`` names the field, so that a caller holding a config can name its
key. Each front also takes the fields as keywords (``fold_keywords``), as TRL names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from . import pairwise as pl
from .inputs import (
    check_beta,
    check_label_smoothing,
    check_positive,
    check_unit_interval,
    check_weight,
)
from .loss_types import CPO_LOSS_TYPES, KTO_LOSS_TYPES, LOSS_TYPES, LossSpec

T = TypeVar("T")


class OptionError(ValueError):
    """A loss option that cannot be used; ``option`` is its name."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class OptionTypeError(OptionError, TypeError):
    """A loss option of the wrong type."""


def _option(name: str, check: Callable[..., Any], *args: Any) -> Any:
    try:
        return check(*args)
    except TypeError as exc:
        raise OptionTypeError(name, str(exc)) from None
    except ValueError as exc:
        raise OptionError(name, str(exc)) from None


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionTypeError(name, f"{name} must be a bool, got {type(value).__name__}")


def _one_of(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise OptionError(name, f"unknown {name} {value!r}; valid loss types are {list(valid)}")


# ----------------------------------------------------------------------------------------------
# preference_loss
# ----------------------------------------------------------------------------------------------
def _loss_types(loss_type: object) -> tuple[str, ...]:
    valid = list(LOSS_TYPES)
    if isinstance(loss_type, str):
        types: tuple[Any, ...] = (loss_type,)
    elif isinstance(loss_type, Sequence):
        types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type must be a name or a list of names from {valid}, got "
                        f"{type(loss_type).__name__}")
    if not types:
        raise ValueError(f"loss_type is empty; give one or more of {valid}")
    for name in types:
        if not isinstance(name, str) or name not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; valid loss types are {valid}")
    return types


def _loss_weights(weights: object, types: tuple[str, ...]) -> tuple[float, ...] | None:
    if weights is None:
        return None
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(f"loss_weights must be a list of floats, got {type(weights).__name__}")
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has "
                         f"{len(types)} ({list(types)}); give one weight per loss type")
    return tuple(check_weight(f"loss_weights[{i}]", w) for i, w in enumerate(weights))


@dataclass(frozen=True)
class DPOOptions:
    """``preference_loss``'s options (TRL's DPO names). ``loss_type``: a name or a list of names
    from ``LOSS_TYPES`` (kept as a tuple); ``loss_weights``: one each (None: 1 each). ε
    (``label_smoothing``) enters sigmoid (cDPO), robust, exo_pair (> 0 there) and the aot types;
    ``f_divergence_type`` applies to the types defined on s_c − s_r; ``ld_alpha`` ∈ [0, 1] is
    LD-DPO's α (None: off); ``use_weighting`` turns on WPO's pair weights."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    reference_free: bool = False
    ld_alpha: float | None = None
    use_weighting: bool = False

    def __post_init__(self) -> None:
        types = _option("loss_type", _loss_types, self.loss_type)
        object.__setattr__(self, "loss_type", types)
        weights = _option("loss_weights", _loss_weights, self.loss_weights, types)
        object.__setattr__(self, "loss_weights", weights)
        _option("beta", check_beta, self.beta)
        _option("label_smoothing", check_label_smoothing, self.label_smoothing)
        if "exo_pair" in types:
            _option("label_smoothing", pl.check_exo_pair_smoothing, self.label_smoothing)
        if "discopop" in types:
            _option("discopop_tau", check_positive, "discopop_tau", self.discopop_tau)
        divergence = self.f_divergence_type
        if divergence not in pl.F_DIVERGENCES:
            raise OptionError("f_divergence_type", f"unknown f_divergence_type {divergence!r}; "
                              f"expected one of {list(pl.F_DIVERGENCES)}")
        if divergence == "alpha_divergence":
            _option("f_alpha_divergence_coef", check_unit_interval, "f_alpha_divergence_coef",
                    self.f_alpha_divergence_coef)
        unsupported = [t for t in types if not LOSS_TYPES[t].f_divergence]
        if divergence != "reverse_kl" and unsupported:
            defined = [t for t, s in LOSS_TYPES.items() if s.f_divergence]
            raise OptionError("f_divergence_type", f"f_divergence_type={divergence!r} is defined "
                              f"only for loss types {defined}; got {unsupported}")
        _check_bool("reference_free", self.reference_free)
        if self.ld_alpha is not None:
            _option("ld_alpha", check_unit_interval, "ld_alpha", self.ld_alpha)
        _check_bool("use_weighting", self.use_weighting)
        sorting = [t for t in types if LOSS_TYPES[t].sorts_batch]
        if self.use_weighting and sorting:
            raise OptionError("use_weighting",
                              f"use_weighting is not defined for {sorting}: they sort the batch")

    @property
    def specs(self) -> tuple[LossSpec, ...]:
        return tuple(LOSS_TYPES[t] for t in self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (1 each when ``loss_weights`` is None)."""
        return self.loss_weights or (1.0,) * len(self.loss_type)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        return not self.reference_free and any(s.needs_reference for s in self.specs)

    @property
    def num_tokens_users(self) -> list[str]:
        """What needs the completion token counts: loss types, and WPO's ``use_weighting``."""
        users = [t for t, s in zip(self.loss_type, self.specs) if s.needs_num_tokens]
        return [*users, "use_weighting"] if self.use_weighting else users


# ----------------------------------------------------------------------------------------------
# cpo_loss, kto_loss
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CPOOptions:
    """``cpo_loss``'s options (TRL's CPO names): ``loss_type`` from ``CPO_LOSS_TYPES``;
    ``cpo_alpha`` the NLL weight (``alphapo`` forces it to 0, as TRL does); ``simpo_gamma``
    SimPO's margin γ; ``alpha`` AlphaPO's reward shape (0: off)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, CPO_LOSS_TYPES)
        _option("beta", check_beta, self.beta)
        _option("label_smoothing", check_label_smoothing, self.label_smoothing)
        for name in ("cpo_alpha", "simpo_gamma", "alpha"):
            object.__setattr__(self, name, _option(name, check_weight, name, getattr(self, name)))
        if self.cpo_alpha < 0:  # a negative NLL weight would push the chosen answers down
            raise OptionError("cpo_alpha", f"cpo_alpha is the weight of the chosen answers' "
                              f"NLL term and must be >= 0, got {self.cpo_alpha}")

    @property
    def formula(self) -> str:
        """The loss type's formula: ``alphapo`` is ``simpo`` (with the AlphaPO reward)."""
        return "simpo" if self.loss_type == "alphapo" else self.loss_type

    @property
    def nll_weight(self) -> float:
        return 0.0 if self.loss_type == "alphapo" else self.cpo_alpha


@dataclass(frozen=True)
class KTOOptions:
    """``kto_loss``'s options (TRL's KTO names): ``loss_type`` from ``KTO_LOSS_TYPES``, β, and
    the weights λ_D / λ_U of the desirable and undesirable examples."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, KTO_LOSS_TYPES)
        _option("beta", check_beta, self.beta)
        for name in ("desirable_weight", "undesirable_weight"):
            _option(name, check_positive, name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def uses_kl_reference_point(self) -> bool:
        """Whether the loss reads KTO's KL reference point z₀, estimated on mismatched
        (prompt, completion) pairs: ``kto`` does, ``apo_zero_unpaired`` does not."""
        return self.loss_type == "kto"


# ----------------------------------------------------------------------------------------------
# keywords
# ----------------------------------------------------------------------------------------------
def fold_keywords(cls: type[T], given: T | None, keywords: dict[str, Any], name: str) -> T:
    """``given`` (default: ``cls()``) with the entries of ``keywords`` that name fields of
    ``cls`` applied (and removed from ``keywords``); ``name`` is the argument ``given`` came in."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    mine = {k: keywords.pop(k) for k in list(keywords) if k in names}
    if given is None:
        return cls(**mine)
    if not isinstance(given, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(given).__name__}")
    return replace(given, **mine) if mine else given  # type: ignore[type-var]


def no_keywords_left(front: str, keywords: dict[str, Any]) -> None:
    if keywords:
        raise TypeError(f"{front}() got an unexpected keyword argument {next(iter(keywords))!r}")
