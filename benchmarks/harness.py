"""Shared timing and peak-memory harness for every benchmark suite.

A case (:class:`CaseSpec`) names a suite, a family of workloads, one implementation and its
parameters. The suite module builds a :class:`Workload` from it: a zero-argument callable that does
one repetition (e.g. forward + backward) and may return a scalar so that implementations can be
checked against each other. :func:`run_case` then

1. calls it ``warmup`` times (lazy initialisation, compilation, allocator growth);
2. measures the peak extra memory of one more call:
   - CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call;
   - CPU: growth of the resident set over its value before the call, read from the kernel's
     high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; sampled every
     millisecond where that is not allowed). Each CPU case runs in a fresh process
     (:func:`run_case_subprocess`) with glibc's mmap threshold pinned low, so freed buffers go
     back to the OS and the resident set tracks live memory;
3. times ``reps`` further calls (device synchronised) and keeps all of them, with the median and
   the spread. Before them the CPU allocator is released to the state a user's process reaches
   (:func:`release_allocator`): with the threshold pinned low, every large buffer would be a
   fresh mapping whose pages are faulted in and zeroed on each call — ~2 s of a 7.5 s DPO step
   on the 2-core CPU, a cost no user pays, which the timings carried until 2026-12-07 and which
   shrank every ratio towards 1.

The machine and library versions go with every result file (:func:`machine_info`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "FASTPO_BENCH_RESULT "
# Every allocation of 128 KiB or more gets its own mapping and is unmapped when freed, so the
# resident set tracks live memory (glibc otherwise raises the threshold after the first frees).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# glibc's mallopt parameters (malloc.h), and where its adaptive threshold settles in a process
# that frees large buffers: the mmap threshold at its ceiling (32 MiB on 64-bit), trimming at
# twice that.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_MMAP_THRESHOLD = 32 * 2**20


class SkipCase(Exception):
    """The case cannot run here (missing optional library, no GPU, ...); the reason is recorded."""


# The rivals a benchmark may lack (their import names): only these give a "not installed" skip.
# fastpo, torch, triton or transformers missing, or any import error *inside* a rival (a torch
# or triton it cannot load), is an error row: a skip would hide a broken install.
OPTIONAL_PACKAGES = ("liger_kernel", "cut_cross_entropy", "trl", "quack", "flash_attn",
                     "deepspeed")


def missing_optional(exc: ImportError) -> str | None:
    """The optional rival whose own absence ``exc`` reports, else None: a
    ``ModuleNotFoundError`` whose missing module is one of :data:`OPTIONAL_PACKAGES` (or a
    submodule of one). Any other import error, including one raised while a rival that is
    installed imports its own dependencies, is not a missing rival."""
    if type(exc) is not ModuleNotFoundError or not exc.name:
        return None
    root = exc.name.split(".")[0]
    return root if root in OPTIONAL_PACKAGES else None


def skip_if_unavailable(spec: CaseSpec, cuda_only: dict[str, str]) -> None:
    """SkipCase for a CUDA case without a CUDA device, or a CUDA-only implementation (``impl`` →
    reason, in ``cuda_only``) asked for on another device."""
    import torch

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipCase("no CUDA device")
    if spec.impl in cuda_only and not spec.device.startswith("cuda"):
        raise SkipCase(cuda_only[spec.impl])


@dataclass
class CaseSpec:
    """One implementation of one workload at one size."""

    suite: str
    family: str
    impl: str
    params: dict[str, Any]
    device: str = "cpu"
    warmup: int = 1
    reps: int = 5
    threads: int | None = None
    profile_dir: str | None = None
    timeout_s: float = 1800.0
    skip_reason: str | None = None  # known before running (e.g. a GPU-only implementation on CPU)

    def label(self) -> str:
        sizes = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.suite}/{self.family}/{self.impl}[{sizes}]"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseSpec:
        return cls(**json.loads(text))


@dataclass
class Workload:
    """What a suite builds for a case: one repetition, and how much work it is."""

    fn: Callable[[], Any]
    tokens: int | None = None
    bytes_moved: int | None = None
    notes: str = ""
    # Untimed, before every call (e.g. restore inputs that an in-place backward overwrote).
    setup_each: Callable[[], None] | None = None
    # Figures of the workload a suite's summary reads back (e.g. the FLOPs of a batch layout).
    extra: dict[str, Any] = field(default_factory=dict)

    def call(self) -> Any:
        if self.setup_each is not None:
            self.setup_each()
        return self.fn()


@dataclass
class Result:
    """One measured (or skipped, or failed) case."""

    suite: str
    family: str
    impl: str
    params: dict[str, Any]
    device: str
    status: str  # "ok", "skipped" or "error"
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    iqr_s: float | None = None
    peak_mem_bytes: int | None = None
    mem_method: str = ""
    tokens: int | None = None
    tokens_per_s: float | None = None
    bandwidth_gb_s: float | None = None
    check: float | None = None
    threads: int | None = None
    notes: str = ""
    profile_trace: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- statistics


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min, max and inter-quartile range of repetition times (seconds)."""
    if not times:
        raise ValueError("summarize() needs at least one time")
    ordered = sorted(times)
    if len(ordered) >= 4:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = ordered[-1] - ordered[0]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "iqr_s": iqr}


# --------------------------------------------------------------------------- memory


def _status_kib(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def current_rss_bytes() -> int:
    """Resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def release_allocator() -> bool:
    """Give glibc's allocator the settings it reaches by itself in a user's process once large
    buffers have been freed (mmap threshold 32 MiB, trim threshold 64 MiB), undoing the low
    threshold the measuring process starts with (:data:`_MALLOC_ENV`): freed blocks are reused
    instead of unmapped and faulted in again. False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _USER_MMAP_THRESHOLD))
    return bool(mallopt(_M_TRIM_THRESHOLD, 2 * _USER_MMAP_THRESHOLD)) and ok


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class CpuPeakMemory:
    """Peak resident-set growth over the block, in bytes (``self.extra``)."""

    def __init__(self) -> None:
        self.extra = 0
        self.method = ""
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CpuPeakMemory:
        gc.collect()
        self._baseline = current_rss_bytes()
        if _reset_high_water_mark():
            self.method = "rss-hwm"
        else:
            self.method = "rss-sampled-1ms"
            self._sampled = self._baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, current_rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, current_rss_bytes())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        self.extra = max(0, peak - self._baseline)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value.detach().float().item()) if hasattr(value, "detach") else float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def measure(workload: Workload, *, device: str, warmup: int, reps: int,
            profile_path: str | None = None) -> dict[str, Any]:
    """Warm up, measure the peak memory of one call, then time ``reps`` calls (on CPU with the
    allocator released to a user's settings first: :func:`release_allocator`)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        workload.call()
    _synchronize(device)
    if workload.setup_each is not None:
        workload.setup_each()
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        check = workload.fn()
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated() - before, "cuda-allocator"
    else:
        with CpuPeakMemory() as mem:
            check = workload.fn()
        peak, method = mem.extra, mem.method
        release_allocator()
    check = _scalar(check)
    times = []
    for _ in range(reps):
        if workload.setup_each is not None:
            workload.setup_each()
        _synchronize(device)
        start = time.perf_counter()
        workload.fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"times_s": times, **summarize(times), "peak_mem_bytes": int(peak),
                           "mem_method": method, "check": check}
    if workload.tokens:
        out["tokens_per_s"] = workload.tokens / out["median_s"]
    if workload.bytes_moved:
        out["bandwidth_gb_s"] = workload.bytes_moved / out["median_s"] / 1e9
    if profile_path:
        out["profile_trace"] = _profile(workload, device, profile_path)
    return out


def _profile(workload: Workload, device: str, path: str) -> str:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if workload.setup_each is not None:
        workload.setup_each()
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        workload.fn()
        _synchronize(device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)
    return path


# --------------------------------------------------------------------------- inputs


def masked_labels(batch: int, seq: int, vocab: int, *, prompt: int | tuple[int, int],
                  pad: int | tuple[int, int], seed: int = 0) -> Any:
    """Random shifted labels ``[batch, seq]`` (int64, CPU) shaped like a preference batch: each
    row's prompt prefix and trailing padding are ``-100``, the rest a random token.

    ``prompt`` / ``pad``: a length for every row, or a ``(low, high)`` range each row draws its
    length from (``torch.randint``: ``high`` excluded), prompt first, from a generator seeded
    with ``seed``, so that one call always gives the same labels.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def length(spec: int | tuple[int, int]) -> int:
        if isinstance(spec, int):
            return spec
        return int(torch.randint(spec[0], spec[1], (1,), generator=gen))

    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    for row in range(batch):
        labels[row, :length(prompt)] = -100
        tail = length(pad)
        if tail:
            labels[row, seq - tail:] = -100
    return labels


# --------------------------------------------------------------------------- running cases


def _trace_name(spec: CaseSpec) -> str:
    sizes = "_".join(f"{k}{v}" for k, v in spec.params.items())
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{spec.suite}_{spec.family}_{spec.impl}_{sizes}.json")


def run_case(spec: CaseSpec) -> Result:
    """Build and measure one case in this process (the worker's job)."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    base = {"suite": spec.suite, "family": spec.family, "impl": spec.impl, "params": spec.params,
            "device": spec.device, "threads": torch.get_num_threads()}
    try:
        module = importlib.import_module(f"benchmarks.suites.{spec.suite}")
        workload = module.build(spec)
        profile_path = (str(Path(spec.profile_dir) / _trace_name(spec))
                        if spec.profile_dir else None)
        measured = measure(workload, device=spec.device, warmup=spec.warmup, reps=spec.reps,
                           profile_path=profile_path)
    except SkipCase as exc:
        return Result(**base, status="skipped", reason=str(exc))
    except ImportError as exc:
        rival = missing_optional(exc)
        if rival is None:
            return Result(**base, status="error",
                          reason=f"import failed ({type(exc).__name__}): {exc}"[:500])
        return Result(**base, status="skipped", reason=f"not installed: {rival}")
    except Exception as exc:
        return Result(**base, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    return Result(**base, status="ok", tokens=workload.tokens, notes=workload.notes,
                  extra=workload.extra, **measured)


def worker_env() -> dict[str, str]:
    """Environment of a measuring process: real kernels (no Triton interpreter), glibc's mmap
    threshold pinned low for the memory reading (:func:`measure` releases it before timing)."""
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith("MALLOC_")}
    env.update(_MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_case_subprocess(spec: CaseSpec) -> Result:
    """Run one case in a fresh Python process and collect its result."""
    base = {"suite": spec.suite, "family": spec.family, "impl": spec.impl, "params": spec.params,
            "device": spec.device}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "_worker"], input=spec.to_json(), text=True,
            capture_output=True, cwd=REPO_ROOT, env=worker_env(), timeout=spec.timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Result(**base, status="error", reason=f"timed out after {spec.timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return Result(**json.loads(line[len(RESULT_MARKER):]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    reason = f"worker exited with status {proc.returncode}"
    if proc.returncode in (-9, 137):
        reason += " (killed: out of memory?)"
    return Result(**base, status="error", reason=f"{reason}: {' | '.join(tail)}"[:500])


BATCH_MIN_START_S = 20.0  # a case that would start with less time left is recorded as skipped


def run_batch(specs: list[CaseSpec], deadline_s: float) -> None:
    """The batch worker's job: the cases one after another in this process, each result printed
    as soon as it is known (``RESULT_MARKER`` + JSON), none started with less than
    :data:`BATCH_MIN_START_S` left before ``deadline_s`` seconds from now."""
    import torch

    start = time.perf_counter()
    for spec in specs:
        left = deadline_s - (time.perf_counter() - start)
        if left < BATCH_MIN_START_S:
            result = Result(suite=spec.suite, family=spec.family, impl=spec.impl,
                            params=spec.params, device=spec.device, status="skipped",
                            reason=f"time budget spent ({left:.0f} s left)")
        else:
            result = run_case(spec)
        print(RESULT_MARKER + json.dumps(result.to_row()), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stream_batch(specs: list[CaseSpec], *, timeout_s: float, log_path: Path | None = None,
                 on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run ``specs`` in ONE fresh process (``python -m benchmarks _batch``: one interpreter and
    device start for a section, not one per case), calling ``on_result`` as each result arrives.
    The process is killed after ``timeout_s``; the cases it had not reported become error rows
    saying so, never an exception. Its stderr goes to ``log_path`` (else discarded)."""
    import queue

    payload = json.dumps({"specs": [dataclasses.asdict(s) for s in specs],
                          "deadline_s": timeout_s})
    err = open(log_path, "a") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "_batch"], cwd=REPO_ROOT,
                            env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.stdin is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    results: list[Result] = []
    deadline = time.perf_counter() + timeout_s
    why = ""
    while len(results) < len(specs):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            why = f"timed out: the section's worker was killed after {timeout_s:.0f} s"
            break
        if line is None:
            break
        if line.startswith(RESULT_MARKER):
            result = Result(**json.loads(line[len(RESULT_MARKER):]))
            results.append(result)
            if on_result is not None:
                on_result(result)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    if err is not subprocess.DEVNULL:
        err.close()
    if not why:
        why = f"worker exited with status {code} before this case"
        if code in (-9, 137):
            why += " (killed: out of memory?)"
        if log_path:
            why += f"; see {log_path}"
    for spec in specs[len(results):]:
        result = Result(suite=spec.suite, family=spec.family, impl=spec.impl, params=spec.params,
                        device=spec.device, status="error", reason=why)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                          re.MULTILINE)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if any) and the versions of everything measured."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine slows every case; recorded so that numbers can be judged
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for name in ("torch", "triton", "transformers", "trl", "liger-kernel", "deepspeed", "peft",
                 "cut-cross-entropy", "fastpo"):
        info[f"version_{name}"] = _version(name)
    try:
        import fastpo.kernels as kernels

        info["fastpo_backends"] = kernels.backend_info()
    except Exception as exc:
        info["fastpo_backends"] = f"unavailable: {exc}"
    return info
