"""The native CPU kernel at the headline shape, side by side with the plain PyTorch paths.

    python -m benchmarks.native_cpu [--dtypes fp32 bf16] [--reps 5] [--threads 2] [--json out.json]

Workload: logits ``[8, 512, 49152]`` (a leaf that requires grad), shifted labels with a masked
prompt and padding, forward + backward of the per-sequence sums of the label log-probs. The
gradient is taken with ``torch.autograd.grad`` (as when the logits come out of an ``lm_head``:
no ``.grad`` accumulation, which would copy a gradient that aliases the logits).

    torch            ``torch.log_softmax(x.float(), -1).gather(...)`` + autograd
    trl              TRL's ``selective_log_softmax`` + autograd
    fastpo           ``fastpo.kernels.sequence_logps`` on the native CPU backend
    fastpo_inplace   the same with ``inplace_backward=True`` (logits restored untimed each call)
    native_op        the bare ``torch.ops.fastpo_native`` ops in a minimal autograd.Function (the
                     kernel without the dispatch layer around it)

Each (implementation, dtype) runs in a fresh process through ``benchmarks.harness``: warm-up, one
call measured for peak memory (growth of the resident set over its value after the inputs exist,
read from the kernel's high-water mark ``VmHWM`` after resetting it through
``/proc/self/clear_refs``; glibc's mmap threshold is pinned low for it so freed buffers leave the
resident set), then ``reps`` timed calls with the allocator as a user's process has it; the median
is reported. Memory ratios are to the logits' size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch

from benchmarks import harness
from benchmarks.suites.kernels import logits_bytes, logits_forward_backward

SHAPE = (8, 512, 49152)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("torch", "trl", "fastpo", "fastpo_inplace", "native_op")
MARKER = "NATIVE_CPU_RESULT "


class _NativeSequenceSum(torch.autograd.Function):
    """Per-token logps straight from ``torch.ops.fastpo_native`` (2-D logits)."""

    @staticmethod
    def forward(ctx, logits, labels, inplace):  # type: ignore[override]
        logps, lse, _ = torch.ops.fastpo_native.logps_forward(logits, labels, -100, 1.0, False)
        ctx.save_for_backward(logits, labels, lse)
        ctx.inplace = inplace
        return logps

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        out = torch.ops.fastpo_native.logps_backward(grad.contiguous(), logits, labels, lse, -100,
                                                     1.0, ctx.inplace)
        return out, None, None


def _impl_fn(impl: str, labels: torch.Tensor):
    """``logits [B, T, V] -> per-sequence sums [B]`` for one implementation."""
    safe = labels.clamp(min=0)
    scored = labels != -100

    def masked_sum(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(scored, per_token, torch.zeros_like(per_token)).sum(-1)

    if impl == "torch":
        return lambda x: masked_sum(torch.log_softmax(x.float(), -1).gather(
            -1, safe.unsqueeze(-1)).squeeze(-1))
    if impl == "trl":
        from trl.trainer.utils import selective_log_softmax

        return lambda x: masked_sum(selective_log_softmax(x, safe))
    if impl in ("fastpo", "fastpo_inplace"):
        import fastpo.kernels as kernels

        kernels.set_cpu_backend("native")
        inplace = impl == "fastpo_inplace"
        return lambda x: kernels.sequence_logps(x, labels, inplace_backward=inplace).logps
    if impl == "native_op":
        from fastpo.kernels import native

        if not native.AVAILABLE:
            raise RuntimeError(f"native kernel unavailable: {native.UNAVAILABLE_REASON}")
        flat = labels.reshape(-1).contiguous()
        return lambda x: _NativeSequenceSum.apply(
            x.view(-1, x.shape[-1]), flat, False).view(labels.shape).sum(-1)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def build(impl: str, dtype: str) -> harness.Workload:
    batch, seq, vocab = SHAPE
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 2.0).to(DTYPES[dtype])
    # a prompt of 64-191 positions and 0-127 trailing padding per row are -100
    labels = harness.masked_labels(batch, seq, vocab, prompt=(64, 192), pad=(0, 128))
    forward_backward, setup = logits_forward_backward(logits, _impl_fn(impl, labels),
                                                      restore=impl == "fastpo_inplace")

    # the bytes this implementation must touch (fastpo's kernels skip the ignored rows)
    figures = logits_bytes("fastpo" if impl == "native_op" else impl, "fwd+bwd",
                           rows=batch * seq, scored=int((labels != -100).sum()), vocab=vocab,
                           element_bytes=logits.element_size())
    return harness.Workload(forward_backward, tokens=batch * seq,
                            bytes_moved=figures["touched_bytes"], setup_each=setup, extra=figures)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(impl: str, dtype: str, reps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    workload = build(impl, dtype)
    measured = harness.measure(workload, device="cpu", warmup=1, reps=reps)
    measured.pop("profile_trace", None)
    # CPU time (user + system, all threads) of further calls: unlike wall time it barely moves
    # when other processes share the cores
    cpu = []
    for _ in range(reps):
        if workload.setup_each is not None:
            workload.setup_each()
        start = _cpu_seconds()
        workload.fn()
        cpu.append(_cpu_seconds() - start)
    row = {"impl": impl, "dtype": dtype, "threads": torch.get_num_threads(), **measured,
           "cpu_s": cpu, "cpu_median_s": statistics.median(cpu)}
    if impl.startswith("fastpo") or impl == "native_op":
        from fastpo.kernels import native

        row["backend"] = native.describe()
    return row


def run(impl: str, dtype: str, reps: int, threads: int) -> dict:
    """One case in a fresh process (so that peak memory is its own)."""
    cmd = [sys.executable, "-m", "benchmarks.native_cpu", "--worker", impl, dtype,
           "--reps", str(reps), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.REPO_ROOT,
                          env=harness.worker_env(), check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"impl": impl, "dtype": dtype, "error": f"exit {proc.returncode}: {tail}"}


def report(rows: list[dict]) -> str:
    batch, seq, vocab = SHAPE
    lines = [f"B{batch}×T{seq}×V{vocab}, fwd+bwd of per-sequence sums, "
             f"{max(r.get('threads', 0) for r in rows)} threads; wall: median (min) of timed "
             "calls; cpu: median user+system seconds of all threads",
             f"{'dtype':5} {'impl':15} {'wall s':>14} {'cpu s':>6} {'peak GB':>8} "
             f"{'mem/logits':>10} {'wall/torch':>10} {'cpu/torch':>9} {'wall/trl':>8} "
             f"{'cpu/trl':>7}  check"]
    for dtype in DTYPES:
        by_impl = {r["impl"]: r for r in rows if r["dtype"] == dtype and "error" not in r}
        logits_bytes = batch * seq * vocab * DTYPES[dtype].itemsize
        for r in rows:
            if r["dtype"] != dtype:
                continue
            if "error" in r:
                lines.append(f"{dtype:5} {r['impl']:15} error: {r['error']}")
                continue
            ratios = []
            for base in ("torch", "trl"):
                ref = by_impl.get(base)
                if ref is None:
                    ratios += ["-", "-"]
                    continue
                ratios += [f"{r['median_s'] / ref['median_s']:.3f}",
                           f"{r['cpu_median_s'] / ref['cpu_median_s']:.3f}"]
            wall = f"{r['median_s']:.3f} ({r['min_s']:.3f})"
            lines.append(f"{dtype:5} {r['impl']:15} {wall:>14} {r['cpu_median_s']:6.3f} "
                         f"{r['peak_mem_bytes'] / 1e9:8.2f} "
                         f"{r['peak_mem_bytes'] / logits_bytes:10.3f} {ratios[0]:>10} "
                         f"{ratios[1]:>9} {ratios[2]:>8} {ratios[3]:>7}  {r['check']:.6g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows and the machine description here")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = worker(*args.worker, reps=args.reps, threads=args.threads)
        print(MARKER + json.dumps(row), flush=True)
        return
    rows = []
    for dtype in args.dtypes:
        for impl in args.impls:
            rows.append(run(impl, dtype, args.reps, args.threads))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("times_s", "cpu_s")}),
                  flush=True)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": harness.machine_info(), "shape": SHAPE, "reps": args.reps,
                       "threads": args.threads, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
