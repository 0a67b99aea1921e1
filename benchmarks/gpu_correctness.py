"""Correctness of the compiled kernels on a device, against float64, on ugly inputs.

Part of ``python -m benchmarks gpu``: on a CUDA device the ops run the compiled Triton kernels
(never the interpreter), so this is what the CPU test suite cannot check. References: the float64
``token_logps_reference`` of ``fastpo.kernels.logprobs_torch`` (from logits) and ``hidden @ Wᵀ`` →
``log_softmax`` in float64 (fused linear), differentiated by autograd; the tolerances are those
of ``tests/kernels/test_logprobs.py`` and ``tests/kernels/test_linear_logprobs.py``.

Cases: fp32 / bf16 / fp16; vocabularies 1, 7, 32003 (odd) and 128256; 30% ignored tokens; -inf
logits (label on a -inf entry: logp -inf, finite gradient); all-masked rows (exact zeros);
the shifted view ``logits[:, :-1]``; the in-place backward; more than 2³¹ logits elements (bf16,
V 128256, checked row block by row block in float64) where the device has the memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from fastpo.kernels import linear_token_logps, token_logps
from fastpo.kernels.logprobs_torch import token_logps_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
IGNORE = -100


def _inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int,
            shape: tuple[int, ...] | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = shape or (rows,)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3.0).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.3] = IGNORE
    grad_out = torch.randn(shape, generator=gen)
    return logits.to(device), labels.to(device), grad_out.to(device)


def _logits_errors(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor, *,
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


def _linear_errors(dtype: torch.dtype, device: str, vocab: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 37, 64, generator=gen).to(dtype)
    weight = (torch.randn(vocab, 64, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (3, 37), generator=gen)
    labels[:, :5] = IGNORE
    labels[1] = IGNORE  # a whole sequence masked
    labels[0, -1] = vocab - 1
    upstream = torch.randn(3, 37, generator=gen)
    ours = [t.detach().clone().to(device).requires_grad_() for t in (hidden, weight)]
    got = linear_token_logps(ours[0], ours[1], labels.to(device))
    got.backward(upstream.to(device))
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    logp = torch.log_softmax(ref_in[0] @ ref_in[1].t(), dim=-1)
    scored = labels != IGNORE
    picked = logp.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    want = torch.where(scored, picked, torch.zeros_like(picked))
    want.backward(upstream.double())
    fwd = (got.double().cpu() - want.detach()).abs() / (2e-5 + 1e-5 * want.detach().abs())
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    atol = 2e-6 if dtype == torch.float32 else 1e-6
    grads = [((o.grad.double().cpu() - r.grad).abs() / (atol + rtol * r.grad.abs())).max()
             for o, r in zip(ours, ref_in)]
    exact = bool((got[~scored.to(device)] == 0).all() and (ours[0].grad[1] == 0).all())
    return {"fwd_err": float(fwd.max()), "grad_err": float(max(grads)), "exact_zeros": exact}


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
                        lambda d=dtype, v=vocab, s=i: _logits_errors(
                            *_inputs(0, v, d, device, s, shape=(3, 11)))))

        def neg_inf(d=dtype) -> dict[str, Any]:
            logits, labels, grad = _inputs(16, 97, d, device, 5)
            logits[:, ::3] = float("-inf")
            labels[0], labels[1] = 3, 4  # label on a -inf entry: logp -inf, finite gradient
            return _logits_errors(logits, labels, grad)

        def all_masked(d=dtype) -> dict[str, Any]:
            logits, labels, grad = _inputs(0, 301, d, device, 6, shape=(3, 9))
            labels[1] = IGNORE
            labels[2, :4] = IGNORE
            return _logits_errors(logits, labels, grad)

        def shifted(d=dtype) -> dict[str, Any]:
            logits, labels, grad = _inputs(0, 1001, d, device, 7, shape=(2, 17))
            return _logits_errors(logits[:, :-1], labels[:, 1:], grad[:, 1:])

        def inplace(d=dtype) -> dict[str, Any]:
            return _logits_errors(*_inputs(0, 2053, d, device, 8, shape=(2, 9)), inplace=True)

        out += [("logits -inf entries", name, neg_inf), ("logits all-masked rows", name,
                                                          all_masked),
                ("logits shifted view [:, :-1]", name, shifted),
                ("logits in-place backward", name, inplace)]
        for vocab in (299, 32003):
            out.append((f"fused linear V={vocab} H=64", name,
                        lambda d=dtype, v=vocab: _linear_errors(d, device, v, 9)))
    return out


def run(device: str, *, quick: bool) -> list[dict[str, Any]]:
    """Every case on ``device``; > 2³¹ elements on CUDA when ≥ 16 GiB are free (scaled down to
    2¹⁶ elements in ``quick`` runs, which checks the same code path at toy size)."""
    rows = []
    for case, dtype, check in cases(device, quick):
        rows.append(_row(case, dtype, check))
    big = 2**16 if quick else 2**31
    name = "logits > 2^31 elements" if big == 2**31 else "logits large-offset path (2^16, quick)"
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else None
    if free is not None and not quick and free < 16 * 2**30:
        rows.append({"case": name, "dtype": "bf16", "status": "skipped",
                     "reason": f"needs 16 GiB free on the device, {free / 2**30:.1f} GiB free"})
    else:
        rows.append(_row(name, "bf16", lambda: _large_offsets(device, torch.bfloat16, big)))
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
