"""The benchmark suite runs end to end at its smallest sizes and writes well-formed results.

Only structure is asserted (rows, fields, files), never timings or memory figures. The one
numeric check is that implementations of the same workload compute the same loss, which is what
makes their timings comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks import harness, plot, report
from benchmarks.suites import e2e, kernels

REPO = Path(__file__).resolve().parent.parent
RESULT_FIELDS = {"suite", "family", "impl", "params", "device", "status", "reason", "times_s",
                 "median_s", "min_s", "max_s", "iqr_s", "peak_mem_bytes", "mem_method",
                 "tokens", "tokens_per_s", "bandwidth_gb_s", "check", "threads", "notes",
                 "profile_trace", "extra"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--suite", "all", "--device", "cpu",
         "--quick", "--smoke", "--in-process", "--profile", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc, out


def test_smoke_run_writes_results(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    machine = data["machine"]
    for key in ("cpu", "cpu_cores_available", "torch_threads", "memory_gib", "version_torch",
                "version_trl", "fastpo_backends"):
        assert key in machine, key
    rows = data["rows"]
    expected = [(s.suite, s.family, s.impl, json.dumps(s.params, sort_keys=True))
                for s in kernels.cases("cpu", "smoke") + e2e.cases("cpu", "smoke")]
    got = [(r["suite"], r["family"], r["impl"], json.dumps(r["params"], sort_keys=True))
           for r in rows]
    assert got == expected
    for row in rows:
        assert set(row) == RESULT_FIELDS
        assert row["status"] in ("ok", "skipped"), (row["impl"], row["reason"])
        if row["status"] == "skipped":
            assert row["reason"], row
            continue
        assert len(row["times_s"]) >= 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert isinstance(row["peak_mem_bytes"], int) and row["peak_mem_bytes"] >= 0
        assert row["mem_method"] in ("rss-hwm", "rss-sampled-1ms")
        if row["family"] == "copy":  # the yardstick: bytes, no tokens
            assert row["bandwidth_gb_s"] > 0 and row["extra"]["touched_bytes"] > 0
        else:
            assert row["tokens"] and row["tokens_per_s"] > 0
        assert row["profile_trace"] and Path(row["profile_trace"]).is_file()
    # GPU-only implementations are recorded as skipped with their reason, never silently dropped
    skipped = {r["impl"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "CUDA" in skipped["liger_ce"] and "CUDA" in skipped["cce_exact"]
    assert "CUDA" in skipped["cce_filtered"]
    # every fastpo implementation really ran
    for row in rows:
        if row["impl"].startswith(("fastpo", "trl+fastpo")):
            assert row["status"] == "ok", (row["impl"], row["reason"])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    assert "ratios vs `torch`" in proc.stdout and "ratios vs `trl`" in proc.stdout
    # each fastpo layout row: the FLOPs it saves against padded rows, beside its speed-up
    shared = next(r for r in rows if r["impl"] == "fastpo_shared")["extra"]
    assert shared["attention_pairs"] < shared["padded_attention_pairs"]
    assert "| fastpo_shared | " in proc.stdout.split("attention-FLOP ratio")[1]


def test_smoke_implementations_agree(smoke_run):
    _proc, out = smoke_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    checks = defaultdict(list)
    for key, group in report.group_rows(rows).items():
        if key[1] == "copy":  # the yardstick: one implementation, nothing to agree with
            continue
        for row in group:
            if row["status"] == "ok":
                checks[key].append((row["impl"], row["check"]))
    assert checks
    for key, values in checks.items():
        assert len(values) >= 2, key
        first = values[0][1]
        for impl, value in values:
            assert value == pytest.approx(first, rel=1e-3, abs=1e-4), (key, impl, values)


def test_fresh_process_case_sees_the_gradient_buffer():
    """A case in its own process; its peak memory includes the [N, V] logits gradient."""
    params = {"B": 2, "T": 64, "V": 30000, "dtype": "fp32", "mode": "fwd+bwd"}
    spec = harness.CaseSpec(suite="kernels", family="logits", impl="fastpo", params=params,
                            reps=2)
    result = harness.run_case_subprocess(spec)
    assert result.status == "ok", result.reason
    assert result.mem_method in ("rss-hwm", "rss-sampled-1ms"), result
    assert len(result.times_s) == 2, result
    grad_bytes = 2 * 64 * 30000 * 4
    assert result.peak_mem_bytes >= 0.9 * grad_bytes, (result.peak_mem_bytes, grad_bytes)


def test_memory_is_read_pinned_and_times_run_on_a_users_allocator():
    """The worker starts with glibc's mmap threshold pinned low: a 1 MiB block is its own
    mapping (``mallinfo2().hblks``), and the memory reading sees a call's 16 MiB buffer as
    growth. ``measure`` then releases the allocator to a user's settings for the timed calls:
    the same block comes from the heap, where freed memory is reused rather than unmapped and
    faulted in again on every call."""
    env = harness.worker_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and "TRITON_INTERPRET" not in env
    code = (
        "import ctypes, ctypes.util, json, torch\n"
        "from benchmarks import harness\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks',\n"
        "                'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc.mallinfo2.restype = Info\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def mapped(size):\n"
        "    before = libc.mallinfo2().hblks\n"
        "    block = libc.malloc(size)\n"
        "    grew = libc.mallinfo2().hblks - before\n"
        "    libc.free(block)\n"
        "    return grew\n"
        "pinned = mapped(2**20)\n"
        "out = harness.measure(harness.Workload(lambda: torch.ones(4 * 2**20).sum()),\n"
        "                      device='cpu', warmup=1, reps=2)\n"
        "print(json.dumps([pinned, out['peak_mem_bytes'], out['mem_method'], mapped(2**20),\n"
        "                  mapped(48 * 2**20)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pinned, peak, method, released, large = json.loads(proc.stdout.strip().splitlines()[-1])
    assert method in ("rss-hwm", "rss-sampled-1ms"), method
    assert pinned == 1 and peak >= 0.9 * 16 * 2**20, (pinned, peak)
    assert released == 0 and large == 1  # heap below 32 MiB, as a user's process settles


def test_summarize_and_errors():
    stats = harness.summarize([3.0, 1.0, 2.0, 10.0])
    assert stats["median_s"] == 2.5 and stats["min_s"] == 1.0 and stats["max_s"] == 10.0
    with pytest.raises(ValueError, match="at least one"):
        harness.summarize([])
    bad = harness.CaseSpec(suite="kernels", family="nope", impl="fastpo", params={})
    result = harness.run_case(bad)
    assert result.status == "error" and "unknown kernels family" in result.reason


def test_plots_from_a_sweep(tmp_path):
    rows = []
    for v in (1000, 2000, 4000):
        for impl, t in (("torch", 2.0), ("fastpo", 1.0)):
            rows.append(harness.Result(
                suite="kernels", family="logits", impl=impl, device="cpu", status="ok",
                params={"B": 2, "T": 8, "V": v, "dtype": "fp32", "mode": "fwd+bwd"},
                times_s=[t], median_s=t * v / 1000, min_s=t, max_s=t, iqr_s=0.0,
                peak_mem_bytes=v * 1000).to_row())
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": {"cpu": "test"}, "rows": rows}))
    pngs = plot.plot_results(path, tmp_path / "plots")
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000 and "vs_V" in pngs[0].name
    text = report.markdown(json.loads(path.read_text()))
    assert text.count("| fastpo |") == 3 and "0.50" in text


def test_fused_linear_benchmark_runs_and_agrees(tmp_path):
    """``benchmarks.linear_logprobs`` at a toy shape: every row, the same loss, the columns."""
    from benchmarks import linear_logprobs

    out = tmp_path / "linear.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.linear_logprobs", "--batch", "2", "--seq", "24",
         "--hidden", "16", "--vocab", "301", "--impls", "naive,liger,fastpo,matmul", "--reps", "1",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["naive", "liger", "fastpo", "matmul"]
    assert all("error" not in r for r in rows), rows
    losses = [r["check"] for r in rows]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and \
        losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert "| working MB |" in proc.stdout and "| % of matmul |" in proc.stdout
    assert "| matmul |" in proc.stdout and rows[3]["tokens_per_s"] > 0
    # gradients: hidden [2·24, 16] + weight [301, 16], fp32
    assert linear_logprobs.gradient_bytes(rows[0]) == (2 * 24 + 301) * 16 * 4
