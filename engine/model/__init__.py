"""fastpo.engine.model: forward passes of a causal LM, segment attention, reference strategies.

    forward.py         one forward pass → per-sequence log-probs (fused head, shared prompts)
    attention.py       segment attention: per-piece SDPA for packed and shared-prompt rows
    reference.py       the reference strategies behind one interface (``ReferenceStrategy``)
    reference_cache.py reference logps computed once, read by index (``PrecomputedReference``)
    reference_sync.py  TR-DPO: soft updates of the reference from the policy
    gather.py          ZeRO-3: gathering a module's parameters, full state dicts

Uses ``fastpo.kernels`` and ``fastpo.engine.data.dataset``; never the job (``fastpo.engine.train``).
"""
