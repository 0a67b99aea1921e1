"""One command for a GPU: correctness, bandwidth, FLOP rate, the cost model and a DPO step.

    python -m benchmarks gpu [--out DIR] [--budget-s 330] [--skip SECTION,...]
    python -m benchmarks gpu --preflight      versions, capability, torch APIs, every Triton
                                              kernel once (``benchmarks/preflight.py``; ~1 min)
    python -m benchmarks gpu --dry-run        (= --device cpu --quick: the whole pipeline at toy
                                               shapes on the CPU; what CI rehearses)
    python -m benchmarks gpu --estimate       the planned cases and the run's estimated time
    python -m benchmarks gpu --dry-run --workers   each section in its own worker process, as on
                                              a GPU (``make gpu-rehearsal``)

fastpo must be installed (see the README's "On a GPU machine without network"): when it cannot
be imported the command fails at once with the reason, it never reports skipped rows instead.

Sections, in order; each runs its cases in one fresh process (``benchmarks.harness.stream_batch``)
and every result is written to ``--out`` as it arrives (``report.md``, ``report.csv``,
``report.json``), so a run killed at any point still reports what it measured:

1. microbench: the machine's yardsticks, measured here: a device-to-device copy (GB/s, read +
   write) and one bf16 matmul at the 8B head's shape (TFLOP/s). Their shares of the data sheet
   are the cost model's efficiencies, written to ``calibration.json``
   (``fastpo.kernels.linear_logprobs_roofline.Calibration``) and applied to the rest of the run
   (``FASTPO_COST_CALIBRATION``: the op's dispatcher chooses with them);
2. correctness: the compiled Triton kernels against float64 on ugly inputs
   (``benchmarks/gpu_correctness.py``), > 2³¹ logits elements included; its worker is killed after
   its share of the budget and what it had finished is kept, the rest is a "timed out" row;
3. logits: from 32 × 1024 × 128256 bf16 logits, forward and forward + backward, a quarter of the
   tokens prompt / padding (ignored) and every token scored; GB/s of the bytes each
   implementation must touch (fastpo's kernels skip ignored rows, the others read every row;
   ``benchmarks.suites.kernels.logits_bytes``) beside the problem's bytes, and % of the copy
   rate of section 1 — never of a data-sheet peak. Against ``log_softmax().gather()`` eager and
   under ``torch.compile``, Liger's cross-entropy and quack's;
4. linear: the fused linear head at Llama-3-8B's shape (H 4096, V 128256) × 32768 tokens, bf16,
   every token scored; model TFLOP/s (2·N·V·H forward, 6·N·V·H forward + backward) as % of the
   matmul of section 1, and the memory beyond the returned gradients; fastpo as the op + a DPO
   loss (``fastpo``) and as the loss-fused DPO module (``fastpo_loss_fused``), against naive,
   Liger's fused-linear DPO and Cut Cross-Entropy exact (``cce_exact``, ``filter_eps=None``) and
   with its default gradient filter (``cce_filtered``). Then the op with each design forced
   (``design_tile``, ``design_gemm``), forward and forward + backward, beside the calibrated cost
   model's prediction ("predicted vs measured");
5. dpo_step: one DPO step (policy + frozen reference, AdamW) of a random Llama-3.2-1B-shaped
   model (``benchmarks.suites.e2e``, ``model="llama-1b"``), fastpo's engine against TRL's
   ``DPOTrainer``; tokens/s and peak memory.

Only the optional rivals (liger, cut-cross-entropy, trl, quack, flash-attn) give "skipped: not
installed" rows, and only when the package itself is missing (``harness.missing_optional``);
any other import error is an error row. The run keeps to ``--budget-s`` (default 330 s: the
whole command, machine start aside, under 6 minutes; the full plan is estimated at
:func:`estimate_s`): a case that would start with less than 20 s left is recorded as skipped,
and each section's worker is killed when the budget runs out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO_ROOT,
    CaseSpec,
    Result,
    machine_info,
    run_case,
    stream_batch,
    worker_env,
)

SECTIONS = ("microbench", "correctness", "logits", "linear", "dpo_step")
# (name contains, HBM bytes/s, bf16 dense FLOP/s) of the data sheets; first match wins. Shown for
# reference only: every percentage of the report is of a rate measured in the same run.
PEAKS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100 NVL", 3.9e12, 835e12),
         ("H100", 3.35e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12),
         ("A100", 1.555e12, 312e12)]
# The compass's GPU goals (issue 22), against the same run's measured yardsticks.
TARGETS = {"logits fwd": 0.95, "linear fwd+bwd": 0.85, "dpo speed": 1.5, "dpo memory": 0.5}
CORRECTNESS_TIMEOUT_S = 150.0
DEFAULT_BUDGET_S = 330.0
GIB = 2**30
# Estimated seconds on one H100 of each full-size case (set-up, compilation, warm-up, the memory
# call and the timed calls) and of a section's process start; unmeasured until the first GPU day.
# The run prints them beside what each section took, so that the next estimate is measured.
PROCESS_START_S = 8.0
CASE_ESTIMATE_S = {  # (family, impl): one case once compiled
    ("copy", "copy"): 2, ("linear", "matmul"): 4,
    ("logits", "torch"): 3, ("logits", "torch_compile"): 4, ("logits", "fastpo"): 3,
    ("logits", "fastpo_inplace"): 3, ("logits", "liger_ce"): 3, ("logits", "quack"): 3,
    ("linear", "naive"): 4, ("linear", "liger"): 5, ("linear", "fastpo"): 4,
    ("linear", "fastpo_loss_fused"): 5, ("linear", "cce_exact"): 4,
    ("linear", "cce_filtered"): 4, ("linear", "design_tile"): 4, ("linear", "design_gemm"): 4,
    ("dpo_step", "trl"): 20, ("dpo_step", "fastpo"): 15,
}
COMPILE_ESTIMATE_S = {  # (family, impl prefix): once per section's process (compilation, autotune)
    ("logits", "torch_compile"): 25, ("logits", "fastpo"): 3, ("logits", "liger_ce"): 3,
    ("logits", "quack"): 3, ("linear", "liger"): 25, ("linear", "cce"): 15,
    ("linear", "fastpo"): 5, ("linear", "design"): 3,
}
CORRECTNESS_ESTIMATE_S = 55.0


def device_peaks(name: str | None) -> tuple[float | None, float | None]:
    """(HBM bytes/s, bf16 dense FLOP/s) of a device by its name; (None, None) when unknown."""
    for key, hbm, flops in PEAKS:
        if name and key in name:
            return hbm, flops
    return None, None


def section_of(spec: CaseSpec | dict[str, Any]) -> str:
    """The report section of a case (or result row)."""
    family = spec.family if isinstance(spec, CaseSpec) else spec["family"]
    impl = spec.impl if isinstance(spec, CaseSpec) else spec["impl"]
    if family == "copy" or impl == "matmul":
        return "microbench"
    return family


def plan(device: str, quick: bool) -> list[CaseSpec]:
    """The timed cases (every section but correctness) at full or toy (``quick``) size."""
    big = not quick
    logits = ({"B": 32, "T": 1024, "V": 128256, "dtype": "bf16"} if big
              else {"B": 2, "T": 16, "V": 1000, "dtype": "fp32"})
    linear = ({"B": 32, "T": 1024, "H": 4096, "V": 128256, "dtype": "bf16"} if big
              else {"B": 2, "T": 16, "H": 32, "V": 301, "dtype": "fp32"})
    step = ({"model": "llama-1b", "V": 128256, "P": 8, "Lp": 256, "Lc": 256, "dtype": "bf16"}
            if big else {"model": "tiny", "V": 1024, "P": 2, "Lp": 16, "Lc": 16, "dtype": "fp32"})
    reps, warmup = (5, 1) if big else (2, 1)
    few = 3 if big else 2

    def case(suite: str, family: str, impl: str, params: dict[str, Any], n: int) -> CaseSpec:
        return CaseSpec(suite, family, impl, params, device, warmup=warmup, reps=n)

    specs = [case("gpu", "copy", "copy", {"MiB": 4096 if big else 64}, reps),
             case("gpu", "linear", "matmul", {**linear, "mode": "matmul"}, reps)]
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("torch", "torch_compile", "fastpo", "fastpo_inplace", "liger_ce", "quack"):
            if mode == "fwd" and impl in ("fastpo_inplace", "torch_compile"):
                continue  # no in-place forward; one torch.compile row (30 s of compilation)
            specs.append(case("gpu", "logits", impl, {**logits, "mode": mode}, reps))
    for mode in ("fwd", "fwd+bwd"):  # every token scored: nothing for fastpo to skip (the
        # baselines read every row whatever the labels: their rows above stand for both)
        specs.append(case("gpu", "logits", "fastpo", {**logits, "labels": "all", "mode": mode},
                          reps))
    for mode, impls in (("fwd", ("naive", "fastpo", "cce_exact")),
                        ("fwd+bwd", ("naive", "liger", "fastpo", "fastpo_loss_fused",
                                     "cce_exact", "cce_filtered"))):
        specs += [case("gpu", "linear", impl, {**linear, "mode": mode}, few) for impl in impls]
    for design in ("tile", "gemm"):
        for mode in ("fwd", "fwd+bwd"):
            specs.append(case("gpu", "linear", f"design_{design}", {**linear, "mode": mode},
                              2 if big else 1))
    specs += [case("e2e", "dpo_step", impl, dict(step), few) for impl in ("trl", "fastpo")]
    return specs


def estimate_s(specs: list[CaseSpec], skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Estimated seconds per section (and ``"total"``) of a full-size run on one H100:
    :data:`CASE_ESTIMATE_S` per case, :data:`COMPILE_ESTIMATE_S` once per section and kind of
    kernel, :data:`PROCESS_START_S` per section's process, the correctness section's
    :data:`CORRECTNESS_ESTIMATE_S`, 5 s of machine survey and light preflight."""
    out: dict[str, float] = {"setup": 5.0}
    if "correctness" not in skip:
        out["correctness"] = CORRECTNESS_ESTIMATE_S + PROCESS_START_S
    compiled: set[tuple[str, str, str]] = set()
    for spec in specs:
        section = section_of(spec)
        if section in skip:
            continue
        out.setdefault(section, PROCESS_START_S)
        out[section] += CASE_ESTIMATE_S[(spec.family, spec.impl)]
        for (family, prefix), seconds in COMPILE_ESTIMATE_S.items():
            if spec.family == family and spec.impl.startswith(prefix) and \
                    (section, family, prefix) not in compiled:
                compiled.add((section, family, prefix))
                out[section] += seconds
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- derived figures


def _bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def yardsticks(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The run's own rates: ``copy_bytes_s`` (read + write bytes per second of the copy) and
    ``matmul_flops_s`` (the bf16 matmul at the anchor shape), None where not measured."""
    copy = next((r for r in rows if r["family"] == "copy" and r["status"] == "ok"), None)
    mm = next((r for r in rows if r["impl"] == "matmul" and r["status"] == "ok"), None)
    return {"copy_bytes_s": copy["bandwidth_gb_s"] * 1e9 if copy else None,
            "matmul_flops_s": (2 * mm["tokens"] * mm["params"]["V"] * mm["params"]["H"]
                               / mm["median_s"]) if mm else None}


def derive(row: dict[str, Any], ref: dict[str, float | None]) -> dict[str, Any]:
    """Add the section's figures of merit to a result row, against the run's yardsticks ``ref``
    (:func:`yardsticks`)."""
    p = row["params"]
    out = dict(row)
    if row["status"] != "ok":
        return out
    out["median_ms"] = row["median_s"] * 1e3
    copy, matmul = ref.get("copy_bytes_s"), ref.get("matmul_flops_s")
    if row["family"] in ("logits", "copy"):
        extra = row.get("extra") or {}
        out["gb_s"] = row["bandwidth_gb_s"]  # bytes touched / time
        out["touched_mb"] = extra.get("touched_bytes", 0) / 1e6
        out["problem_mb"] = extra.get("problem_bytes", 0) / 1e6
        out["problem_gb_s"] = extra.get("problem_bytes", 0) / row["median_s"] / 1e9
        out["pct_copy"] = 100 * row["bandwidth_gb_s"] * 1e9 / copy if copy else None
    elif row["family"] == "linear":
        factor = {"fwd+bwd": 6, "fwd": 2, "matmul": 2}[p["mode"]]
        tokens = p["B"] * p["T"]
        out["tflops"] = factor * tokens * p["V"] * p["H"] / row["median_s"] / 1e12
        out["pct_matmul"] = 100 * out["tflops"] * 1e12 / matmul if matmul else None
        grads = (tokens + p["V"]) * p["H"] * _bytes(p["dtype"]) if p["mode"] == "fwd+bwd" else 0
        out["beyond_grads_mib"] = max(row["peak_mem_bytes"] - grads, 0) / 2**20
    out["peak_mib"] = row["peak_mem_bytes"] / 2**20 if row["peak_mem_bytes"] is not None else None
    return out


def calibration(machine: dict[str, Any], rows: list[dict[str, Any]]):
    """The cost model's efficiencies measured in this run (None until both yardsticks are):
    the matmul's share of the data sheet's bf16 peak and the copy's share of its HBM bandwidth,
    the data sheet being the one the dispatcher uses for this device name."""
    from fastpo.kernels.linear_logprobs_roofline import Calibration, data_sheet

    ref = yardsticks(rows)
    if ref["copy_bytes_s"] is None or ref["matmul_flops_s"] is None:
        return None
    name = machine.get("gpu") or "cpu-dry-run"
    sheet = data_sheet(machine.get("gpu"))
    return Calibration(device=name, gemm_efficiency=ref["matmul_flops_s"] / sheet.half_flops,
                       hbm_efficiency=ref["copy_bytes_s"] / sheet.hbm_bytes_per_s,
                       source=f"python -m benchmarks gpu, {machine.get('time')}")


def predictions(rows: list[dict[str, Any]], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted (the calibrated cost model) against measured time of every design at the
    anchor shape: the op's tile and gemm designs forced, forward and forward + backward, the
    dispatcher's pick (the ``fastpo`` rows) and the loss-fused module."""
    import dataclasses

    from fastpo.kernels import linear_logprobs_cost as lc
    from fastpo.kernels.linear_logprobs_roofline import calibrated, data_sheet

    cal = calibration(machine, rows)
    spec = data_sheet(machine.get("gpu"))
    if cal is not None:
        spec = calibrated(spec, cal)
    out = []
    for r in rows:
        if r["family"] != "linear" or r["impl"] == "matmul":
            continue
        p = r["params"]
        shape = lc.Shape(p["B"] * p["T"], p["H"], p["V"], _bytes(p["dtype"]),
                         need_hidden=p["mode"] == "fwd+bwd", need_weight=p["mode"] == "fwd+bwd")
        phase = "forward" if p["mode"] == "fwd" else "fwd+bwd"
        if r["impl"].startswith("design_"):
            design = r["impl"].removeprefix("design_")
            cost = lc.predict(design, phase, shape, spec)
        elif r["impl"] == "fastpo" and phase == "forward":
            design = lc.choose_design("forward", shape, spec)
            cost = lc.predict(design, "forward", shape, spec)
            design = f"auto ({design})"
        elif r["impl"] == "fastpo":
            fwd, bwd, cost = lc.best_plan(shape, spec)
            design = f"auto ({fwd} fwd + {bwd} bwd)"
        elif r["impl"] == "fastpo_loss_fused":
            design = lc.LOSS_FUSED
            paired = dataclasses.replace(shape, unit_tokens=2 * p["T"])
            cost = lc.predict(lc.LOSS_FUSED, "fwd+bwd", paired, spec)
        else:
            continue
        measured = r.get("median_s") if r["status"] == "ok" else None
        out.append({"design": design, "mode": p["mode"], "predicted_ms": cost.time_s * 1e3,
                    "measured_ms": measured * 1e3 if measured else None,
                    "ratio": measured / cost.time_s if measured else None,
                    "status": r["status"], "reason": r.get("reason", "")})
    return out


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(machine: dict[str, Any], preflight: list[dict[str, Any]],
             correctness: list[dict[str, Any]], rows: list[dict[str, Any]], wall_s: float,
             sections: dict[str, dict[str, float]]) -> str:
    """The report: machine, preflight, yardsticks and calibration, correctness, one table per
    section, predicted vs measured, the targets, the time each section took vs its estimate."""
    gpu = machine.get("gpu") or "none (dry run)"
    hbm, flops = device_peaks(machine.get("gpu"))
    ref = yardsticks(rows)
    cal = calibration(machine, rows)
    lines = [f"# GPU report: {gpu}", "",
             f"torch {machine.get('version_torch')}, triton {machine.get('version_triton')}, "
             f"transformers {machine.get('version_transformers')}, trl "
             f"{machine.get('version_trl')}, liger-kernel {machine.get('version_liger-kernel')}, "
             f"cut-cross-entropy {machine.get('version_cut-cross-entropy')}; "
             f"{machine.get('time')}; whole run {wall_s:.0f} s.", "",
             "## Yardsticks measured in this run", "",
             f"- copy (device to device, read + write): "
             f"{_f(ref['copy_bytes_s'] and ref['copy_bytes_s'] / 1e9, ',.1f')} GB/s"
             f" (data sheet HBM: {_f(hbm and hbm / 1e9, ',.0f')} GB/s)",
             f"- matmul at the linear section's shape (bf16 at the 8B head on a GPU): "
             f"{_f(ref['matmul_flops_s'] and ref['matmul_flops_s'] / 1e12, ',.1f')} TFLOP/s"
             f" (data sheet dense bf16: {_f(flops and flops / 1e12, ',.0f')} TFLOP/s)",
             "- cost-model calibration: " + (
                 f"GEMM efficiency {cal.gemm_efficiency:.3g}, HBM efficiency "
                 f"{cal.hbm_efficiency:.3g} of the data sheet the dispatcher uses "
                 "(`calibration.json`, applied to the sections after this one)" if cal else
                 "not measured (defaults: 0.80 GEMM, 0.90 HBM)"),
             "", "## Preflight", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['detail']} |" for r in preflight]
    lines += ["", "## Correctness of the compiled kernels against float64", "",
              "Tolerances: those of the test suite; the half-precision fused-linear gradients "
              "are held to its scale-aware bound u·(|G|·|W|) + u·|ref| (u = 2⁻⁸ bf16, 2⁻¹¹ "
              "fp16), see `benchmarks/gpu_correctness.py`.", "",
              "| case | dtype | status | fwd err / tol | grad err / tol | exact zeros | note |",
              "|---|---|---|---:|---:|---|---|"]
    for c in correctness:
        lines.append(f"| {c['case']} | {c['dtype']} | {c['status']} | {_f(c.get('fwd_err'), '.3g')}"
                     f" | {_f(c.get('grad_err'), '.3g')} | {c.get('exact_zeros', '–')} "
                     f"| {c.get('reason', '')} |")
    by = {sec: [r for r in rows if section_of(r) == sec] for sec in SECTIONS}
    lines += ["", "## From logits (GB/s of the bytes each implementation must touch)", "",
              "Forward: the logits read once; forward + backward: read, read again, gradient "
              "written. fastpo's kernels skip ignored rows (touched < problem); the others read "
              "every row. % of copy: GB/s touched over this run's copy rate.", "",
              "| impl | mode | shape | ms | MB touched | MB of the problem | GB/s touched | "
              "GB/s of the problem | % of copy | peak extra MiB | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in by["logits"]:
        lines.append(_row(r, [_f(r.get("touched_mb"), ",.4g"), _f(r.get("problem_mb"), ",.4g"),
                              _f(r.get("gb_s"), ",.4g"), _f(r.get("problem_gb_s"), ",.4g"),
                              _f(r.get("pct_copy"), ".1f"), _f(r.get("peak_mib"), ",.0f")]))
    lines += ["", "## Fused linear (model TFLOP/s: 2·N·V·H forward, 6·N·V·H forward + backward)",
              "", "| impl | mode | shape | ms | TFLOP/s | % of this run's matmul "
              "| MiB beyond returned gradients | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in by["microbench"] + by["linear"]:
        if r["family"] == "copy":
            continue
        lines.append(_row(r, [_f(r.get("tflops"), ",.1f"), _f(r.get("pct_matmul"), ".0f"),
                              _f(r.get("beyond_grads_mib"), ",.0f")]))
    lines += ["", "## Cost model: predicted vs measured at the anchor shape", "",
              "Predicted: the calibrated model of `fastpo.kernels.linear_logprobs_cost` (the "
              "data sheet of this device name, this run's efficiencies)"
              + ("." if machine.get("gpu") else "; on a CPU the measured column is the CPU "
                 "path, not the GPU design named."), "",
              "| design | mode | predicted ms | measured ms | measured / predicted | note |",
              "|---|---|---:|---:|---:|---|"]
    for c in predictions(rows, machine):
        lines.append(f"| {c['design']} | {c['mode']} | {c['predicted_ms']:,.2f} | "
                     f"{_f(c['measured_ms'], ',.2f')} | {_f(c['ratio'], '.2f')} | "
                     f"{'' if c['status'] == 'ok' else c['status'] + ': ' + c['reason'][:120]} |")
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
    lines += ["", "## Time per section (s)", "", "| section | estimated (H100, full size) | "
              "took |", "|---|---:|---:|"]
    for name, t in sections.items():
        lines.append(f"| {name} | {_f(t.get('estimated'), '.0f')} | {_f(t.get('took'), '.0f')} |")
    return "\n".join(lines) + "\n"


def _row(r: dict[str, Any], cells: list[str]) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r["params"].items() if k != "mode")
    head = f"| {r['impl']} | {r['params'].get('mode', 'step')} | {shape} "
    if r["status"] != "ok":
        blanks = "| " * len(cells)
        return f"{head}| {r['status']} {blanks}| {r['reason'][:200]} |"
    return f"{head}| {r['median_ms']:,.2f} | " + " | ".join(cells) + f" | {r.get('notes', '')} |"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: the measured figure, against the run's own yardsticks."""
    def get(family: str, impl: str, mode: str | None = None, labels: str = "prompt"
            ) -> dict[str, Any] | None:
        return next((r for r in rows if r["family"] == family and r["impl"] == impl
                     and (mode is None or r["params"].get("mode") == mode)
                     and r["params"].get("labels", "prompt") == labels
                     and r["status"] == "ok"), None)

    out = []
    for labels in ("prompt", "all"):
        r = get("logits", "fastpo", "fwd", labels)
        what = "from logits fwd" + (", every token scored" if labels == "all" else "")
        out.append(_verdict(f"{what}: % of the copy rate (bytes touched)",
                            r.get("pct_copy") if r else None, 100 * TARGETS["logits fwd"]))
    for impl in ("fastpo", "fastpo_loss_fused"):  # the op + a loss; the loss inside the op
        r = get("linear", impl, "fwd+bwd")
        what = f"fused linear fwd+bwd ({impl})"
        out.append(_verdict(f"{what}: % of this run's bf16 matmul", r and r.get("pct_matmul"),
                            100 * TARGETS["linear fwd+bwd"]))
        beyond = r.get("beyond_grads_mib") if r else None
        out.append(f"- {what}: memory beyond the returned gradients {_f(beyond, ',.0f')} MiB "
                   "(target ≤ 1024): "
                   + ("unmeasured" if beyond is None else "met" if beyond <= 1024 else "NOT met"))
        for rival in ("liger", "cce_exact", "cce_filtered"):
            other = get("linear", rival, "fwd+bwd")
            if r is None or other is None:
                out.append(f"- {what} faster than {rival}: unmeasured")
            else:
                ratio = other["median_s"] / r["median_s"]
                out.append(f"- {what} faster than {rival}: {ratio:.2f}× "
                           + ("(met)" if ratio > 1 else "(NOT met)"))
    ours, trl = get("dpo_step", "fastpo"), get("dpo_step", "trl")
    if ours is None or trl is None:
        out.append(f"- DPO step ≥ {TARGETS['dpo speed']}× TRL tokens/s at ≤ "
                   f"{TARGETS['dpo memory']}× its memory: unmeasured")
    else:
        speed = ours["tokens_per_s"] / trl["tokens_per_s"]
        memory = ours["peak_mem_bytes"] / trl["peak_mem_bytes"]
        met = speed >= TARGETS["dpo speed"] and memory <= TARGETS["dpo memory"]
        out.append(f"- DPO step: {speed:.2f}× TRL tokens/s at {memory:.2f}× its memory "
                   f"(target ≥ {TARGETS['dpo speed']}× at ≤ {TARGETS['dpo memory']}×): "
                   + ("met" if met else "NOT met"))
    return out


def _verdict(what: str, value: float | None, target: float) -> str:
    if value is None:
        return f"- {what}: unmeasured (target ≥ {target:.0f} %)"
    return f"- {what}: {value:.1f} % (target ≥ {target:.0f} %): " + (
        "met" if value >= target else "NOT met")


CSV_COLUMNS = ["section", "impl", "mode", "params", "status", "median_ms", "gb_s", "touched_mb",
               "problem_mb", "problem_gb_s", "pct_copy", "tflops", "pct_matmul",
               "beyond_grads_mib", "tokens_per_s", "peak_mib", "fwd_err", "grad_err",
               "exact_zeros", "check", "reason"]


def write_csv(path: Path, correctness: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for c in correctness:
            writer.writerow({**c, "section": "correctness", "impl": "fastpo", "mode": c["case"],
                             "params": c["dtype"]})
        for r in rows:
            writer.writerow({**r, "section": section_of(r),
                             "mode": r["params"].get("mode", "step"),
                             "params": json.dumps(r["params"], sort_keys=True)})


# --------------------------------------------------------------------------- running


class Report:
    """Everything the run knows so far, written to ``out`` (``report.md``, ``report.csv``,
    ``report.json``) every time something is added: a run killed at any point leaves a report
    of what it had measured."""

    def __init__(self, out: Path, machine: dict[str, Any]) -> None:
        self.out, self.machine = out, machine
        self.preflight: list[dict[str, Any]] = []
        self.correctness: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.sections: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    def rows(self) -> list[dict[str, Any]]:
        ref = yardsticks(self.results)
        return [derive(r, ref) for r in self.results]

    def text(self) -> str:
        return markdown(self.machine, self.preflight, self.correctness, self.rows(),
                        time.perf_counter() - self.start, self.sections)

    def write(self) -> None:
        text = self.text()
        rows = self.rows()
        for name, content in (("report.md", text),
                              ("report.json", json.dumps(
                                  {"machine": self.machine, "preflight": self.preflight,
                                   "correctness": self.correctness, "rows": rows,
                                   "sections": self.sections}, indent=1, default=str))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(self.out / name)  # never a half-written report
        write_csv(self.out / "report.csv", self.correctness, rows)


def _correctness(device: str, quick: bool, in_process: bool, timeout_s: float,
                 out: Path) -> list[dict[str, Any]]:
    """The correctness rows; a worker killed by ``timeout_s`` (or dying) keeps the rows it had
    written and adds one error row saying why, never an exception."""
    import subprocess

    if in_process:
        from benchmarks import gpu_correctness

        return gpu_correctness.run(device, quick=quick)
    rows_file = out / "correctness.jsonl"
    rows_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu", "--correctness-worker", "--device", device,
               "--rows-file", str(rows_file)] + (["--quick"] if quick else [])
    why = ""
    try:
        with open(out / "correctness.log", "w") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                  env=worker_env(), timeout=timeout_s, check=False)
        if proc.returncode != 0:
            why = f"worker exited with status {proc.returncode}; see {out / 'correctness.log'}"
    except subprocess.TimeoutExpired:
        why = f"timed out: the correctness worker was killed after {timeout_s:.0f} s"
    rows = ([json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
            if rows_file.exists() else [])
    if why:
        rows.append({"case": "the cases after these", "dtype": "–", "status": "error",
                     "reason": why})
    return rows


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _fastpo_import_error() -> str | None:
    """Why fastpo cannot be imported (None when it can): the run measures nothing without it."""
    try:
        import fastpo
        import fastpo.kernels  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default benchmarks/results/gpu-<device>)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy shapes")
    parser.add_argument("--dry-run", action="store_true",
                        help="--device cpu --quick: the pipeline at toy size on the CPU")
    parser.add_argument("--preflight", action="store_true",
                        help="check the install and every kernel once (about a minute)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the plan's estimated time per section and exit")
    parser.add_argument("--workers", action="store_true",
                        help="on a CPU too, run each section in its own worker process, as on a "
                             "GPU (the rehearsal does)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--skip", default="", help=f"comma-separated of {SECTIONS}")
    parser.add_argument("--correctness-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    skip = frozenset(s for s in args.skip.split(",") if s)
    if skip - set(SECTIONS):
        parser.error(f"unknown --skip {sorted(skip - set(SECTIONS))}; expected {SECTIONS}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.estimate:
        for name, seconds in estimate_s(plan("cuda", False), skip).items():
            print(f"{name:12s} {seconds:6.0f} s")
        return 0
    broken = _fastpo_import_error()
    if broken is not None:
        print(f"error: fastpo cannot be imported ({broken}); nothing would be measured. Install "
              "it first: README, \"On a GPU machine without network\" (pip install --no-deps "
              "--no-index DIR/*.whl)", file=sys.stderr)
        return 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: `python -m benchmarks gpu` measures a GPU and this machine has "
              f"none (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "use --dry-run to check the pipeline on the CPU", file=sys.stderr)
        return 2
    if args.correctness_worker:
        from benchmarks import gpu_correctness

        gpu_correctness.run(args.device, quick=args.quick, rows_file=args.rows_file)
        return 0
    if args.preflight:
        from benchmarks import preflight

        return preflight.main(args.device, args.out)
    return run(args, skip)


def run(args: argparse.Namespace, skip: frozenset[str]) -> int:
    """The full run: every section, the report rewritten as each result arrives."""
    from benchmarks import preflight
    from fastpo.kernels.linear_logprobs_roofline import CALIBRATION_ENV, device_spec

    machine = machine_info()
    name = machine["gpu"] if args.device == "cuda" else "cpu-dry-run"
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"gpu-{_safe_name(name)}"
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, machine)
    in_process = args.device == "cpu" and not args.workers
    specs = plan(args.device, args.quick)
    estimate = estimate_s(plan("cuda", False), skip)
    print(f"device: {name}; estimated {estimate['total']:.0f} s on one H100 at full size; "
          f"budget {args.budget_s:.0f} s; report in {out}", flush=True)
    report.preflight = preflight.environment(args.device) + preflight.torch_apis(args.device)
    report.write()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - report.start)

    def section(title: str, cases: list[CaseSpec]) -> None:
        begin = time.perf_counter()
        report.sections[title] = {"estimated": estimate.get(title)}
        todo = []
        for spec in cases:
            if title in skip or left() < 20:
                reason = "skipped by --skip" if title in skip else "time budget spent"
                report.results.append(Result(
                    suite=spec.suite, family=spec.family, impl=spec.impl, params=spec.params,
                    device=spec.device, status="skipped", reason=reason).to_row())
            else:
                todo.append(spec)
        report.write()

        def arrived(result: Result) -> None:
            report.results.append(result.to_row())
            r = derive(result.to_row(), yardsticks(report.results))
            print(f"[{time.perf_counter() - report.start:5.0f} s] {title} {r['impl']} "
                  f"{r['params'].get('mode', 'step')}: {r['status']} "
                  f"{_f(r.get('median_ms'), '.2f')} ms {r.get('reason', '')}", flush=True)
            report.write()

        if todo and in_process:
            for spec in todo:
                arrived(run_case(spec))
        elif todo:
            stream_batch(todo, timeout_s=max(left(), 1.0), log_path=out / f"{title}.log",
                         on_result=arrived)
        report.sections[title]["took"] = time.perf_counter() - begin
        report.write()

    section("microbench", [s for s in specs if section_of(s) == "microbench"])
    cal = calibration(machine, report.results)
    if cal is not None:
        path = out / "calibration.json"
        path.write_text(cal.to_json())
        os.environ[CALIBRATION_ENV] = str(path)  # the later sections' workers (and this one)
        device_spec.cache_clear()
        print(f"calibration: GEMM {cal.gemm_efficiency:.3g}, HBM {cal.hbm_efficiency:.3g} of "
              f"the data sheet -> {path}", flush=True)
    if "correctness" not in skip:
        begin = time.perf_counter()
        report.sections["correctness"] = {"estimated": estimate.get("correctness")}
        budget = min(CORRECTNESS_TIMEOUT_S, max(left() - 20, 1.0))
        report.correctness = _correctness(args.device, args.quick, in_process, budget, out)
        for c in report.correctness:
            print(f"correctness {c['case']} {c['dtype']}: {c['status']} {c.get('reason', '')}",
                  flush=True)
        report.sections["correctness"]["took"] = time.perf_counter() - begin
        report.write()
    for title in ("logits", "linear", "dpo_step"):
        section(title, [s for s in specs if section_of(s) == title])
    report.write()
    print("\n" + report.text())
    took = time.perf_counter() - report.start
    print(f"report: {out / 'report.md'} (.csv, .json) in {took:.0f} s")
    rows = report.rows()
    bad = [c for c in report.correctness if c["status"] not in ("pass", "skipped")]
    bad += [r for r in rows if r["status"] == "error" and "fastpo" in r["impl"]]
    bad += [r for r in report.preflight if r["status"] == "FAIL"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
