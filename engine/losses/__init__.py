"""fastpo.engine.losses: preference losses, pure functions of per-sequence log-probs.

The layer above the kernels and below everything else: it imports torch and ``fastpo.kernels``
only (never data, models or the trainer), so ``pip install fastpo`` without extras runs it.

    registry.py        preference_loss (TRL's DPO ``loss_type`` names, alone or weighted), a
                       short dispatcher over the loss types, and the re-exports below
    loss_types.py      LOSS_TYPES: each DPO loss type's formula and needs; CPO / KTO names
    options.py         DPOOptions, CPOOptions, KTOOptions: the fronts' options, validated once
    pairwise.py        the pairwise formulas (DPO family, NLL, SimPO, ORPO), one function each
    weighting.py       WPO pair weights, LD-DPO length desensitization and its tails
    reference_free.py  cpo_loss, orpo_loss
    unpaired.py        kto_loss
    inputs.py          PairStats (token counts, tails, logit sums), input checks, dtypes, output
    metrics.py         rewards, margins, accuracies
    fused_linear.py    fused_linear_*_loss: hidden states + lm_head straight to the loss
    modules.py         FusedLinear*Loss: the same as ``nn.Module``
"""

# the public names are registry.py's: one list, re-exported here
from .registry import *  # noqa: F403
from .registry import __all__  # noqa: F401
