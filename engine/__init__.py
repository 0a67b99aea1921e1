"""fastpo.engine: data, batching, forward passes, losses and the DeepSpeed trainer.

The losses (``losses``, ``pairwise_losses``, ``reference_free_losses``, ``unpaired_losses``,
``fused_linear_losses``, ``loss_modules``) need only torch; the data, model and training modules
need the ``train`` extra (``pip install 'fastpo[train]'``), and importing one without it says so
(see ``_extras``).
"""

from . import _extras

_extras.install()
