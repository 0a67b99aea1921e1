"""fastpo.engine: losses, data, models and the DeepSpeed trainer, one subpackage per layer.

    losses/        pure functions of per-sequence log-probs (torch only)
    data/          files → records → tokenized examples → batches
    model/         forward passes, segment attention, reference strategies
    train/         the job: config, DeepSpeed, loop, checkpoints, logging, ``fastpo-train``
    integrations/  TRL's trainers and any causal LM's hidden states and head
    errors.py      the InputError family, shared by every layer

Dependencies run one way: ``fastpo.kernels`` ← losses ← data ← model ← train; integrations use
the kernels and the losses only (``tests/test_architecture.py`` checks it). The losses need only
torch; the data, model and training modules need the ``train`` extra (``pip install
'fastpo[train]'``) where they use its packages, and importing one without it says so (see
``_extras``).
"""

from . import _extras

_extras.install()
