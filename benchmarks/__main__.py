"""Benchmark entry point.

    python -m benchmarks run --suite kernels|e2e|e2e-real|ranked|all --device cpu|cuda
                             [--quick | --smoke]
                             [--reps N] [--threads N] [--only TEXT] [--profile] [--out DIR]
    python -m benchmarks report DIR/results.json     markdown tables (for RESULTS.md)
    python -m benchmarks plot DIR/results.json       PNG plots of time and memory
    python -m benchmarks compile-report [...]         AOT compile gates, sm_80/sm_90, no GPU
                                                     (``benchmarks/compile_report.py``)
    python -m benchmarks gpu [--out DIR] [...]        the one-command GPU report (one H100,
                                                     < 6 min; ``benchmarks/gpu.py``); --preflight
                                                     checks the install in about a minute
    python -m benchmarks bundle --out DIR             the wheels to carry to a GPU machine
                                                     without network (``benchmarks/bundle.py``)

``run`` measures every case in a fresh process (see ``benchmarks/harness.py``), prints each result
as it lands and then a table per workload with time and memory ratios against the baseline
implementation, and writes ``results.json`` (machine + rows), ``results.csv`` and the plots under
``--out`` (default ``benchmarks/out/<suite>-<device>-<time>``). ``--quick`` is the short run
(under 3 minutes on 2 CPU cores), ``--smoke`` the smallest sizes (what CI runs, with
``--in-process``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.harness import (
    REPO_ROOT,
    RESULT_MARKER,
    CaseSpec,
    Result,
    machine_info,
    run_batch,
    run_case,
    run_case_subprocess,
)

SUITES = ("kernels", "e2e")
# not in "all": minutes of real training (--suite e2e-real) and the ranked-data suite
# (--suite ranked: K-way rows against expanded pairs)
EXTRA_SUITES = {"e2e-real": "e2e_real", "ranked": "ranked"}
TOOLS = {"compile-report": "benchmarks.compile_report", "gpu": "benchmarks.gpu",
         "bundle": "benchmarks.bundle"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure a suite")
    run.add_argument("--suite", choices=(*SUITES, *EXTRA_SUITES, "all"), default="all")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--quick", action="store_true", help="short run (< 3 min on 2 CPU cores)")
    run.add_argument("--smoke", action="store_true",
                     help="the smallest sizes, 2 repetitions (CI; takes precedence over --quick)")
    run.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    run.add_argument("--warmup", type=int, default=None, help="untimed calls before measuring")
    run.add_argument("--threads", type=int, default=None, help="torch threads per case")
    run.add_argument("--only", default=None,
                     help="only cases whose label contains this text (e.g. 'hidden' or 'fastpo'; "
                          "'a|b': either)")
    run.add_argument("--profile", action="store_true",
                     help="write a torch.profiler trace of one call per case")
    run.add_argument("--out", type=Path, default=None, help="output folder")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--in-process", action="store_true",
                     help="measure every case in this process instead of a fresh one each "
                          "(faster start; memory numbers then include what earlier cases left)")
    rep = sub.add_parser("report", help="markdown tables of a results.json")
    rep.add_argument("results", type=Path)
    plot = sub.add_parser("plot", help="PNG plots of a results.json")
    plot.add_argument("results", type=Path)
    plot.add_argument("--out", type=Path, default=None)
    for name, text in (("compile-report", "AOT compile gates for sm_80/sm_90 (no GPU needed)"),
                       ("gpu", "the one-command GPU report"),
                       ("bundle", "the carry bundle of wheels for a GPU machine without network")):
        tool = sub.add_parser(name, help=text, add_help=False)
        tool.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("_worker", help=argparse.SUPPRESS)
    sub.add_parser("_batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if getattr(args, "reps", None) is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _worker() -> int:
    spec = CaseSpec.from_json(sys.stdin.read())
    result = run_case(spec)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result.to_row()), flush=True)
    return 0


def collect_cases(args: argparse.Namespace, out_dir: Path) -> list[CaseSpec]:
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    suites = SUITES if args.suite == "all" else (EXTRA_SUITES.get(args.suite, args.suite),)
    specs: list[CaseSpec] = []
    for name in suites:
        module = importlib.import_module(f"benchmarks.suites.{name}")
        specs.extend(module.cases(args.device, size))
    for spec in specs:
        if args.reps is not None:
            spec.reps = args.reps
        if args.warmup is not None:
            spec.warmup = args.warmup
        if args.threads is not None:
            spec.threads = args.threads
        if args.profile:
            spec.profile_dir = str(out_dir / "traces")
    if args.only:
        texts = args.only.split("|")
        specs = [s for s in specs if any(text in s.label() for text in texts)]
    return specs


def _write(out_dir: Path, machine: dict, results: list[Result], argv: list[str]) -> Path:
    rows = [r.to_row() for r in results]
    path = out_dir / "results.json"
    path.write_text(json.dumps({"machine": machine, "command": argv, "rows": rows}, indent=1))
    columns = ["suite", "family", "impl", "params", "device", "status", "median_s", "min_s",
               "max_s", "iqr_s", "peak_mem_bytes", "mem_method", "tokens_per_s",
               "bandwidth_gb_s", "check", "threads", "reason", "notes"]
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "params": json.dumps(row["params"], sort_keys=True)})
    return path


def run(args: argparse.Namespace, argv: list[str]) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO_ROOT / "benchmarks" / "out" / f"{args.suite}-{args.device}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: {machine['cpu']} ({machine['cpu_cores_available']} cores), "
          f"GPU: {machine['gpu'] or 'none'}; torch {machine['version_torch']}", flush=True)
    if args.device == "cuda" and machine["gpu"] is None:
        print("error: --device cuda but no CUDA device is present", file=sys.stderr)
        return 2
    specs = collect_cases(args, out_dir)
    if not specs:
        print("error: no case matches", file=sys.stderr)
        return 2
    results: list[Result] = []
    start = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        if spec.skip_reason:
            result = Result(suite=spec.suite, family=spec.family, impl=spec.impl,
                            params=spec.params, device=spec.device, status="skipped",
                            reason=spec.skip_reason)
        elif args.in_process:
            result = run_case(spec)
        else:
            result = run_case_subprocess(spec)
        results.append(result)
        print(f"[{i}/{len(specs)} {time.perf_counter() - start:6.1f}s] "
              f"{report.one_line(result)}", flush=True)
    machine["load_average_at_end"] = ([round(x, 2) for x in os.getloadavg()]
                                      if hasattr(os, "getloadavg") else None)
    path = _write(out_dir, machine, results, argv)
    print()
    print(report.markdown(json.loads(path.read_text())))
    if not args.no_plots:
        from benchmarks import plot

        for png in plot.plot_results(path, out_dir):
            print(f"plot: {png}")
    print(f"results: {path} ({time.perf_counter() - start:.0f} s)")
    failed = [r for r in results if r.status == "error"]
    if failed:
        print(f"{len(failed)} case(s) failed", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:  # own argument parsers
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    args = _parse(argv)
    if args.command == "_worker":
        return _worker()
    if args.command == "_batch":
        job = json.loads(sys.stdin.read())
        run_batch([CaseSpec(**s) for s in job["specs"]], job["deadline_s"])
        return 0
    if args.command == "run":
        return run(args, argv)
    if args.command == "report":
        print(report.markdown(json.loads(args.results.read_text())))
        return 0
    from benchmarks import plot

    for png in plot.plot_results(args.results, args.out or args.results.parent):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
