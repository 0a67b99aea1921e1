"""fastpo: fused log-probability ops and preference losses for DPO-family training.

The public names, importable as ``fastpo.<name>``:

    ops        token_logps, sequence_logps                      from logits
               linear_token_logps, linear_sequence_logps        from hidden states + lm_head
               SequenceLogps, backend_info
    losses     preference_loss (every TRL DPO loss type), cpo_loss, orpo_loss, kto_loss
    fused      FusedLinearDPOLoss, FusedLinearCPOLoss, FusedLinearSimPOLoss,
               FusedLinearORPOLoss, FusedLinearKTOLoss (modules with the call convention of the
               chunked fused-linear loss modules) and their functional forms fused_linear_*_loss
    trainers   patch_trainer (TRL's DPOTrainer / KTOTrainer; TRL is imported when it is called)

Everything else lives in named submodules: ``fastpo.kernels`` (the ops and their options),
``fastpo.engine`` (data, models, the DeepSpeed trainer: the ``train`` extra) and
``fastpo.engine.integrations`` (TRL, any causal LM's hidden states and head). Importing
``fastpo`` imports torch and triton only: never TRL, transformers or DeepSpeed.

This package's source folder is ``api/`` (mapped to ``fastpo`` by ``setup.py``), so that no
``fastpo/`` folder at the repository root shadows the installed package.
"""

from typing import Any as _Any

from fastpo.engine.losses import cpo_loss, kto_loss, orpo_loss, preference_loss
from fastpo.engine.losses.fused_linear import (
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    fused_linear_simpo_loss,
)
from fastpo.engine.losses.modules import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from fastpo.kernels import (
    SequenceLogps,
    backend_info,
    linear_sequence_logps,
    linear_token_logps,
    sequence_logps,
    token_logps,
)

__version__ = "0.1.0"


def patch_trainer(trainer: _Any, *, fused_linear: bool | None = None) -> _Any:
    """Make a TRL ``DPOTrainer`` / ``KTOTrainer`` compute its log-probs with fastpo; returns it.

    Call it after building the trainer and before ``train()``: TRL's losses, metrics and config
    stay TRL's, only the per-token log-probabilities (and the statistics TRL logs) come from
    fastpo's fused linear op (or its from-logits op where the head needs the logits).
    ``fused_linear``: None picks the fused linear op where the head allows it, False always
    builds the logits. Needs the ``trl`` extra (``pip install 'fastpo[trl]'``); TRL is imported
    here, on the first call, never by ``import fastpo``. Undo with
    ``fastpo.engine.integrations.unpatch_trainer``; see ``fastpo.engine.integrations.trl``.
    """
    from fastpo.engine.integrations.trl import patch_trainer as patch

    return patch(trainer, fused_linear=fused_linear)


__all__ = [
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
    "SequenceLogps",
    "backend_info",
    "cpo_loss",
    "fused_linear_cpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "fused_linear_simpo_loss",
    "kto_loss",
    "linear_sequence_logps",
    "linear_token_logps",
    "orpo_loss",
    "patch_trainer",
    "preference_loss",
    "sequence_logps",
    "token_logps",
]
