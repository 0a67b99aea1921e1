"""Compile gates: every Triton kernel compiled ahead of time for sm_80 and sm_90, no GPU needed.

    python -m benchmarks compile-report [--arch sm_80,sm_90] [--only TEXT] [--json FILE]

Each entry of :data:`KERNELS` is one kernel with the arguments of a typical launch at the anchor
shape (Llama-3 vocabulary 128256, hidden 4096, 32k tokens) per dtype variant and architecture
(block sizes, warps and stages come from the launchers' own helpers, called with the target
architecture, so the gate compiles what a launch on that GPU would build). The arguments go
through Triton's own launch-time binder (``create_function_from_signature`` + ``_pack_args``, what
``JITFunction.run`` does before it compiles), so the kernel is compiled with exactly the
specialization a launch applies: ``tt.divisibility = 16`` on 16-byte aligned pointers and on
integer arguments divisible by 16, integer arguments equal to 1 folded into constants. Without
it the figures would be those of a kernel no launch ever builds (pessimistic: scalar loads,
spills). The cubin is then read with the tools that ship inside the Triton wheel:
``cuobjdump -res-usage`` (registers, stack, local and static shared memory) and
``cuobjdump -sass`` (warpgroup MMA ``HGMMA``, warp MMA ``HMMA``, width of global loads/stores);
dynamic shared memory comes from the compiled kernel's metadata.

Gates (:func:`gate_failures`): 0 bytes of stack and local memory (no spills); static + dynamic
shared memory within the architecture's per-block limit (sm_80 163 KB, sm_90 227 KB); ``HGMMA``
in every sm_90 kernel whose ``tl.dot`` runs on half-precision or tf32 operands; 128-bit global
loads in the streaming kernels (those that read logits row by row).

Adding a kernel: append one :class:`KernelCase` to :data:`KERNELS`. The test
(``tests/kernels/test_compile_gates.py``) fails when a ``@triton.jit`` kernel under ``kernels/``
is in neither :data:`KERNELS` nor :data:`DEVICE_FUNCTIONS`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
# per-block shared memory a kernel may use (opt-in maximum): A100 163 KB, H100 227 KB
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "tf32": torch.float32}  # tf32: fp32 tensors with allow_tf32 (dot kernels only)
KERNEL_MODULES = ("fastpo.kernels.logprobs_triton", "fastpo.kernels.linear_logprobs_triton")
# @triton.jit functions that are called from kernels, never launched
DEVICE_FUNCTIONS = {"_row_offset", "_logit_tile", "_token_tile", "_tanh"}
# the anchor shape of every launch below
TOKENS, SEQ, VOCAB, HIDDEN = 32768, 1024, 128256, 4096
IGNORE = -100


class Pointer:
    """A tensor argument as the launch binder sees it: a dtype and a 16-byte aligned address."""

    def __init__(self, dtype: torch.dtype, address: int = 1 << 20) -> None:
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def _ptr(dtype: torch.dtype) -> Pointer:
    return Pointer(dtype)


F32, I64 = _ptr(torch.float32), _ptr(torch.int64)


@dataclass(frozen=True)
class KernelCase:
    """One kernel: where it lives, what it is, and a typical launch per dtype variant."""

    module: str
    kernel: str
    kind: str  # "stream" (reads rows of logits) or "dot" (tl.dot tiles)
    # (variant, arch) -> (args, options)
    launch: Callable[[str, str], tuple[dict[str, Any], dict[str, Any]]]
    variants: tuple[str, ...] = ("fp32", "bf16", "fp16")
    note: str = ""
    tag: str = ""  # tells apart two launches of one kernel

    @property
    def label(self) -> str:
        name = f"{self.module.rsplit('.', 1)[-1]}.{self.kernel}"
        return f"{name} [{self.tag}]" if self.tag else name


# --------------------------------------------------------------------------- launches


def _logits_launch(variant: str, *, backward: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """From logits: a shifted [B, T, V] view of 32 × 1024 × 128256 logits (vocab stride 1)."""
    from fastpo.kernels import logprobs_triton as m

    dtype = DTYPES[variant]
    block = m._block(VOCAB)
    rows = {"vocab": VOCAB, "rows_per_batch": SEQ, "stride_b": (SEQ + 1) * VOCAB,
            "stride_t": VOCAB, "ignore_index": IGNORE, "temperature": 1.0}
    consts = {"BLOCK_V": block, "ACC": m._acc_dtype(dtype)}
    options = {"num_warps": 8 if block >= 2048 else 4}
    if backward:
        args = {"grad_ptr": F32, "logits_ptr": _ptr(dtype), "labels_ptr": I64, "lse_ptr": F32,
                "out_ptr": _ptr(dtype), "out_stride_b": SEQ * VOCAB, "out_stride_t": VOCAB}
    else:
        args = {"logits_ptr": _ptr(dtype), "labels_ptr": I64, "logps_ptr": F32, "lse_ptr": F32,
                "logits_sum_ptr": F32, "WITH_LOGITS_SUM": False}
    return {**args, **rows, **consts}, options


def _gemm_rows_launch(variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """From logits as the gemm design of the fused linear op calls it in its backward: an fp32
    ``[C, S]`` logits tile (C 2048 tokens, S 16384 vocab entries: its plan at the anchor) and
    the softmax gradient written into a separate buffer in the GEMM operand dtype."""
    from fastpo.kernels import logprobs_triton as m
    from fastpo.kernels.linear_logprobs_cost import gemm_plan

    chunk, width = gemm_plan(TOKENS, HIDDEN, VOCAB, DTYPES[variant].itemsize)
    block = m._block(width)
    args = {"grad_ptr": F32, "logits_ptr": F32, "labels_ptr": I64, "lse_ptr": F32,
            "out_ptr": _ptr(DTYPES[variant]), "vocab": width, "rows_per_batch": chunk,
            "stride_b": 0, "stride_t": width, "out_stride_b": 0, "out_stride_t": width,
            "ignore_index": IGNORE, "temperature": 1.0, "BLOCK_V": block,
            "ACC": m._acc_dtype(torch.float32)}
    return args, {"num_warps": 8 if block >= 2048 else 4}


def _linear_common(variant: str, arch: str, kernel: str,
                   softcap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    from fastpo.kernels import linear_logprobs_triton as m
    from fastpo.kernels.linear_logprobs_launch import launch_config

    dtype = DTYPES[variant]
    precision = "tf32" if variant == "tf32" else "ieee"
    block_n, block_v, block_h, warps, stages = launch_config(kernel, dtype, precision,
                                                             ARCHS[arch], softcap)
    args = {"h_ptr": _ptr(dtype), "w_ptr": _ptr(dtype), "b_ptr": _ptr(dtype), "labels_ptr": I64,
            "order_ptr": I64, "count_ptr": I64, "hidden": HIDDEN, "stride_h": HIDDEN,
            "stride_w": HIDDEN, "inv_temperature": 1 / 30 if softcap else 1.0,
            "cap_scale": 30.0 if softcap else 1.0, "HAS_BIAS": False, "HAS_SOFTCAP": softcap,
            "DOT": m._TL_DTYPES[dtype], "PRECISION": precision,
            "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h}
    return args, {"num_warps": warps, "num_stages": stages}


def _linear_fwd_launch(variant: str, arch: str,
                       softcap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fused linear forward: 32k tokens, two vocab splits (132 SMs, 256 token tiles)."""
    args, options = _linear_common(variant, arch, "forward", softcap)
    v_tiles = -(-VOCAB // args["BLOCK_V"])
    args.update(part_max_ptr=F32, part_sum_ptr=F32, part_label_ptr=F32, n_rows=TOKENS,
                vocab=VOCAB, tiles_per_split=-(-v_tiles // 2))
    return args, options


def _linear_bwd_launch(variant: str, arch: str,
                       softcap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fused linear backward: one vocab chunk (fp32 accumulator of 256 MiB) past the first."""
    from fastpo.kernels import linear_logprobs_triton as m

    args, options = _linear_common(variant, arch, "backward", softcap)
    chunk = VOCAB if variant in ("fp32", "tf32") else m.weight_grad_chunk(VOCAB, HIDDEN)
    args.update(grad_ptr=F32, lse_ptr=F32, grad_h_ptr=F32, grad_w_ptr=F32, grad_b_ptr=F32,
                vocab=chunk, col0=0 if chunk == VOCAB else chunk, NEED_H=True, NEED_W=True,
                NEED_B=False)
    return args, options


DOT_VARIANTS = ("fp32", "tf32", "bf16", "fp16")
KERNELS: list[KernelCase] = [
    KernelCase("fastpo.kernels.logprobs_triton", "_logps_forward_kernel", "stream",
               lambda v, a: _logits_launch(v, backward=False)),
    KernelCase("fastpo.kernels.logprobs_triton", "_logps_backward_kernel", "stream",
               lambda v, a: _logits_launch(v, backward=True)),
    # the gemm design's softmax gradient: fp32 logits in, the GEMM operand dtype out
    KernelCase("fastpo.kernels.logprobs_triton", "_logps_backward_kernel", "stream",
               lambda v, a: _gemm_rows_launch(v), ("bf16", "fp16"),
               tag="fp32 logits, gemm"),
    KernelCase("fastpo.kernels.linear_logprobs_triton", "_linear_logps_fwd_kernel", "dot",
               _linear_fwd_launch, DOT_VARIANTS),
    KernelCase("fastpo.kernels.linear_logprobs_triton", "_linear_logps_bwd_kernel", "dot",
               _linear_bwd_launch, DOT_VARIANTS),
    # the soft-capped head (HAS_SOFTCAP, Gemma-2: c = 30, T = 1): tanh on the tile, its slope
    KernelCase("fastpo.kernels.linear_logprobs_triton", "_linear_logps_fwd_kernel", "dot",
               lambda v, a: _linear_fwd_launch(v, a, softcap=True), DOT_VARIANTS,
               tag="softcap"),
    KernelCase("fastpo.kernels.linear_logprobs_triton", "_linear_logps_bwd_kernel", "dot",
               lambda v, a: _linear_bwd_launch(v, a, softcap=True), DOT_VARIANTS,
               tag="softcap"),
]
# Gates that fail today, (label, variant, arch) -> why. The test expects exactly these to fail
# (strict xfail): a fix shows up as an unexpected pass, and its entry is then removed. None today.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


# --------------------------------------------------------------------------- compiling


def triton_tool(name: str) -> Path:
    """Path of a CUDA tool bundled in the Triton wheel (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"Triton's bundled {name} is missing: {path} (the triton wheel "
                                f"ships it; reinstall triton)")
    return path


def jit_kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` function in the kernel modules, by ``module.name`` label (compiled or,
    under ``TRITON_INTERPRET=1``, interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, (JITFunction, InterpretedFunction)) and \
                    getattr(value.fn, "__module__", None) == module.__name__:
                found[f"{name.rsplit('.', 1)[-1]}.{attr}"] = value
    return found


def _launch_args(case: KernelCase, variant: str, arch: str, fn: Any) -> tuple[dict, dict]:
    args, options = case.launch(variant, arch)
    names = list(inspect.signature(fn.fn).parameters)
    missing = [n for n in names if n not in args]
    extra = [n for n in args if n not in names]
    if missing or extra:
        raise ValueError(f"{case.label}: the launch in benchmarks/compile_report.py does not "
                         f"match the kernel's parameters (missing {missing}, unknown {extra})")
    return args, options


def specialize(case: KernelCase, variant: str, arch: str) -> tuple[Any, ...]:
    """``(fn, target, signature, constexprs, attrs, options)`` of a typical launch on ``arch``:
    what ``JITFunction.run`` computes from the launch arguments before it compiles."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(importlib.import_module(case.module), case.kernel)
    args, options = _launch_args(case, variant, arch, fn)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{case.label} is {type(fn).__name__}, not a JITFunction: unset "
                           f"TRITON_INTERPRET to compile for a GPU")
    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**args, **options}
    bound, specialization, opts = binder(**kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                       opts)
    return fn, target, signature, constexprs, attrs, opts


def compile_kernel(case: KernelCase, variant: str, arch: str):
    """``triton.compile`` of one kernel as a launch on ``arch`` would build it."""
    import triton
    from triton.compiler import ASTSource

    fn, target, signature, constexprs, attrs, opts = specialize(case, variant, arch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=opts.__dict__)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _width(op: str) -> int:
    """Bits per thread of one global load/store opcode (``LDG.E.128`` → 128, ``LDG.E.U16`` → 16)."""
    parts = op.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


def inspect_cubin(cubin: bytes, kernel: str) -> dict[str, Any]:
    """Resources and instruction facts of one kernel in a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(triton_tool("cuobjdump")), "-res-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(triton_tool("cuobjdump")), "-sass", str(path)],
                              capture_output=True, text=True, check=True).stdout
    block = res.split(f"Function {kernel}:", 1)
    found = _RES.search(block[1] if len(block) == 2 else "")
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line for {kernel}:\n{res}")
    regs, stack, shared, local = map(int, found.groups())
    loads = re.findall(r"\b(LDG(?:STS)?(?:\.[A-Z0-9_]+)*)", sass)
    stores = re.findall(r"\b(STG(?:\.[A-Z0-9_]+)*)", sass)
    atomics = re.findall(r"\b(?:REDG?|ATOMG?)\.[A-Z0-9_.]+", sass)
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "shared_static": shared, "wgmma": "HGMMA" in sass, "mma": "HMMA" in sass,
            "load_bits": max((_width(op) for op in loads), default=0),
            "store_bits": max((_width(op) for op in stores), default=0),
            "atomics": len(atomics),
            "sass_lines": sass.count("\n")}


def report_row(case: KernelCase, variant: str, arch: str) -> dict[str, Any]:
    """Compile, inspect, and gate one (kernel, variant, arch)."""
    row: dict[str, Any] = {"kernel": case.label, "kind": case.kind, "variant": variant,
                           "arch": arch}
    start = time.perf_counter()
    try:
        compiled = compile_kernel(case, variant, arch)
        facts = inspect_cubin(compiled.asm["cubin"], compiled.metadata.name)
    except Exception as exc:  # a kernel that does not compile is a failed gate, with the reason
        row.update(error=f"{type(exc).__name__}: {exc}"[:800], failures=["does not compile"])
        return row
    shared_dynamic = int(compiled.metadata.shared)
    row.update(facts, shared_dynamic=shared_dynamic,
               shared_total=shared_dynamic + facts["shared_static"],
               num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
               compile_s=round(time.perf_counter() - start, 2))
    row["failures"] = gate_failures(row)
    return row


def expects_wgmma(row: dict[str, Any]) -> bool:
    """sm_90 dot kernels on tensor-core operands (bf16, fp16, tf32; not fp32 "ieee")."""
    return row["arch"] == "sm_90" and row["kind"] == "dot" and row["variant"] != "fp32"


def gate_failures(row: dict[str, Any]) -> list[str]:
    """The gates one compiled row fails (empty: all pass)."""
    out = []
    if row["stack_bytes"] or row["local_bytes"]:
        out.append(f"spills: {row['stack_bytes']} B stack, {row['local_bytes']} B local")
    limit = SHARED_LIMIT[row["arch"]]
    if row["shared_total"] > limit:
        out.append(f"shared memory {row['shared_total']} B > {limit} B")
    if expects_wgmma(row) and not row["wgmma"]:
        out.append("no wgmma (HGMMA) in an sm_90 dot kernel")
    if row["kind"] == "stream" and row["load_bits"] < 128:
        out.append(f"widest global load {row['load_bits']} bits, not 128")
    return out


def known_failure(row: dict[str, Any]) -> str | None:
    """Why a row is expected to fail its gates today (None: it must pass)."""
    return KNOWN_FAILURES.get((row["kernel"], row["variant"], row["arch"]))


def cases(only: str | None = None) -> list[KernelCase]:
    return [c for c in KERNELS if not only or only in c.label]


def run_matrix(archs: tuple[str, ...] = tuple(ARCHS), only: str | None = None,
               variants: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per kernel × variant × arch."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    rows = []
    for case in cases(only):
        for variant in case.variants:
            if variants and variant not in variants:
                continue
            for arch in archs:
                rows.append(report_row(case, variant, arch))
    return rows


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table for RESULTS.md."""
    lines = ["| kernel | dtype | arch | regs | stack B | local B | shared B (limit) | wgmma "
             "| widest load / store bits | atomics | gates |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['kernel']}` | {r['variant']} | {r['arch']} | | | | | | | | "
                         f"**FAIL**: {r['error'][:200]} |")
            continue
        if r["wgmma"]:
            tensor = "yes"
        elif r["mma"]:
            tensor = "no (HMMA)"
        else:
            tensor = "no (FMA)" if r["kind"] == "dot" else "–"
        known = " (known)" if known_failure(r) else ""
        gates = "pass" if not r["failures"] else f"**FAIL**{known}: " + "; ".join(r["failures"])
        lines.append(
            f"| `{r['kernel']}` | {r['variant']} | {r['arch']} | {r['registers']} "
            f"| {r['stack_bytes']} | {r['local_bytes']} "
            f"| {r['shared_total']:,} ({SHARED_LIMIT[r['arch']] // 1024} KB) | {tensor} "
            f"| {r['load_bits']} / {r['store_bits']} | {r['atomics']} | {gates} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compile-report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=",".join(ARCHS), help="comma-separated of sm_80,sm_90")
    parser.add_argument("--only", default=None, help="kernels whose label contains this text")
    parser.add_argument("--variants", default=None, help="comma-separated dtype variants")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown --arch {unknown}; expected some of {list(ARCHS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: kernels are interpreted, not compiled; unset it")
    import triton

    start = time.perf_counter()
    rows = run_matrix(archs, args.only,
                      tuple(args.variants.split(",")) if args.variants else None)
    failed = [r for r in rows if r["failures"]]
    unexpected = [r for r in failed if not known_failure(r)]
    print(f"Triton {triton.__version__}, ptxas/cuobjdump from the Triton wheel; launch "
          f"specialization as at a {TOKENS}-token, V {VOCAB}, H {HIDDEN} launch; "
          f"{len(rows)} compiles in {time.perf_counter() - start:.0f} s\n")
    print(markdown(rows))
    print(f"\n{len(rows) - len(failed)} of {len(rows)} pass every gate; {len(failed)} fail "
          f"({len(failed) - len(unexpected)} known, listed in KNOWN_FAILURES)")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
