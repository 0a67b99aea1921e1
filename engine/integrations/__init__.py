"""Drop-in integrations of fastpo's ops into existing trainers.

    from fastpo.engine.integrations import patch_trainer   # TRL DPOTrainer / KTOTrainer
    patch_trainer(trainer)

Importing this package does not import TRL; ``patch_trainer`` does, when called.
"""

from .trl import patch_trainer, path_counts, unpatch_trainer

__all__ = ["patch_trainer", "path_counts", "unpatch_trainer"]
