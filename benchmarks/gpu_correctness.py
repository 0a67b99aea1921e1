"""Correctness of the compiled kernels on a device, against float64, on ugly inputs.

Part of ``python -m benchmarks gpu``: on a CUDA device the ops run the compiled Triton kernels
(never the interpreter), so this is what the CPU test suite cannot check. References: the float64
``token_logps_reference`` of ``fastpo.kernels.logprobs_torch`` (from logits) and ``hidden @ Wᵀ`` →
``log_softmax`` in float64 (fused linear), differentiated by autograd; the tolerances are those
of ``tests/kernels/test_logprobs.py`` and ``tests/kernels/test_linear_logprobs.py``; the
half-precision fused-linear gradients are held to the scale-aware bound of
``tests/kernels/test_linear_logprobs_gemm.py`` (:func:`linear_grad_bounds`).

Cases: fp32 / bf16 / fp16; vocabularies 1, 7, 32003 (odd) and 128256; 30% ignored tokens; -inf
logits (label on a -inf entry: logp -inf, finite gradient); all-masked rows (exact zeros);
the shifted view ``logits[:, :-1]``; the in-place backward; more than 2³¹ logits elements (bf16,
V 128256, checked row block by row block in float64) where the device has the memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastpo.kernels import linear_token_logps, token_logps
from fastpo.kernels.logprobs_torch import token_logps_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
IGNORE = -100


def inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int,
            shape: tuple[int, ...] | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = shape or (rows,)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3.0).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.3] = IGNORE
    grad_out = torch.randn(shape, generator=gen)
    return logits.to(device), labels.to(device), grad_out.to(device)


def logits_errors(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor, *,
                   inplace: bool = False) -> dict[str, Any]:
    """Worst error / tolerance of forward and gradient (≤ 1 passes), as in the test suite."""
    x = logits.detach().double().requires_grad_()
    ref = token_logps_reference(x, labels)
    (ref * grad_out.double()).sum().backward()
    scored = (labels != IGNORE).unsqueeze(-1)
    ref_grad = torch.where(scored, x.grad, torch.zeros_like(x.grad))
    leaf = logits.detach().clone().requires_grad_()
    out = token_logps(leaf * 1 if inplace else leaf, labels, inplace_backward=inplace)
    (out * grad_out.to(out.dtype)).sum().backward()
    out, ref = out.detach(), ref.detach()
    fwd_tol = 64 * 2**-23 * (1 + ref.detach().abs())
    both_nan = out.double().isnan() & ref.isnan()
    fwd_err = torch.where(both_nan | (out.double() == ref), 0.0, (out.double() - ref).abs())
    row_scale = grad_out.double().abs().unsqueeze(-1)
    x_scale = 1 + logits.double().abs().nan_to_num(posinf=0, neginf=0).amax(-1, keepdim=True)
    grad_tol = 16 * 2**-23 * row_scale * x_scale + EPS[logits.dtype] * ref_grad.abs()
    grad_err = (leaf.grad.double() - ref_grad).abs()
    masked = labels == IGNORE
    exact_zeros = bool((out[masked] == 0).all() and (leaf.grad[masked] == 0).all())
    return {"fwd_err": _ratio(fwd_err, fwd_tol), "grad_err": _ratio(grad_err, grad_tol),
            "exact_zeros": exact_zeros}


def _ratio(err: torch.Tensor, tol: torch.Tensor) -> float:
    """max(err / tol): NaN where one side is NaN counts as a failure (inf)."""
    ratio = err / tol.clamp(min=torch.finfo(torch.float64).tiny)
    ratio = torch.where(err.isnan(), torch.full_like(ratio, float("inf")), ratio)
    return float(ratio.max()) if ratio.numel() else 0.0


# Unit roundoff of the half-precision operand dtypes (round to nearest, as on a GPU), and the
# largest absolute error of rounding into their subnormal range (half its spacing): fp16's
# subnormals start at 2⁻¹⁴, where a softmax gradient over a large vocabulary lives.
HALF_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
HALF_SUBNORMAL_ERROR = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def linear_grad_bounds(dtype: torch.dtype, g_ref: torch.Tensor, hidden: torch.Tensor,
                       weight: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element bounds on |grad − reference| of the fused linear op's (grad_hidden,
    grad_weight), the bound of ``tests/kernels/test_linear_logprobs_gemm.py``.

    Half precision (bf16 / fp16): the tile and GEMM backwards round the softmax gradient ``G``
    ([N, V], float64 reference ``g_ref``) to the operand dtype before the tensor-core dot, so each
    term of ``G @ W`` (``Gᵀ @ h``) may be off by one rounding of its ``G`` factor, and the result
    is rounded once more when cast: ``u·(|G| @ |W|) + u·|ref| + 1e-7`` (``u`` the unit roundoff,
    2⁻⁸ bf16, 2⁻¹¹ fp16). A per-element tolerance ``rtol·|ref|`` ignores the first term, which is
    large wherever the terms cancel (most of ``grad_W``). An entry of ``G`` that rounds into the
    dtype's subnormal range is off by up to half the subnormal spacing ``s`` instead of ``u·|G|``
    (fp16, ``G`` below 2⁻¹⁴: a vocabulary of 32k spreads it that thin), hence the extra
    ``s·(1[G≠0] @ |W|)`` — the test suite's bf16 bound, where ``s`` is negligible, extended to
    fp16. fp32: ``2e-6 + 1e-5·|ref|``, as the tests."""
    grad_h, grad_w = grads
    if dtype in HALF_ROUNDOFF:
        u, s = HALF_ROUNDOFF[dtype], HALF_SUBNORMAL_ERROR[dtype]
        g_abs = g_ref.abs()
        g_abs = g_abs + s / u * (g_abs != 0).double()  # u·(|G| + s/u) = u·|G| + s per term
        return (u * (g_abs @ weight.abs()) + u * grad_h.abs() + 1e-7,
                u * (g_abs.t() @ hidden.abs()) + u * grad_w.abs() + 1e-7)
    return 2e-6 + 1e-5 * grad_h.abs(), 2e-6 + 1e-5 * grad_w.abs()


def linear_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 logps, softmax gradient ``G`` and (grad_hidden, grad_weight) of Σ upstream·logp
    over the scored tokens (``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``)."""
    h, w = hidden.double(), weight.double()
    logp = torch.log_softmax(h @ w.t(), dim=-1)
    scored = labels != IGNORE
    safe = torch.where(scored, labels, 0)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    want = torch.where(scored, picked, torch.zeros_like(picked))
    onehot = torch.nn.functional.one_hot(safe, w.shape[0]).double()
    g = (scored.double() * upstream.double()).unsqueeze(-1) * (onehot - logp.exp())
    return {"logps": want, "g": g, "grad_hidden": g @ w, "grad_weight": g.t() @ h}


def linear_errors(dtype: torch.dtype, device: str, vocab: int, seed: int, *,
                  design: str = "auto") -> dict[str, Any]:
    """Worst error / bound of the fused linear op's logps and gradients (≤ 1 passes) on a
    [3, 37] batch with prompt, a fully masked sequence and the last vocab entry as a label."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 37, 64, generator=gen).to(dtype)
    weight = (torch.randn(vocab, 64, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (3, 37), generator=gen)
    labels[:, :5] = IGNORE
    labels[1] = IGNORE  # a whole sequence masked
    labels[0, -1] = vocab - 1
    upstream = torch.randn(3, 37, generator=gen)
    ours = [t.detach().clone().to(device).requires_grad_() for t in (hidden, weight)]
    got = linear_token_logps(ours[0], ours[1], labels.to(device), design=design)
    got.backward(upstream.to(device))
    h2, flat = hidden.reshape(-1, 64), labels.reshape(-1)
    ref = linear_reference(h2, weight, flat, upstream.reshape(-1))
    want = ref["logps"].view(3, 37)
    fwd = (got.double().cpu() - want).abs() / (2e-5 + 1e-5 * want.abs())
    refs = (ref["grad_hidden"], ref["grad_weight"])
    bounds = linear_grad_bounds(dtype, ref["g"], h2.double(), weight.double(), refs)
    got_grads = (ours[0].grad.reshape(-1, 64), ours[1].grad)
    grads = [_ratio((o.double().cpu() - r).abs(), b) for o, r, b in zip(got_grads, refs, bounds)]
    exact = bool((got[~(labels != IGNORE).to(device)] == 0).all() and (ours[0].grad[1] == 0).all())
    return {"fwd_err": float(fwd.max()), "grad_err": max(grads), "exact_zeros": exact}


def _large_offsets(device: str, dtype: torch.dtype, min_elements: int) -> dict[str, Any]:
    """More than ``min_elements`` logits, checked in float64 one block of rows at a time."""
    vocab = 128256 if min_elements >= 2**31 else 1031
    rows = min_elements // vocab + 64
    gen = torch.Generator(device=device).manual_seed(3)
    logits = torch.empty(rows, vocab, dtype=dtype, device=device)
    for start in range(0, rows, 1024):
        stop = min(rows, start + 1024)
        logits[start:stop] = torch.randn(stop - start, vocab, generator=gen, device=device) * 3
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    labels[::5] = IGNORE
    grad_out = torch.randn(rows, generator=gen, device=device)
    leaf = logits.requires_grad_()
    out = token_logps(leaf, labels)
    (grad, ) = torch.autograd.grad((out * grad_out).sum(), leaf)
    out = out.detach()
    worst = {"fwd_err": 0.0, "grad_err": 0.0, "exact_zeros": True}
    block = 256
    for start in range(0, rows, block):
        sl = slice(start, min(rows, start + block))
        x = logits[sl].detach().double()
        lab = labels[sl]
        ref = token_logps_reference(x, lab)
        scored = (lab != IGNORE).unsqueeze(-1)
        p = torch.softmax(x, -1)
        onehot = torch.zeros_like(p).scatter_(-1, lab.clamp(min=0).unsqueeze(-1), 1.0)
        ref_grad = torch.where(scored, grad_out[sl].double().unsqueeze(-1) * (onehot - p), 0.0)
        fwd_tol = 64 * 2**-23 * (1 + ref.abs())
        x_scale = 1 + x.abs().amax(-1, keepdim=True)
        grad_tol = (16 * 2**-23 * grad_out[sl].double().abs().unsqueeze(-1) * x_scale
                    + EPS[dtype] * ref_grad.abs())
        worst["fwd_err"] = max(worst["fwd_err"], _ratio((out[sl].double() - ref).abs(), fwd_tol))
        worst["grad_err"] = max(worst["grad_err"],
                                _ratio((grad[sl].double() - ref_grad).abs(), grad_tol))
        masked = lab == IGNORE
        worst["exact_zeros"] &= bool((out[sl][masked] == 0).all()
                                     and (grad[sl][masked] == 0).all())
    del grad, leaf, logits
    return {**worst, "elements": rows * vocab}


def cases(device: str, quick: bool) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(case, dtype, check) triples; a check returns its worst error ratios."""
    vocabs = (1, 7, 1000) if quick else (1, 7, 32003, 128256)
    out = []
    for name, dtype in DTYPES.items():
        for i, vocab in enumerate(vocabs):
            out.append((f"logits V={vocab}", name,
                        lambda d=dtype, v=vocab, s=i: logits_errors(
                            *inputs(0, v, d, device, s, shape=(3, 11)))))

        def neg_inf(d=dtype) -> dict[str, Any]:
            logits, labels, grad = inputs(16, 97, d, device, 5)
            logits[:, ::3] = float("-inf")
            labels[0], labels[1] = 3, 4  # label on a -inf entry: logp -inf, finite gradient
            return logits_errors(logits, labels, grad)

        def all_masked(d=dtype) -> dict[str, Any]:
            logits, labels, grad = inputs(0, 301, d, device, 6, shape=(3, 9))
            labels[1] = IGNORE
            labels[2, :4] = IGNORE
            return logits_errors(logits, labels, grad)

        def shifted(d=dtype) -> dict[str, Any]:
            logits, labels, grad = inputs(0, 1001, d, device, 7, shape=(2, 17))
            return logits_errors(logits[:, :-1], labels[:, 1:], grad[:, 1:])

        def inplace(d=dtype) -> dict[str, Any]:
            return logits_errors(*inputs(0, 2053, d, device, 8, shape=(2, 9)), inplace=True)

        out += [("logits -inf entries", name, neg_inf), ("logits all-masked rows", name,
                                                          all_masked),
                ("logits shifted view [:, :-1]", name, shifted),
                ("logits in-place backward", name, inplace)]
        for vocab in (299, 32003):
            out.append((f"fused linear V={vocab} H=64", name,
                        lambda d=dtype, v=vocab: linear_errors(d, device, v, 9)))
    return out


def run(device: str, *, quick: bool, rows_file: Path | None = None) -> list[dict[str, Any]]:
    """Every case on ``device``; > 2³¹ elements on CUDA when ≥ 16 GiB are free (scaled down to
    2¹⁶ elements in ``quick`` runs, which checks the same code path at toy size). Each row is
    appended to ``rows_file`` (one JSON object a line) as soon as it is known, so that a worker
    killed by its timeout still leaves the rows it finished."""
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        if rows_file is not None:
            with open(rows_file, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    for case, dtype, check in cases(device, quick):
        keep(_row(case, dtype, check))
    big = 2**16 if quick else 2**31
    name = "logits > 2^31 elements" if big == 2**31 else "logits large-offset path (2^16, quick)"
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else None
    if free is not None and not quick and free < 16 * 2**30:
        keep({"case": name, "dtype": "bf16", "status": "skipped",
              "reason": f"needs 16 GiB free on the device, {free / 2**30:.1f} GiB free"})
    else:
        keep(_row(name, "bf16", lambda: _large_offsets(device, torch.bfloat16, big)))
    return rows


def _row(case: str, dtype: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        got = check()
    except Exception as exc:
        return {"case": case, "dtype": dtype, "status": "error",
                "reason": f"{type(exc).__name__}: {exc}"[:300]}
    ok = got["fwd_err"] <= 1 and got["grad_err"] <= 1 and got["exact_zeros"]
    return {"case": case, "dtype": dtype, "status": "pass" if ok else "FAIL", **got,
            "seconds": round(time.perf_counter() - start, 2)}
