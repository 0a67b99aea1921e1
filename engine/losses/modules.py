"""``nn.Module`` forms of the fused hidden-state preference losses of ``fused_linear``.

Constructor options and the ``forward`` argument order follow the chunked fused-linear loss
modules that trainers already call, so replacing the import is enough:

    loss, aux = FusedLinearDPOLoss(beta=0.1)(lm_head.weight, hidden, target, None,
                                             ref_hidden, ref_lm_head.weight)

``hidden`` holds the B chosen rows first, then the B rejected rows; ``target`` are the shifted
labels with ``ignore_index`` on prompt and padding tokens. Beyond that convention: every TRL DPO
loss type (IPO included) by name or as a list with ``loss_weights``, precomputed reference
log-probs (``ref_chosen_logps=`` / ``ref_rejected_logps=``, ``ref_logps=`` for KTO) instead of
reference hidden states, and CPO's ``loss_type`` / ``simpo_gamma``. Each module stores its
options as attributes and calls its function on every ``forward``; formulas and the aux tuple are
documented there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import fused_linear as fl
from . import fused_linear_inputs as fi
from . import pairwise as pl
from .inputs import check_weight

__all__ = [
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
]

Result = tuple[Tensor, fl.Aux]


def _checked_design(design: str) -> str:
    """``design`` of the functional form ("auto", "loss-fused" or "logps"), checked at build."""
    if design not in fi.DESIGNS:
        raise ValueError(f"design must be one of {fi.DESIGNS}, got {design!r}")
    return design


class FusedLinearDPOLoss(nn.Module):
    """DPO family on hidden states + lm_head (see ``fused_linear_dpo_loss``)."""

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
        compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
        average_log_prob: bool = False, chunk_size: int = 1,
        loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
        discopop_tau: float = 0.05, loss_weights: Sequence[float] | None = None, *,
        design: str = "auto",
    ) -> None:
        super().__init__()
        self.design = _checked_design(design)
        fi.check_common(ignore_index=ignore_index, beta=beta, compiled=compiled,
                        chunk_size=chunk_size, compute_nll_loss=compute_nll_loss,
                        use_ref_model=use_ref_model, average_log_prob=average_log_prob)
        check_weight("alpha", alpha)
        fi.dpo_loss_types(loss_type, loss_weights, label_smoothing, average_log_prob)
        if "discopop" in ([loss_type] if isinstance(loss_type, str) else loss_type):
            pl.check_positive("discopop_tau", discopop_tau)
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob
        self.chunk_size, self.loss_type = chunk_size, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau
        self.loss_weights = loss_weights

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
        ref_input: Tensor | None = None, ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None, *, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
    ) -> Result:
        """``(loss, aux)`` for ``_input [2B, T, H]`` (chosen rows, then rejected rows)."""
        return fl.fused_linear_dpo_loss(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias,
            ignore_index=self.ignore_index, beta=self.beta, alpha=self.alpha,
            compute_nll_loss=self.compute_nll_loss, compiled=self.compiled,
            use_ref_model=self.use_ref_model, average_log_prob=self.average_log_prob,
            chunk_size=self.chunk_size, design=self.design, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
            loss_weights=self.loss_weights, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps)


class FusedLinearORPOLoss(nn.Module):
    """ORPO on hidden states + lm_head (see ``fused_linear_orpo_loss``)."""

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
        compiled: bool = True, chunk_size: int = 1, *, design: str = "auto",
    ) -> None:
        super().__init__()
        self.design = _checked_design(design)
        fi.check_common(ignore_index=ignore_index, beta=beta, compiled=compiled,
                        chunk_size=chunk_size, compute_nll_loss=compute_nll_loss)
        self.ignore_index, self.beta = ignore_index, beta
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        self.chunk_size = chunk_size

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
        nll_target: Tensor | None = None,
    ) -> Result:
        """``(loss, aux)``; ``nll_target [2B, T]`` optionally replaces the NLL's labels."""
        return fl.fused_linear_orpo_loss(
            _input, lin_weight, target, bias, nll_target, ignore_index=self.ignore_index,
            beta=self.beta, compute_nll_loss=self.compute_nll_loss, compiled=self.compiled,
            chunk_size=self.chunk_size, design=self.design)


class FusedLinearCPOLoss(nn.Module):
    """CPO (and, through ``loss_type``, hinge / IPO / SimPO forms) on hidden states + lm_head
    (see ``fused_linear_cpo_loss``)."""

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
        label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
        average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
        simpo_gamma: float = 0.5, *, design: str = "auto",
    ) -> None:
        super().__init__()
        self.design = _checked_design(design)
        fi.check_common(ignore_index=ignore_index, beta=beta, compiled=compiled,
                        chunk_size=chunk_size, compute_nll_loss=compute_nll_loss,
                        average_log_prob=average_log_prob)
        check_weight("alpha", alpha)
        check_weight("simpo_gamma", simpo_gamma)
        pl.check_label_smoothing(label_smoothing)
        if loss_type not in fi.CPO_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are "
                             f"{fi.CPO_TYPES}")
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.label_smoothing, self.compute_nll_loss = label_smoothing, compute_nll_loss
        self.compiled, self.average_log_prob = compiled, average_log_prob
        self.chunk_size, self.loss_type, self.simpo_gamma = chunk_size, loss_type, simpo_gamma

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
    ) -> Result:
        """``(loss, aux)`` for ``_input [2B, T, H]`` (chosen rows, then rejected rows)."""
        return fl.fused_linear_cpo_loss(
            _input, lin_weight, target, bias, ignore_index=self.ignore_index, beta=self.beta,
            alpha=self.alpha, label_smoothing=self.label_smoothing,
            compute_nll_loss=self.compute_nll_loss, compiled=self.compiled,
            average_log_prob=self.average_log_prob, chunk_size=self.chunk_size,
            design=self.design,
            loss_type=self.loss_type, simpo_gamma=self.simpo_gamma)


class FusedLinearSimPOLoss(nn.Module):
    """SimPO on hidden states + lm_head (see ``fused_linear_simpo_loss``)."""

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
        label_smoothing: float = 0.0, compute_nll_loss: bool = True, compiled: bool = True,
        gamma: float = 0.5, chunk_size: int = 1, *, design: str = "auto",
    ) -> None:
        super().__init__()
        self.design = _checked_design(design)
        fi.check_common(ignore_index=ignore_index, beta=beta, compiled=compiled,
                        chunk_size=chunk_size, compute_nll_loss=compute_nll_loss)
        check_weight("alpha", alpha)
        check_weight("gamma", gamma)
        pl.check_label_smoothing(label_smoothing)
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.label_smoothing, self.compute_nll_loss = label_smoothing, compute_nll_loss
        self.compiled, self.gamma, self.chunk_size = compiled, gamma, chunk_size

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None,
    ) -> Result:
        """``(loss, aux)`` for ``_input [2B, T, H]`` (chosen rows, then rejected rows)."""
        return fl.fused_linear_simpo_loss(
            _input, lin_weight, target, bias, ignore_index=self.ignore_index, beta=self.beta,
            alpha=self.alpha, label_smoothing=self.label_smoothing,
            compute_nll_loss=self.compute_nll_loss, compiled=self.compiled, gamma=self.gamma,
            chunk_size=self.chunk_size, design=self.design)


class FusedLinearKTOLoss(nn.Module):
    """Unpaired KTO on hidden states + lm_head (see ``fused_linear_kto_loss``). Note the
    ``forward`` order of this family: ``_input`` first, then ``lin_weight``."""

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
        use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1, *,
        design: str = "auto",
    ) -> None:
        super().__init__()
        self.design = _checked_design(design)
        fi.check_common(ignore_index=ignore_index, beta=beta, compiled=compiled,
                        chunk_size=chunk_size, use_ref_model=use_ref_model,
                        average_log_prob=average_log_prob)
        self.ignore_index, self.beta, self.compiled = ignore_index, beta, compiled
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob
        self.chunk_size = chunk_size

    def forward(
        self, _input: Tensor, lin_weight: Tensor, target: Tensor, bias: Tensor | None = None,
        preference_labels: Tensor | None = None, ref_input: Tensor | None = None,
        ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
        kl: Tensor | float | None = None, *, ref_logps: Tensor | None = None,
    ) -> Result:
        """``(loss, aux)`` for ``_input [N, T, H]`` and bool ``preference_labels [N]``."""
        if preference_labels is None:
            raise ValueError("preference_labels is required: a bool tensor [N], true for the "
                             "desirable examples")
        return fl.fused_linear_kto_loss(
            _input, lin_weight, target, preference_labels, bias, ref_input, ref_weight,
            ref_bias, kl, ignore_index=self.ignore_index, beta=self.beta,
            compiled=self.compiled, use_ref_model=self.use_ref_model,
            average_log_prob=self.average_log_prob, chunk_size=self.chunk_size,
            design=self.design,
            ref_logps=ref_logps)
