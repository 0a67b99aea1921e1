"""fastpo.kernels: fused masked log-probability ops for preference optimization.

    token_logps(logits, labels)        log softmax(logits / T)[label] per token, 0 where ignored
    sequence_logps(logits, labels)     the same reduced per sequence (sum or mean) + token counts
    linear_token_logps(hidden, weight, labels)     the same from hidden states and the lm_head
    linear_sequence_logps(hidden, weight, labels)  weight, logits never materialized whole
    segment_sum(values, sequence_ids, n)           per-sequence sums of per-token values
    backend_info()                     which implementation each device uses
"""

if __name__ != "fastpo.kernels":
    # This folder imported as a bare top-level ``kernels`` (the repository root is on sys.path,
    # e.g. ``python -m`` from a checkout, and transformers probes for a hub package of that name):
    # hand back the installed ``fastpo.kernels`` instead of loading a second copy of the ops,
    # whose registrations would replace the first ones.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("fastpo.kernels")
else:
    from .linear_logprobs import linear_sequence_logps, linear_token_logps
    from .logprobs import (
        SequenceLogps,
        reduce_sequences,
        segment_sum,
        sequence_logps,
        token_logps,
    )
    from .ops import backend_info, set_cpu_backend, use_cpu_backend

__all__ = [
    "SequenceLogps",
    "backend_info",
    "linear_sequence_logps",
    "linear_token_logps",
    "reduce_sequences",
    "segment_sum",
    "sequence_logps",
    "set_cpu_backend",
    "token_logps",
    "use_cpu_backend",
]
