"""One command for a GPU: correctness, bandwidth, FLOP rate and a DPO step, in one report.

    python -m benchmarks gpu [--out PATH] [--budget-s 510] [--skip SECTION,...]
    python -m benchmarks gpu --dry-run        (= --device cpu --quick: the whole pipeline at toy
                                               shapes on the CPU, in this process; what CI runs)

Sections, in order (each case of 2-4 in a fresh process through ``benchmarks.harness``):

1. correctness: the compiled Triton kernels against float64 on ugly inputs
   (``benchmarks/gpu_correctness.py``), > 2³¹ logits elements included;
2. logits: from 32 × 1024 × 128256 bf16 logits, forward and forward + backward; GB/s and % of
   the HBM peak, where forward moves N·V elements and forward + backward 3·N·V (read in the
   forward, read + write in the backward: the three-pass limit); against
   ``log_softmax().gather()`` eager and under ``torch.compile``, Liger's cross-entropy and quack's;
3. linear: the fused linear head at Llama-3-8B's shape (H 4096, V 128256) × 32768 tokens, bf16,
   every token scored; model TFLOP/s (2·N·V·H forward, 6·N·V·H forward + backward) as % of the
   bf16 dense peak and of a plain bf16 matmul of the same shape (the yardstick), and the memory
   beyond the returned gradients; fastpo as the op + a DPO loss (``fastpo``) and as the loss-fused
   DPO module (``fastpo_loss_fused``), against naive, Liger's fused-linear DPO and CCE (exact);
4. dpo_step: one DPO step (policy + frozen reference, AdamW) of a random Llama-3.2-1B-shaped
   model (``benchmarks.suites.e2e``, ``model="llama-1b"``), fastpo's engine against TRL's
   ``DPOTrainer``; tokens/s and peak memory.

Missing optional libraries give a "skipped: not installed" row, never a crash. The run keeps to
``--budget-s`` (default 510 s: the whole command under 9 minutes on one H100): a case that
would start with less than 30 s left is recorded as skipped. Writes ``PATH.md`` and ``PATH.csv``
(default ``benchmarks/results/gpu-<device>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO_ROOT,
    RESULT_MARKER,
    CaseSpec,
    Result,
    machine_info,
    run_case,
    run_case_subprocess,
    worker_env,
)

SECTIONS = ("correctness", "logits", "linear", "dpo_step")
# (name contains, HBM bytes/s, bf16 dense FLOP/s); first match wins
PEAKS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100 NVL", 3.9e12, 835e12),
         ("H100", 3.35e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12),
         ("A100", 1.555e12, 312e12)]
TARGETS = {"logits fwd": 0.90, "logits fwd+bwd": 0.85, "linear fwd+bwd": 0.75}
GIB = 2**30


def device_peaks(name: str | None) -> tuple[float | None, float | None]:
    """(HBM bytes/s, bf16 dense FLOP/s) of a device by its name; (None, None) when unknown."""
    for key, hbm, flops in PEAKS:
        if name and key in name:
            return hbm, flops
    return None, None


def plan(device: str, quick: bool) -> list[CaseSpec]:
    """The timed cases (sections 2-4) at full or toy (``quick``) size."""
    big = not quick
    logits = ({"B": 32, "T": 1024, "V": 128256, "dtype": "bf16"} if big
              else {"B": 2, "T": 16, "V": 1000, "dtype": "fp32"})
    linear = ({"B": 32, "T": 1024, "H": 4096, "V": 128256, "dtype": "bf16"} if big
              else {"B": 2, "T": 16, "H": 32, "V": 301, "dtype": "fp32"})
    step = ({"model": "llama-1b", "V": 128256, "P": 8, "Lp": 256, "Lc": 256, "dtype": "bf16"}
            if big else {"model": "tiny", "V": 1024, "P": 2, "Lp": 16, "Lc": 16, "dtype": "fp32"})
    reps, warmup = (5, 1) if big else (2, 1)
    specs = []
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("torch", "torch_compile", "fastpo", "fastpo_inplace", "liger_ce", "quack"):
            if mode == "fwd" and impl == "fastpo_inplace":
                continue
            specs.append(CaseSpec("gpu", "logits", impl, {**logits, "mode": mode}, device,
                                  warmup=warmup, reps=reps))
    specs.append(CaseSpec("gpu", "linear", "matmul", {**linear, "mode": "matmul"}, device,
                          warmup=warmup, reps=reps))
    for mode, impls in (("fwd", ("naive", "fastpo", "cce")),
                        ("fwd+bwd", ("naive", "liger", "fastpo", "fastpo_loss_fused", "cce"))):
        specs += [CaseSpec("gpu", "linear", impl, {**linear, "mode": mode}, device,
                           warmup=warmup, reps=3 if big else 2) for impl in impls]
    specs += [CaseSpec("e2e", "dpo_step", impl, dict(step), device, warmup=warmup,
                       reps=3 if big else 2) for impl in ("trl", "fastpo")]
    return specs


# --------------------------------------------------------------------------- derived figures


def _bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def derive(row: dict[str, Any], hbm: float | None, flops: float | None) -> dict[str, Any]:
    """Add the section's figures of merit to a result row."""
    p = row["params"]
    out = dict(row)
    if row["status"] != "ok":
        return out
    out["median_ms"] = row["median_s"] * 1e3
    if row["family"] == "logits":
        out["gb_s"] = row["bandwidth_gb_s"]
        out["pct_hbm"] = 100 * row["bandwidth_gb_s"] * 1e9 / hbm if hbm else None
    elif row["family"] == "linear":
        factor = 6 if p["mode"] == "fwd+bwd" else 2
        tokens = p["B"] * p["T"]
        out["tflops"] = factor * tokens * p["V"] * p["H"] / row["median_s"] / 1e12
        out["pct_bf16_peak"] = 100 * out["tflops"] * 1e12 / flops if flops else None
        grads = (tokens + p["V"]) * p["H"] * _bytes(p["dtype"]) if p["mode"] == "fwd+bwd" else 0
        out["beyond_grads_mib"] = max(row["peak_mem_bytes"] - grads, 0) / 2**20
    out["peak_mib"] = row["peak_mem_bytes"] / 2**20 if row["peak_mem_bytes"] is not None else None
    return out


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(machine: dict[str, Any], correctness: list[dict[str, Any]],
             rows: list[dict[str, Any]], wall_s: float) -> str:
    """The report: machine, correctness, one table per section, the targets."""
    gpu = machine.get("gpu") or "none (dry run)"
    hbm, flops = device_peaks(machine.get("gpu"))
    lines = [f"# GPU report: {gpu}", "",
             f"torch {machine.get('version_torch')}, triton {machine.get('version_triton')}, "
             f"trl {machine.get('version_trl')}, liger-kernel "
             f"{machine.get('version_liger-kernel')}, cut-cross-entropy "
             f"{machine.get('version_cut-cross-entropy')}; peaks used: HBM "
             f"{_f(hbm and hbm / 1e12, '.2f')} TB/s, bf16 dense {_f(flops and flops / 1e12, '.0f')}"
             f" TFLOP/s; {machine.get('time')}; whole run {wall_s:.0f} s.", "",
             "## Correctness of the compiled kernels against float64", "",
             "| case | dtype | status | fwd err / tol | grad err / tol | exact zeros | note |",
             "|---|---|---|---:|---:|---|---|"]
    for c in correctness:
        lines.append(f"| {c['case']} | {c['dtype']} | {c['status']} | {_f(c.get('fwd_err'), '.3g')}"
                     f" | {_f(c.get('grad_err'), '.3g')} | {c.get('exact_zeros', '–')} "
                     f"| {c.get('reason', '')} |")
    by = {fam: [r for r in rows if r["family"] == fam] for fam in ("logits", "linear", "dpo_step")}
    lines += ["", "## From logits (GB/s; forward N·V, forward + backward 3·N·V elements)", "",
              "| impl | mode | shape | ms | GB/s | % of HBM peak | peak extra MiB | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in by["logits"]:
        lines.append(_row(r, [_f(r.get("gb_s"), ",.0f"), _f(r.get("pct_hbm"), ".1f"),
                              _f(r.get("peak_mib"), ",.0f")]))
    matmul = next((r for r in by["linear"] if r["impl"] == "matmul" and r.get("tflops")), None)
    lines += ["", "## Fused linear (model TFLOP/s: 2·N·V·H forward, 6·N·V·H forward + backward)",
              "", "| impl | mode | shape | ms | TFLOP/s | % of bf16 peak | % of matmul "
              "| MiB beyond returned gradients | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in by["linear"]:
        share = 100 * r["tflops"] / matmul["tflops"] if matmul and r.get("tflops") else None
        lines.append(_row(r, [_f(r.get("tflops"), ",.1f"), _f(r.get("pct_bf16_peak"), ".1f"),
                              _f(share, ".0f"), _f(r.get("beyond_grads_mib"), ",.0f")]))
    lines += ["", "## One DPO step (policy + frozen reference, AdamW)", "",
              "| impl | mode | shape | ms | tokens/s | peak extra MiB | note |",
              "|---|---|---|---:|---:|---:|---|"]
    for r in by["dpo_step"]:
        lines.append(_row(r, [_f(r.get("tokens_per_s"), ",.0f"), _f(r.get("peak_mib"), ",.0f")]))
    lines += ["", "## Targets", ""]
    if machine.get("gpu") and rows and rows[0]["device"].startswith("cuda"):
        lines += verdicts(rows)
    else:
        lines.append("Not judged: no GPU (a dry run checks the pipeline, not the figures).")
    return "\n".join(lines) + "\n"


def _row(r: dict[str, Any], cells: list[str]) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r["params"].items() if k != "mode")
    head = f"| {r['impl']} | {r['params'].get('mode', 'step')} | {shape} "
    if r["status"] != "ok":
        blanks = "| " * len(cells)
        return f"{head}| {r['status']} {blanks}| {r['reason'][:200]} |"
    return f"{head}| {r['median_ms']:,.2f} | " + " | ".join(cells) + f" | {r.get('notes', '')} |"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: the measured figure and whether it is met."""
    def get(family: str, impl: str, mode: str | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r["family"] == family and r["impl"] == impl
                     and (mode is None or r["params"].get("mode") == mode)
                     and r["status"] == "ok"), None)

    out = []
    for mode, key in (("fwd", "logits fwd"), ("fwd+bwd", "logits fwd+bwd")):
        r = get("logits", "fastpo", mode)
        pct = r.get("pct_hbm") if r else None
        out.append(_verdict(f"from logits {mode}: % of HBM peak", pct, 100 * TARGETS[key]))
    for impl in ("fastpo", "fastpo_loss_fused"):  # the op + a loss; the loss inside the op
        r = get("linear", impl, "fwd+bwd")
        what = f"fused linear fwd+bwd ({impl})"
        out.append(_verdict(f"{what}: % of bf16 peak", r and r.get("pct_bf16_peak"),
                            100 * TARGETS["linear fwd+bwd"]))
        beyond = r.get("beyond_grads_mib") if r else None
        out.append(f"- {what}: memory beyond the returned gradients {_f(beyond, ',.0f')} MiB "
                   "(target ≤ 1024): "
                   + ("unmeasured" if beyond is None else "met" if beyond <= 1024 else "NOT met"))
        for rival in ("liger", "cce"):
            other = get("linear", rival, "fwd+bwd")
            if r is None or other is None:
                out.append(f"- {what} faster than {rival}: unmeasured")
            else:
                ratio = other["median_s"] / r["median_s"]
                out.append(f"- {what} faster than {rival}: {ratio:.2f}× "
                           + ("(met)" if ratio > 1 else "(NOT met)"))
    return out


def _verdict(what: str, value: float | None, target: float) -> str:
    if value is None:
        return f"- {what}: unmeasured (target ≥ {target:.0f} %)"
    return f"- {what}: {value:.1f} % (target ≥ {target:.0f} %): " + (
        "met" if value >= target else "NOT met")


def write_csv(path: Path, correctness: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    columns = ["section", "impl", "mode", "params", "status", "median_ms", "gb_s", "pct_hbm",
               "tflops", "pct_bf16_peak", "beyond_grads_mib", "tokens_per_s", "peak_mib",
               "fwd_err", "grad_err", "exact_zeros", "check", "reason"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for c in correctness:
            writer.writerow({**c, "section": "correctness", "impl": "fastpo", "mode": c["case"],
                             "params": c["dtype"]})
        for r in rows:
            writer.writerow({**r, "section": r["family"], "mode": r["params"].get("mode", "step"),
                             "params": json.dumps(r["params"], sort_keys=True)})


# --------------------------------------------------------------------------- running


def _correctness(device: str, quick: bool, in_process: bool) -> list[dict[str, Any]]:
    if in_process:
        from benchmarks import gpu_correctness

        return gpu_correctness.run(device, quick=quick)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--correctness-worker",
                           "--device", device], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=worker_env(), timeout=300, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return [{"case": "all", "dtype": "–", "status": "error",
             "reason": f"worker exit {proc.returncode}: {tail}"[:400]}]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="report path without suffix (writes .md and .csv)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy shapes")
    parser.add_argument("--dry-run", action="store_true",
                        help="--device cpu --quick, in this process: the pipeline at toy size")
    parser.add_argument("--budget-s", type=float, default=510.0)
    parser.add_argument("--skip", default="", help=f"comma-separated of {SECTIONS}")
    parser.add_argument("--correctness-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"unknown --skip {sorted(skip - set(SECTIONS))}; expected {SECTIONS}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: `python -m benchmarks gpu` measures a GPU and this machine has "
              f"none (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "use --dry-run to check the pipeline on the CPU", file=sys.stderr)
        return 2
    if args.correctness_worker:
        from benchmarks import gpu_correctness

        rows = gpu_correctness.run(args.device, quick=args.quick)
        print(RESULT_MARKER + json.dumps(rows), flush=True)
        return 0
    start = time.perf_counter()
    machine = machine_info()
    name = machine["gpu"] if args.device == "cuda" else "cpu-dry-run"
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"gpu-{_safe_name(name)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    hbm, flops = device_peaks(machine["gpu"])
    in_process = args.device == "cpu"
    print(f"device: {name}; peaks HBM {hbm} B/s, bf16 {flops} FLOP/s", flush=True)
    correctness = [] if "correctness" in skip else _correctness(args.device, args.quick,
                                                                in_process)
    for c in correctness:
        print(f"correctness {c['case']} {c['dtype']}: {c['status']} {c.get('reason', '')}",
              flush=True)
    rows = []
    for spec in plan(args.device, args.quick):
        section = spec.family
        left = args.budget_s - (time.perf_counter() - start)
        if section in skip or left < 30:
            reason = "skipped by --skip" if section in skip else "time budget spent"
            result = Result(suite=spec.suite, family=spec.family, impl=spec.impl,
                            params=spec.params, device=spec.device, status="skipped",
                            reason=reason)
        else:
            spec.timeout_s = left
            result = run_case(spec) if in_process else run_case_subprocess(spec)
        rows.append(derive(result.to_row(), hbm, flops))
        r = rows[-1]
        print(f"[{time.perf_counter() - start:5.0f} s] {section} {spec.impl} "
              f"{spec.params.get('mode', 'step')}: {r['status']} "
              f"{_f(r.get('median_ms'), '.2f')} ms {r.get('reason', '')}", flush=True)
    wall = time.perf_counter() - start
    text = markdown(machine, correctness, rows, wall)
    out.with_suffix(".md").write_text(text)
    write_csv(out.with_suffix(".csv"), correctness, rows)
    print("\n" + text)
    print(f"report: {out.with_suffix('.md')} and .csv ({wall:.0f} s)")
    bad = [c for c in correctness if c["status"] not in ("pass", "skipped")]
    bad += [r for r in rows if r["status"] == "error" and "fastpo" in r["impl"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
