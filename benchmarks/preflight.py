"""Is this machine ready for ``python -m benchmarks gpu``? One minute instead of six to find out.

    python -m benchmarks gpu --preflight [--device cuda|cpu] [--out DIR]

Prints the versions of everything the run uses and where fastpo was imported from, the device and
its compute capability, then checks

* each torch API the GPU path needs, called on the device: ``torch.mm`` / ``torch.addmm`` with
  ``out_dtype=`` (the gemm design's fp32 accumulation of half operands), ``torch.nonzero_static``
  (the scored rows without a host sync), ``torch.library.custom_op`` with ``register_fake``
  (the ops' registration) and a device ``torch.Generator`` (the benchmark's inputs);
* every Triton kernel, compiled and run once on a small case against float64: the from-logits
  forward and backward (also in place), the fused linear op's tile design (forward and backward
  kernels), its gemm design (GEMMs and the Triton row kernels) and the loss-fused design, in fp32
  and bf16, with the tolerances of ``benchmarks/gpu_correctness.py``.

On a CPU the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1`` before Python
starts (without it they are reported as not run, never as passed). A failed check makes the
command exit 1. With ``--out DIR`` it writes ``DIR/preflight.md`` and ``DIR/preflight.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSIONED = ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "numpy",
             "fastpo", "liger-kernel", "cut-cross-entropy", "trl", "datasets", "quack-kernels",
             "flash-attn", "deepspeed")


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _row(check: str, status: str, detail: str) -> dict[str, Any]:
    return {"check": check, "status": status, "detail": detail}


def _try(check: str, fn: Callable[[], str]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:  # every failure is a row, never a traceback
        return _row(check, "FAIL", f"{type(exc).__name__}: {exc}"[:300])
    return _row(check, "pass", f"{detail} ({time.perf_counter() - start:.1f} s)".strip())


def environment(device: str) -> list[dict[str, Any]]:
    """Versions, fastpo's location, the device."""
    import torch

    import fastpo

    rows = [_row("python", "info", f"{platform.python_version()} ({platform.platform()})")]
    for name in VERSIONED:
        rows.append(_row(name, "info", _version(name)))
    rows.append(_row("fastpo imported from", "info", str(Path(fastpo.__file__).parent)))
    rows.append(_row("torch CUDA build", "info", str(torch.version.cuda)))
    if device == "cuda":
        cap = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info()
        rows.append(_row("device", "info", f"{torch.cuda.get_device_name(0)}, sm_{cap[0]}{cap[1]}"
                         f", {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"))
    else:
        rows.append(_row("device", "info", "cpu; Triton kernels under the interpreter"
                         if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"))
    return rows


def torch_apis(device: str) -> list[dict[str, Any]]:
    """The torch calls the GPU path makes, each called once on the device."""
    import torch

    half = torch.bfloat16

    def mm_out_dtype() -> str:
        for op in (torch.ops.aten.mm, torch.ops.aten.addmm):
            if "dtype" not in op.overloads():
                raise AssertionError(f"{op} has no out_dtype overload (torch "
                                     f"{torch.__version__} is too old for the gemm design)")
        if device == "cpu":  # the CPU path upcasts half operands instead; CUDA kernels only
            return "aten::mm.dtype and aten::addmm.dtype present (called on CUDA only)"
        a = torch.randn(64, 32, device=device).to(half)
        b = torch.randn(32, 48, device=device).to(half)
        out = torch.mm(a, b, out_dtype=torch.float32)
        want = a.double() @ b.double()
        if out.dtype != torch.float32 or not torch.allclose(out.double(), want, rtol=1e-3,
                                                            atol=1e-3):
            raise AssertionError(f"torch.mm(out_dtype=float32) gave {out.dtype}, off by "
                                 f"{float((out.double() - want).abs().max()):.3g}")
        acc = torch.zeros(64, 48, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if not torch.allclose(acc.double(), want, rtol=1e-3, atol=1e-3):
            raise AssertionError("torch.addmm(out_dtype=float32, out=) disagrees with float64")
        return "bf16 × bf16 → fp32"

    def nonzero_static() -> str:
        mask = torch.tensor([True, False, True, True, False], device=device)
        got = torch.nonzero_static(mask, size=3, fill_value=-1).flatten()
        if got.tolist() != [0, 2, 3]:
            raise AssertionError(f"nonzero_static gave {got.tolist()}")
        return "size=3"

    def custom_op() -> str:
        from fastpo.kernels import ops  # registers fastpo::logps_* at import

        for name in ("logps_forward", "logps_backward", "logps_backward_"):
            if not hasattr(torch.ops.fastpo, name):
                raise AssertionError(f"torch.ops.fastpo.{name} is not registered")
        del ops
        return "torch.ops.fastpo.logps_*"

    def generator() -> str:
        gen = torch.Generator(device=device).manual_seed(0)
        torch.randn(4, generator=gen, device=device)
        return device

    return [_try("torch.mm / addmm out_dtype=", mm_out_dtype),
            _try("torch.nonzero_static", nonzero_static),
            _try("torch.library.custom_op ops", custom_op),
            _try("torch.Generator on the device", generator)]


def kernels(device: str) -> list[dict[str, Any]]:
    """Every Triton kernel on one small case, fp32 and bf16, against float64."""
    import torch

    from benchmarks import gpu_correctness as gc
    from fastpo.kernels import use_cpu_backend

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return [_row("Triton kernels", "not run",
                     "on a CPU they need TRITON_INTERPRET=1 set before Python starts")]
    backend = "triton" if device == "cpu" else "auto"

    def judged(run: Callable[[], dict[str, Any]]) -> Callable[[], str]:
        def check() -> str:
            with use_cpu_backend(backend):
                got = run()
            ok = got["fwd_err"] <= 1 and got["grad_err"] <= 1 and got["exact_zeros"]
            text = (f"fwd err/tol {got['fwd_err']:.2g}, grad err/tol {got['grad_err']:.2g}, "
                    f"exact zeros {got['exact_zeros']}")
            if not ok:
                raise AssertionError(text)
            return text
        return check

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows.append(_try(f"from logits fwd + bwd kernels, {name}", judged(
            lambda d=dtype: gc.logits_errors(*gc.inputs(0, 1031, d, device, 1, shape=(2, 7))))))
        rows.append(_try(f"from logits in-place backward, {name}", judged(
            lambda d=dtype: gc.logits_errors(*gc.inputs(0, 517, d, device, 2, shape=(2, 5)),
                                             inplace=True))))
        for design in ("tile", "gemm"):
            rows.append(_try(f"fused linear {design} design fwd + bwd, {name}", judged(
                lambda d=dtype, g=design: gc.linear_errors(d, device, 299, 3, design=g))))
        rows.append(_try(f"fused linear loss-fused design, {name}",
                         lambda d=dtype: _loss_fused(d, device, backend)))
    return rows


def _loss_fused(dtype: Any, device: str, backend: str) -> str:
    """The loss-fused DPO module against the op + the same loss (its gradients included)."""
    import torch

    from fastpo.engine.losses.modules import FusedLinearDPOLoss
    from fastpo.kernels import linear_sequence_logps, use_cpu_backend

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, 9, 32, generator=gen).to(dtype).to(device)
    weight = (torch.randn(211, 32, generator=gen) * 0.3).to(dtype).to(device)
    labels = torch.randint(0, 211, (4, 9), generator=gen)
    labels[:, :3] = -100
    labels = labels.to(device)
    got, want = [], []
    with use_cpu_backend(backend):
        for design in ("loss-fused", None):
            # the reference: the op in float64 on the CPU (its chunked path) + the same loss
            h, w = (t.detach().clone().to("cpu" if design is None else device).requires_grad_()
                    for t in (hidden, weight))
            if design:
                loss = FusedLinearDPOLoss(beta=0.1, use_ref_model=False, design=design)(
                    w, h, labels)[0]
            else:
                seq = linear_sequence_logps(h.double(), w.double(), labels.cpu()).logps
                chosen, rejected = seq.chunk(2)
                loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
            loss.backward()
            (got if design else want).append(
                tuple(t.detach().double().cpu() for t in (loss, h.grad, w.grad)))
    rtol = 1e-5 if dtype == torch.float32 else 2**-6
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got[0], want[0]):
        err = float((a - b).abs().max())
        bound = rtol * float(b.abs().max()) + 1e-6
        if err > bound:
            raise AssertionError(f"{name}: off by {err:.3g} (bound {bound:.3g})")
    return f"loss and gradients within {rtol:g} of the float64 op + loss"


def run(device: str) -> list[dict[str, Any]]:
    """Every preflight row (environment, torch APIs, kernels)."""
    return environment(device) + torch_apis(device) + kernels(device)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | status | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['detail']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(device: str, out: Path | None) -> int:
    """Print (and with ``out`` write) the preflight; 1 when a check failed."""
    start = time.perf_counter()
    rows = run(device)
    text = "# Preflight\n\n" + markdown(rows)
    print(text, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "preflight.md").write_text(text)
        (out / "preflight.json").write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"preflight: {len(failed)} failed check(s) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return 1 if failed else 0
