"""fastpo.kernels: fused masked log-probability ops for preference optimization.

    token_logps(logits, labels)        log softmax(logits / T)[label] per token, 0 where ignored
    sequence_logps(logits, labels)     the same reduced per sequence (sum or mean) + token counts
    backend_info()                     which implementation each device uses
"""

from .logprobs import SequenceLogps, reduce_sequences, sequence_logps, token_logps
from .ops import backend_info, set_cpu_backend, use_cpu_backend

__all__ = [
    "SequenceLogps",
    "backend_info",
    "reduce_sequences",
    "sequence_logps",
    "set_cpu_backend",
    "token_logps",
    "use_cpu_backend",
]
