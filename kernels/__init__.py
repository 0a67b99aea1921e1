"""fastpo.kernels: fused masked log-probability ops for preference optimization.

    token_logps(logits, labels)        log softmax(logits / T)[label] per token, 0 where ignored
    sequence_logps(logits, labels)     the same reduced per sequence (sum or mean) + token counts
    linear_token_logps(hidden, weight, labels)     the same from hidden states and the lm_head
    linear_sequence_logps(hidden, weight, labels)  weight, logits never materialized whole
    segment_sum(values, sequence_ids, n)           per-sequence sums of per-token values
    backend_info()                     which implementation each device uses
"""

if __name__ != "fastpo.kernels":
    # This folder imported by the bare top-level name ``kernels``: the repository root is on
    # sys.path (``python -m`` or pytest from a checkout) and someone, transformers among them,
    # asked for the hub package of that name, which transformers >= 5.25 requires. Hand over
    # the installed hub package, found on sys.path without the repository root; with none
    # installed, the name is absent. Never this folder a second time: its ops are
    # ``fastpo.kernels``, imported under that name only.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        del _sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r} (the repository's kernels/ "
                                  "folder is fastpo.kernels)", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
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
