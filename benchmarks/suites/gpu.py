"""Workloads of ``python -m benchmarks gpu`` that the kernels suite does not have.

``logits``  from ``[B, T, V]`` logits (labels as in the kernels suite), every implementation of
    ``benchmarks.suites.kernels`` plus
    torch_compile  ``log_softmax(x.float()).gather()`` under ``torch.compile``
    quack          quack's cross-entropy kernel, ``reduction="none"`` (CUDA only, if installed)
``copy``    ``dst.copy_(src)`` (``benchmarks.suites.kernels.copy_workload``): the copy rate of the
    same run, the yardstick of every GB/s and the HBM efficiency of the cost model.
``linear``  the fused linear head with every token scored (no prompt: the anchor is N tokens, and
    no implementation may win by skipping prompt positions), built by
    ``benchmarks.linear_logprobs.build`` for ``fwd+bwd`` (a sigmoid DPO loss on the per-sequence
    logps, gradients of hidden and weight) and here for ``fwd`` (logps under ``no_grad``):
    naive, liger (compiled on CUDA, eager on CPU), fastpo, fastpo_loss_fused (``fwd+bwd`` only:
    the loss-fused DPO module), ``cce_exact`` (Cut Cross-Entropy with ``filter_eps=None``: every
    gradient entry computed) and ``cce_filtered`` (its default ``filter_eps="high"``: gradient
    blocks below a threshold skipped, not exact), and ``matmul`` (one ``h @ Wᵀ`` in the input
    dtype: the yardstick, and the GEMM efficiency of the cost model).
    ``design_tile`` / ``design_gemm``: the op ``linear_token_logps`` with its design forced, the
    per-token logps (``fwd``) or their sum's gradients (``fwd+bwd``), timed beside the cost
    model's prediction (``benchmarks.gpu``).

The 1B DPO step is ``benchmarks.suites.e2e`` with ``model="llama-1b"``.
"""

from __future__ import annotations

import torch

from benchmarks import linear_logprobs
from benchmarks.harness import CaseSpec, SkipCase, Workload, masked_labels, skip_if_unavailable
from benchmarks.suites import kernels

CUDA_ONLY = {**kernels.CUDA_ONLY, "quack": "quack's kernels need a CUDA device",
             "cce_exact": kernels.CUDA_ONLY["cce"], "cce_filtered": kernels.CUDA_ONLY["cce"],
             "torch_compile": "torch.compile is measured on CUDA only (minutes of CPU compile)"}


def _logits_fn(impl: str, labels: torch.Tensor):
    if impl == "torch_compile":
        return torch.compile(kernels._logits_fn("torch", labels), dynamic=False)
    if impl == "quack":
        from quack.cross_entropy import cross_entropy

        def quack(x: torch.Tensor) -> torch.Tensor:
            nll = cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1).clamp(min=0),
                                reduction="none")
            return -kernels._masked_sum(nll.view(labels.shape).float(), labels)

        return quack
    return kernels._logits_fn(impl, labels)


def _build_logits(spec: CaseSpec) -> Workload:
    return kernels.logits_workload(spec, _logits_fn)


def linear_config(spec: CaseSpec) -> dict:
    """The ``benchmarks.linear_logprobs`` config of a ``linear`` case (every token scored)."""
    p = spec.params
    on_gpu = spec.device.startswith("cuda")
    impl = "liger_compiled" if spec.impl == "liger" and on_gpu else spec.impl
    return {"device": spec.device, "impl": impl, "dtype": p["dtype"], "batch": p["B"],
            "seq": p["T"], "hidden": p["H"], "vocab": p["V"], "prompt": 0.0,
            "chunk_tokens": 0, "chunk_vocab": 0}


def linear_inputs(cfg: dict, *, requires_grad: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, weight, labels) of a ``linear`` case, drawn on the device (the 8B head's weight is
    half a billion values: minutes of host randn); every token scored."""
    device, dtype = cfg["device"], kernels.DTYPES[cfg["dtype"]]
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], generator=gen,
                         device=device).to(dtype)
    weight = (torch.randn(cfg["vocab"], cfg["hidden"], generator=gen, device=device)
              * cfg["hidden"] ** -0.5).to(dtype)
    labels = masked_labels(cfg["batch"], cfg["seq"], cfg["vocab"], prompt=0, pad=0).to(device)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), labels


def _build_design(spec: CaseSpec, cfg: dict) -> Workload:
    """The op with its design forced (``design_tile`` / ``design_gemm``), fwd or fwd+bwd."""
    from fastpo.kernels import linear_token_logps

    design = spec.impl.removeprefix("design_")
    if design == "tile" and not spec.device.startswith("cuda"):
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SkipCase("the tile design runs on CUDA (or under TRITON_INTERPRET=1)")
    backward = spec.params["mode"] == "fwd+bwd"
    hidden, weight, labels = linear_inputs(cfg, requires_grad=backward)
    backend = "triton" if design == "tile" else "auto"
    tokens = cfg["batch"] * cfg["seq"]

    def call() -> torch.Tensor:
        from fastpo.kernels import use_cpu_backend

        with use_cpu_backend(backend), torch.set_grad_enabled(backward):
            out = linear_token_logps(hidden, weight, labels, design=design)
            total = out.sum()
            if backward:
                grads = torch.autograd.grad(total, (hidden, weight))
                del grads
        return total.detach()

    return Workload(call, tokens=tokens, notes=f"design={design}")


def _build_linear_forward(spec: CaseSpec, cfg: dict) -> Workload:
    impl = spec.impl
    hidden, weight, labels = linear_inputs(cfg)
    if impl == "naive":
        def fn() -> torch.Tensor:
            logp = (hidden @ weight.t()).float().log_softmax(-1)
            return logp.gather(-1, labels.unsqueeze(-1)).sum()
    elif impl == "fastpo":
        from fastpo.kernels.linear_logprobs import linear_sequence_logps

        def fn() -> torch.Tensor:
            return linear_sequence_logps(hidden, weight, labels).logps.sum()
    elif impl in ("cce_exact", "cce_filtered"):
        from cut_cross_entropy import linear_cross_entropy

        filter_eps = linear_logprobs.cce_filter_eps(impl)

        def fn() -> torch.Tensor:  # the filter acts on gradients only: both rows equal here
            return -linear_cross_entropy(hidden, weight, labels, reduction="none", shift=False,
                                         impl="cce", filter_eps=filter_eps).float().sum()
    else:
        raise SkipCase(f"{impl} has no forward-only form here")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return Workload(forward, tokens=cfg["batch"] * cfg["seq"])


def build(spec: CaseSpec) -> Workload:
    """The workload of one case (called in the measuring process)."""
    skip_if_unavailable(spec, CUDA_ONLY)
    if spec.family == "copy":
        return kernels.copy_workload(spec)
    if spec.family == "logits":
        return _build_logits(spec)
    if spec.family == "linear":
        cfg = linear_config(spec)
        if spec.impl.startswith("design_"):
            return _build_design(spec, cfg)
        if spec.params["mode"] == "fwd" and spec.impl != "matmul":
            return _build_linear_forward(spec, cfg)
        return linear_logprobs.build(cfg)
    raise ValueError(f"unknown gpu family {spec.family!r}")
