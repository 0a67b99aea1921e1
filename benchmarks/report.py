"""Render benchmark results: one line per case while running, markdown tables with ratios after."""

from __future__ import annotations

import importlib
from collections import defaultdict
from typing import Any

from benchmarks.harness import Result

# The implementation every other one is compared with, per workload family.
BASELINES = {"copy": "copy", "logits": "torch", "hidden": "naive", "dpo_step": "trl",
             "dpo_lora_real": "trl", "ranked_step": "pairs_padded"}
# Parameters that describe an implementation's setting, not the workload (not part of the group).
IMPL_PARAMS = ("compiled",)


def _mb(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def _sizes(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in IMPL_PARAMS)


def one_line(result: Result) -> str:
    """A progress line for one finished case."""
    head = f"{result.suite}/{result.family} {result.impl:<15} {_sizes(result.params)}"
    if result.status != "ok":
        return f"{head}: {result.status.upper()} ({result.reason})"
    return (f"{head}: {result.median_s:.4f} s (min {result.min_s:.4f}, max {result.max_s:.4f}), "
            f"peak +{_mb(result.peak_mem_bytes)} MB")


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows of the same workload (suite, family, sizes, mode, device), in input order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (row["suite"], row["family"], row["device"],
               tuple((k, v) for k, v in row["params"].items() if k not in IMPL_PARAMS))
        groups[key].append(row)
    return groups


def ratios(group: list[dict[str, Any]]) -> dict[str, tuple[float | None, float | None]]:
    """impl -> (time ratio, memory ratio) against the family's baseline (None when unknown)."""
    family = group[0]["family"]
    base = next((r for r in group if r["impl"] == BASELINES.get(family) and r["status"] == "ok"),
                None)
    out = {}
    for row in group:
        t = m = None
        if base is not None and row["status"] == "ok":
            t = row["median_s"] / base["median_s"] if base["median_s"] else None
            if base["peak_mem_bytes"]:
                m = row["peak_mem_bytes"] / base["peak_mem_bytes"]
        out[row["impl"]] = (t, m)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    """Markdown: the machine, then one table per workload with ratios to its baseline."""
    machine = data.get("machine", {})
    lines = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_cores_available', '?')} "
             f"cores, {machine.get('memory_gib', '?')} GiB, GPU: {machine.get('gpu') or 'none'}; "
             f"torch {machine.get('version_torch')}, trl {machine.get('version_trl')}, "
             f"liger-kernel {machine.get('version_liger-kernel')}; fastpo CPU backend: "
             f"{(machine.get('fastpo_backends') or {}).get('cpu', '?')}; load average at start "
             f"{machine.get('load_average_1_5_15min')}", ""]
    copy = copy_rate(data["rows"])
    for (suite, family, device, sizes), group in group_rows(data["rows"]).items():
        base = BASELINES.get(family, "?")
        lines.append(f"**{suite}/{family}** on {device}: "
                     + " ".join(f"{k}={v}" for k, v in sizes) + f" (ratios vs `{base}`)")
        lines.append("")
        lines.append("| impl | median s | min–max s | × time | peak extra MB | × memory "
                     "| tokens/s | check | note |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        rat = ratios(group)
        for row in group:
            if row["status"] != "ok":
                lines.append(f"| {row['impl']} | {row['status']} | | | | | | | {row['reason']} |")
                continue
            t, m = rat[row["impl"]]
            note = row.get("notes") or ""
            if "compiled" in row["params"]:
                note = ("torch.compile" if row["params"]["compiled"] else "eager") + (
                    f"; {note}" if note and note not in ("torch.compile", "eager") else "")
            lines.append(
                f"| {row['impl']} | {row['median_s']:.4f} | {row['min_s']:.4f}–{row['max_s']:.4f}"
                f" | {_fmt(t, '.2f')} | {_mb(row['peak_mem_bytes'])} | {_fmt(m, '.2f')}"
                f" | {_fmt(row.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('check'), '.6g')}"
                f" | {note} |")
        lines.append("")
        lines.extend(bandwidth_lines(group, copy.get(device)))
        lines.extend(_suite_summary(suite, group))
    return "\n".join(lines)


def copy_rate(rows: list[dict[str, Any]]) -> dict[str, float]:
    """device -> the copy rate (bytes/s) measured in this run: the fastest of its ``copy`` rows
    (the machine's capability; a slower reading was a busier moment, and dividing by it would
    flatter every "% of copy")."""
    rates: dict[str, float] = {}
    for r in rows:
        if r["family"] == "copy" and r["status"] == "ok" and r.get("bandwidth_gb_s"):
            rates[r["device"]] = max(rates.get(r["device"], 0.0), r["bandwidth_gb_s"] * 1e9)
    return rates


def bandwidth_lines(group: list[dict[str, Any]], copy_bytes_s: float | None) -> list[str]:
    """Bytes touched, the problem's bytes and "% of copy" of the rows that count their bytes."""
    counted = [r for r in group if r["status"] == "ok" and "touched_bytes" in r.get("extra", {})
               and r["family"] != "copy"]
    if not counted:
        return []
    lines = ["| impl | bytes touched (MB) | problem bytes (MB) | GB/s touched | GB/s of the "
             "problem | % of copy (touched) |", "|---|---:|---:|---:|---:|---:|"]
    for r in counted:
        touched, problem = r["extra"]["touched_bytes"], r["extra"]["problem_bytes"]
        rate = touched / r["median_s"]
        pct = 100 * rate / copy_bytes_s if copy_bytes_s else None
        lines.append(f"| {r['impl']} | {touched / 1e6:,.1f} | {problem / 1e6:,.1f} | "
                     f"{rate / 1e9:,.2f} | {problem / r['median_s'] / 1e9:,.2f} | "
                     f"{_fmt(pct, '.0f')} |")
    note = (f"copy rate measured in this run (the fastest copy row): {copy_bytes_s / 1e9:,.2f} "
            "GB/s (read + write)"
            if copy_bytes_s else "no copy row in this run: no % of copy")
    return [*lines, "", note, ""]


def _suite_summary(suite: str, group: list[dict[str, Any]]) -> list[str]:
    """Lines a suite module adds under its table (its ``summary(group)``, if it has one)."""
    try:
        module = importlib.import_module(f"benchmarks.suites.{suite}")
    except ImportError:
        return []
    summary = getattr(module, "summary", None)
    return summary(group) if callable(summary) else []
