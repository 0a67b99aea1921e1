"""Drop-in integrations of fastpo's ops into existing trainers.

    from fastpo.engine.integrations import patch_trainer   # TRL DPOTrainer / KTOTrainer (>= 1.15)
    patch_trainer(trainer)

    from fastpo.engine.integrations import completion_logps  # your own compute_loss, any causal LM
    seq = completion_logps(model, labels, input_ids=ids, attention_mask=mask)

Importing this package does not import TRL; ``patch_trainer`` does, when called.
"""

from .model_parts import completion_logps, decoder_body, final_hidden_states, lm_head
from .trl import patch_trainer, path_counts, unpatch_trainer
from .trl_compat import MIN_TRL_VERSION, TESTED_TRL_VERSIONS

__all__ = [
    "MIN_TRL_VERSION",
    "TESTED_TRL_VERSIONS",
    "completion_logps",
    "decoder_body",
    "final_hidden_states",
    "lm_head",
    "patch_trainer",
    "path_counts",
    "unpatch_trainer",
]
