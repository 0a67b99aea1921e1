"""PNG plots of benchmark results: time and peak extra memory against vocab size and tokens.

A plot is drawn for every set of rows that differ only in the vocabulary size (``V``) or only in
the number of tokens (``B × T``), with one line per implementation.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.report import IMPL_PARAMS

SWEEPS = {"V": ("V",), "tokens": ("B", "T")}


def _x_value(params: dict[str, Any], sweep: str) -> int | None:
    if sweep == "V":
        return params.get("V")
    if "B" in params and "T" in params:
        return params["B"] * params["T"]
    return None


def sweeps(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, list[tuple[int, dict]]]]:
    """(suite, family, device, sweep, fixed params) -> impl -> sorted [(x, row)], ≥ 2 points."""
    found: dict[tuple, dict[str, list[tuple[int, dict]]]] = {}
    for sweep, varied in SWEEPS.items():
        series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            x = _x_value(row["params"], sweep)
            if row["status"] != "ok" or x is None:
                continue
            fixed = tuple(sorted((k, v) for k, v in row["params"].items()
                                 if k not in varied and k not in IMPL_PARAMS))
            series[(row["suite"], row["family"], row["device"], sweep, fixed)][row["impl"]].append(
                (x, row))
        for key, by_impl in series.items():
            xs = {x for points in by_impl.values() for x, _ in points}
            if len(xs) >= 2:
                found[key] = {impl: sorted(points, key=lambda p: p[0])
                              for impl, points in by_impl.items()}
    return found


def plot_results(results: Path, out_dir: Path) -> list[Path]:
    """Draw every sweep found in ``results`` (a results.json) into ``out_dir``; the PNG paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plots")
        return []
    data = json.loads(Path(results).read_text())
    machine = data.get("machine", {}).get("cpu", "")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (suite, family, device, sweep, fixed), by_impl in sweeps(data["rows"]).items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for impl, points in sorted(by_impl.items()):
            xs = [x for x, _ in points]
            ax_t.plot(xs, [r["median_s"] for _, r in points], marker="o", label=impl)
            ax_m.plot(xs, [r["peak_mem_bytes"] / 2**20 for _, r in points], marker="o",
                      label=impl)
        xlabel = "vocabulary size V" if sweep == "V" else "tokens (B × T)"
        for ax, ylabel in ((ax_t, "median time (s)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        ax_t.legend(fontsize=8)
        fixed_text = " ".join(f"{k}={v}" for k, v in fixed)
        fig.suptitle(f"{suite}/{family} on {device} ({machine}): {fixed_text}", fontsize=9)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.=-]", "_",
                      f"{suite}_{family}_{device}_vs_{sweep}_{fixed_text}".replace(" ", "_"))
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
