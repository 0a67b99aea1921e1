"""Kernel suite: per-sequence log-probabilities of label tokens, fastpo against the alternatives.

Two families, each forward-only (``fwd``, under ``no_grad``, as for a reference model) and forward +
backward (``fwd+bwd``):

``logits``  from ``[B, T, V]`` logits: Σ_t log softmax(logits)[label] per sequence.
    torch           ``log_softmax(x.float()).gather()`` (autograd keeps the full log-softmax)
    trl             TRL's ``selective_log_softmax``
    fastpo          ``fastpo.kernels.sequence_logps``
    fastpo_inplace  the same with ``inplace_backward=True`` (gradient written into the logits)
    liger_ce        Liger's Triton cross-entropy, ``reduction="none"`` (CUDA only)
``hidden``  from hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``, the sigmoid DPO loss
    on the per-sequence logps of B/2 pairs (reference logps 0, β = 0.1); ``fwd`` is the logps alone.
    naive           ``hidden @ W.T`` → ``log_softmax`` → ``gather``
    trl_chunked     TRL's chunked fused-head function (what its trainers run since TRL 1.x)
    fastpo          ``fastpo.kernels.linear_sequence_logps``
    liger_dpo       Liger's ``LigerFusedLinearDPOLoss`` (chunked PyTorch; compiled in full runs)
    cce_exact       Cut Cross-Entropy ``linear_cross_entropy(reduction="none", impl="cce",
                    filter_eps=None)``: every gradient entry computed (CUDA only)
    cce_filtered    the same with its default ``filter_eps="high"``: gradient blocks below a
                    threshold are skipped, so its gradients are not exact (CUDA only)

``copy``    ``dst.copy_(src)`` on the device: the copy rate measured in the same run, the yardstick
    of the from-logits GB/s ("% of copy").

Labels: the first quarter of every row is prompt (``-100``), a few trailing positions are padding;
rows with ``labels=all`` score every token. Every implementation returns the same scalar (loss or
Σ logps) so that the table shows they agree. GB/s counts the bytes each implementation must touch
(:func:`logits_bytes`: fastpo's kernels skip the ignored rows, the others read every row); the
problem's bytes (every row) are given beside them.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import CaseSpec, SkipCase, Workload, masked_labels, skip_if_unavailable

BETA = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGITS_IMPLS = ("torch", "trl", "fastpo", "fastpo_inplace", "liger_ce")
HIDDEN_IMPLS = ("naive", "trl_chunked", "fastpo", "liger_dpo", "cce_exact", "cce_filtered")
CUDA_ONLY = {"liger_ce": "Liger's Triton ops need a CUDA device",
             "cce": "Cut Cross-Entropy needs a CUDA device",
             "cce_exact": "Cut Cross-Entropy needs a CUDA device",
             "cce_filtered": "Cut Cross-Entropy needs a CUDA device"}
BWD_ONLY = {"fastpo_inplace", "liger_dpo"}  # an in-place backward / a loss: no forward-only row
VOCABS = (32000, 49152, 128256, 256000)


# --------------------------------------------------------------------------- cases


def _grid(size: str, device: str) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """(family, params, modes) triples for one run size: the copy yardstick first and last (on
    a shared machine the rate moves during a run; the report takes the faster of the two)."""
    mib = 16 if size == "smoke" else 4096 if device == "cuda" else 512
    return [("copy", {"MiB": mib, "at": "start"}, ("copy",)), *_workload_grid(size, device),
            ("copy", {"MiB": mib, "at": "end"}, ("copy",))]


def _workload_grid(size: str, device: str) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    if size == "smoke":
        return [
            ("logits", {"B": 2, "T": 32, "V": 1000, "dtype": "fp32"}, ("fwd+bwd", "fwd")),
            ("logits", {"B": 2, "T": 32, "V": 1000, "dtype": "fp32", "labels": "all"}, ("fwd",)),
            ("hidden", {"B": 2, "T": 32, "H": 32, "V": 1000, "dtype": "fp32"}, ("fwd+bwd",))]
    if device == "cuda":
        if size == "quick":
            return [("logits", {"B": 8, "T": 1024, "V": 128256, "dtype": "bf16"},
                     ("fwd+bwd", "fwd")),
                    ("hidden", {"B": 8, "T": 1024, "H": 4096, "V": 128256, "dtype": "bf16"},
                     ("fwd+bwd",))]
        grid = [("logits", {"B": 32, "T": 1024, "V": 128256, "dtype": "bf16"}, ("fwd+bwd", "fwd")),
                ("logits", {"B": 32, "T": 1024, "V": 128256, "dtype": "bf16", "labels": "all"},
                 ("fwd+bwd", "fwd")),
                ("hidden", {"B": 32, "T": 1024, "H": 4096, "V": 128256, "dtype": "bf16"},
                 ("fwd+bwd", "fwd"))]
        grid += [("logits", {"B": 8, "T": 1024, "V": v, "dtype": "bf16"}, ("fwd+bwd",))
                 for v in VOCABS]
        grid += [("hidden", {"B": 8, "T": 1024, "H": 4096, "V": v, "dtype": "bf16"}, ("fwd+bwd",))
                 for v in VOCABS]
        grid += [("logits", {"B": b, "T": 1024, "V": 128256, "dtype": "bf16"}, ("fwd+bwd",))
                 for b in (4, 16)]
        return grid
    if size == "quick":  # fwd+bwd only: the forward-only rows are in the full run
        return [("logits", {"B": 2, "T": 512, "V": 49152, "dtype": "fp32"}, ("fwd+bwd",)),
                ("hidden", {"B": 2, "T": 256, "H": 576, "V": 49152, "dtype": "fp32"},
                 ("fwd+bwd",))]
    # full CPU: the headline shape B8×T512×V49152 (fp32 and bf16), a vocab sweep and a token sweep
    grid = [("logits", {"B": 8, "T": 512, "V": 49152, "dtype": dt, "labels": labels},
             ("fwd+bwd", "fwd")) for dt in ("fp32", "bf16") for labels in ("prompt", "all")]
    grid.append(("hidden", {"B": 8, "T": 512, "H": 576, "V": 49152, "dtype": "fp32"},
                 ("fwd+bwd", "fwd")))
    grid += [("logits", {"B": 2, "T": 512, "V": v, "dtype": "fp32"}, ("fwd+bwd",))
             for v in VOCABS if v != 49152]
    grid += [("hidden", {"B": 2, "T": 256, "H": 576, "V": v, "dtype": "fp32"}, ("fwd+bwd",))
             for v in VOCABS]
    grid += [("logits", {"B": b, "T": 512, "V": 49152, "dtype": "fp32"}, ("fwd+bwd",))
             for b in (1, 2, 4)]
    grid += [("hidden", {"B": b, "T": 512, "H": 576, "V": 49152, "dtype": "fp32"}, ("fwd+bwd",))
             for b in (4,)]
    return grid


def cases(device: str, size: str) -> list[CaseSpec]:
    """Every case of this suite at ``size`` ("smoke", "quick" or "full") on ``device``."""
    reps, warmup = {"smoke": (2, 1), "quick": (3, 1), "full": (5, 1)}[size]
    specs = []
    for family, params, modes in _grid(size, device):
        if family == "copy":
            specs.append(CaseSpec(suite="kernels", family="copy", impl="copy", params=params,
                                  device=device, warmup=warmup, reps=reps))
            continue
        impls = LOGITS_IMPLS if family == "logits" else HIDDEN_IMPLS
        for mode in modes:
            for impl in impls:
                if mode == "fwd" and impl in BWD_ONLY:
                    continue
                full = {**params, "mode": mode}
                if impl == "liger_dpo":
                    full["compiled"] = size == "full"
                slow = family == "hidden" and impl in ("naive", "liger_dpo") and device == "cpu"
                spec = CaseSpec(suite="kernels", family=family, impl=impl, params=full,
                                device=device, warmup=warmup,
                                reps=max(2, reps - 2) if slow else reps)
                if impl in CUDA_ONLY and device != "cuda":
                    spec.skip_reason = CUDA_ONLY[impl]
                specs.append(spec)
    return specs


# --------------------------------------------------------------------------- inputs


def quarter_prompt_labels(batch: int, seq: int, vocab: int, *, device: str,
                          seed: int = 0) -> torch.Tensor:
    """Shifted labels: a prompt quarter and ~1/16 trailing padding per row are ``-100``."""
    return masked_labels(batch, seq, vocab, prompt=max(1, seq // 4), pad=(0, max(1, seq // 16)),
                         seed=seed).to(device)


def case_labels(params: dict[str, Any], *, device: str) -> torch.Tensor:
    """The labels of a from-logits case: quarter prompt and padding ignored (the default), or
    every token scored (``params["labels"] == "all"``)."""
    if params.get("labels", "prompt") == "all":
        return masked_labels(params["B"], params["T"], params["V"], prompt=0, pad=0).to(device)
    return quarter_prompt_labels(params["B"], params["T"], params["V"], device=device)


# fastpo's from-logits kernels (Triton, native C++) read only the scored rows; the others read
# every row (at least: a log-softmax baseline also writes and reads fp32 copies).
SKIPS_IGNORED_ROWS = ("fastpo", "fastpo_inplace")


def logits_bytes(impl: str, mode: str, *, rows: int, scored: int, vocab: int,
                 element_bytes: int) -> dict[str, int]:
    """Bytes of a from-logits call: ``problem`` — the logits read once (forward), or read in the
    forward, read again and the gradient written (forward + backward: the three-pass limit), every
    row; ``touched`` — what the implementation must move at least: for fastpo's kernels the
    forward reads the scored rows only and the backward reads them again and writes every row of
    the gradient (zeros where ignored); for the others the problem's bytes (a lower bound)."""
    row = vocab * element_bytes
    problem = rows * row if mode == "fwd" else 3 * rows * row
    if impl in SKIPS_IGNORED_ROWS:
        touched = scored * row if mode == "fwd" else (2 * scored + rows) * row
    else:
        touched = problem
    return {"problem_bytes": problem, "touched_bytes": touched, "scored_rows": scored,
            "rows": rows}


def _dpo_loss(seq_logps: torch.Tensor) -> torch.Tensor:
    """Sigmoid DPO loss, −log σ(β(c − r)), with reference logps 0; rows are chosen ‖ rejected."""
    chosen, rejected = seq_logps.float().chunk(2)
    return -torch.nn.functional.logsigmoid(BETA * (chosen - rejected)).mean()


def _masked_sum(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.where(labels != -100, per_token, torch.zeros_like(per_token)).sum(-1)


# --------------------------------------------------------------------------- from logits


def _logits_fn(impl: str, labels: torch.Tensor):
    """The implementation as ``logits [B, T, V] -> per-sequence logps [B]``."""
    safe = labels.clamp(min=0)
    if impl == "torch":
        return lambda x: _masked_sum(torch.log_softmax(x.float(), -1).gather(
            -1, safe.unsqueeze(-1)).squeeze(-1), labels)
    if impl == "trl":
        from trl.trainer.utils import selective_log_softmax

        return lambda x: _masked_sum(selective_log_softmax(x, safe), labels)
    if impl in ("fastpo", "fastpo_inplace"):
        from fastpo.kernels import sequence_logps

        inplace = impl == "fastpo_inplace"
        return lambda x: sequence_logps(x, labels, inplace_backward=inplace).logps
    if impl == "liger_ce":
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x: torch.Tensor) -> torch.Tensor:
            nll = liger_cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1),
                                      ignore_index=-100, reduction="none")
            return -nll.view(labels.shape).float().sum(-1)

        return liger
    raise SkipCase(f"unknown implementation {impl!r}")


def _build_logits(spec: CaseSpec) -> Workload:
    return logits_workload(spec, _logits_fn)


def logits_workload(spec: CaseSpec, logits_fn) -> Workload:
    """A from-logits case: random ``[B, T, V]`` logits and quarter-prompt labels, timed through
    ``logits_fn(impl, labels)`` (logits → per-sequence logps), forward or forward + backward."""
    p, device = spec.params, spec.device
    gen = torch.Generator(device=device).manual_seed(1)
    logits = torch.empty(p["B"], p["T"], p["V"], dtype=DTYPES[p["dtype"]], device=device)
    for b in range(p["B"]):  # a row at a time: no fp32 copy of the whole tensor
        logits[b] = torch.randn(p["T"], p["V"], generator=gen, device=device) * 2.0
    labels = case_labels(p, device=device)
    fn = logits_fn(spec.impl, labels)
    tokens = p["B"] * p["T"]
    # counted once, at set-up (a host read outside the timed calls)
    figures = logits_bytes(spec.impl, p["mode"], rows=tokens, scored=int((labels != -100).sum()),
                           vocab=p["V"], element_bytes=logits.element_size())
    if p["mode"] == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(logits).float().sum()

        return Workload(forward, tokens=tokens, bytes_moved=figures["touched_bytes"],
                        extra=figures)

    forward_backward, setup = logits_forward_backward(logits, fn,
                                                      restore=spec.impl == "fastpo_inplace")
    return Workload(forward_backward, tokens=tokens, bytes_moved=figures["touched_bytes"],
                    setup_each=setup, extra=figures,
                    notes="inputs restored untimed before each call" if setup else "")


def copy_workload(spec: CaseSpec) -> Workload:
    """The machine's copy rate, the yardstick of every GB/s figure: ``dst.copy_(src)`` of
    ``params["MiB"]`` MiB on the device (read + write: twice the size moved)."""
    nbytes = int(spec.params["MiB"]) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=spec.device).uniform_()
    dst = torch.empty_like(src)

    def copy() -> torch.Tensor:
        dst.copy_(src)
        return dst[:1]

    return Workload(copy, bytes_moved=2 * nbytes, extra={"touched_bytes": 2 * nbytes,
                                                         "problem_bytes": 2 * nbytes})


def logits_forward_backward(logits: torch.Tensor, fn, *, restore: bool):
    """``(call, setup)``: forward + backward of ``fn`` (logits → per-sequence logps) on
    ``logits`` as a leaf; with ``restore``, ``setup`` puts back the logits that an in-place
    backward overwrote (run untimed before each call), else it is None."""
    leaf = logits.requires_grad_(True)
    setup = None
    if restore:
        pristine = logits.detach().clone()

        def setup() -> None:
            with torch.no_grad():
                leaf.copy_(pristine)

    def forward_backward() -> torch.Tensor:
        # autograd.grad, as when the logits come out of an lm_head: no .grad accumulation (which
        # would copy a gradient that aliases the logits, as the in-place backward's does)
        total = fn(leaf).float().sum()
        (grad,) = torch.autograd.grad(total, leaf)
        del grad
        return total.detach()

    return forward_backward, setup


# --------------------------------------------------------------------------- from hidden states


def _hidden_fn(impl: str, labels: torch.Tensor, spec: CaseSpec):
    """The implementation as ``(hidden [B, T, H], weight [V, H]) -> per-sequence logps [B]``."""
    mask = labels != -100
    if impl == "naive":
        def naive(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            logits = (h @ w.t()).float()
            return _masked_sum(logits.log_softmax(-1).gather(-1, labels.clamp(min=0)
                                                             .unsqueeze(-1)).squeeze(-1), labels)

        return naive
    if impl == "trl_chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl_chunked(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            per_token = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, 32768,
                                                     None, 1.0, ("log_probs",))[0]
            full = per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)
            return full.sum(-1)

        return trl_chunked
    if impl == "fastpo":
        from fastpo.kernels.linear_logprobs import linear_sequence_logps

        return lambda h, w: linear_sequence_logps(h, w, labels).logps
    if impl in ("cce_exact", "cce_filtered"):
        from cut_cross_entropy import linear_cross_entropy

        from benchmarks.linear_logprobs import cce_filter_eps

        filter_eps = cce_filter_eps(impl)

        def cce(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            nll = linear_cross_entropy(h, w, labels, reduction="none", shift=False, impl="cce",
                                       filter_eps=filter_eps)
            return -_masked_sum(nll.float(), labels)

        return cce
    raise SkipCase(f"unknown implementation {impl!r}")


def _build_hidden(spec: CaseSpec) -> Workload:
    p, device = spec.params, spec.device
    if p["B"] % 2:
        raise ValueError(f"the hidden family needs an even B (chosen ‖ rejected), got {p['B']}")
    dtype = DTYPES[p["dtype"]]
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(p["B"], p["T"], p["H"], generator=gen).to(device, dtype)
    weight = (torch.randn(p["V"], p["H"], generator=gen) * p["H"] ** -0.5).to(device, dtype)
    labels = quarter_prompt_labels(p["B"], p["T"], p["V"], device=device)
    tokens = p["B"] * p["T"]

    if spec.impl == "liger_dpo":
        if p["mode"] != "fwd+bwd":
            raise SkipCase("Liger's fused DPO loss has no forward-only form")
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_mod = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False,
                                           compiled=bool(p.get("compiled", False)))
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def liger() -> torch.Tensor:
            out = loss_mod(weight, hidden, labels)
            loss = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(loss, (hidden, weight))
            del grads
            return loss.detach()

        return Workload(liger, tokens=tokens,
                        notes="torch.compile" if p.get("compiled") else "eager")

    fn = _hidden_fn(spec.impl, labels, spec)
    if p["mode"] == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(hidden, weight).float().sum()

        return Workload(forward, tokens=tokens)

    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def forward_backward() -> torch.Tensor:
        loss = _dpo_loss(fn(hidden, weight))
        grads = torch.autograd.grad(loss, (hidden, weight))
        del grads
        return loss.detach()

    return Workload(forward_backward, tokens=tokens)


def build(spec: CaseSpec) -> Workload:
    """The workload of one case (called in the measuring process)."""
    skip_if_unavailable(spec, CUDA_ONLY)
    if spec.family == "copy":
        return copy_workload(spec)
    if spec.family == "logits":
        return _build_logits(spec)
    if spec.family == "hidden":
        return _build_hidden(spec)
    raise ValueError(f"unknown kernels family {spec.family!r}")
