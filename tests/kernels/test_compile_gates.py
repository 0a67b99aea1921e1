"""Compile gates without a GPU: every Triton kernel, every dtype variant, sm_80 and sm_90.

``benchmarks/compile_report.py`` compiles each kernel of its ``KERNELS`` list ahead of time with
the specialization a launch applies (Triton's own launch binder: divisibility-16 on aligned
pointers and on sizes/strides divisible by 16) and reads the cubin with the ``cuobjdump`` bundled
in the Triton wheel. Here every row is held to the gates: no stack or local memory (no spills),
shared memory within the architecture's limit, ``HGMMA`` (wgmma) in the sm_90 dot kernels on
tensor-core operands, 128-bit global loads in the streaming kernels. A row listed in
``KNOWN_FAILURES`` must still fail (strict xfail), so a fix is noticed and the entry removed.

The whole matrix (32 compiles today) runs once, in a subprocess without ``TRITON_INTERPRET``,
in ~25 s on 2 busy cores (seconds with Triton's compile cache warm). Missing bundled tools are a
failure, not a skip: the triton wheel ships them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compile_report as cr

REPO = Path(__file__).resolve().parents[2]
KEYS = [(c.label, v, a) for c in cr.KERNELS for v in c.variants for a in cr.ARCHS]


def _param(key):
    reason = cr.KNOWN_FAILURES.get(key)
    marks = [pytest.mark.xfail(strict=True, reason=f"known: {reason}")] if reason else []
    return pytest.param(key, id="-".join(key), marks=marks)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "compile-report", "--json",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    return {(r["kernel"], r["variant"], r["arch"]): r for r in rows}, proc


def test_bundled_cuda_tools_are_present():
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        assert cr.triton_tool(name).is_file()


def test_every_triton_kernel_is_in_the_compile_list():
    sources = sorted(p for p in (REPO / "kernels").glob("*.py")
                     if "@triton.jit" in p.read_text())
    modules = {f"fastpo.kernels.{p.stem}" for p in sources}
    assert modules <= set(cr.KERNEL_MODULES), (
        f"Triton kernels in {sorted(modules - set(cr.KERNEL_MODULES))}: add the module to "
        f"KERNEL_MODULES and its kernels to KERNELS in benchmarks/compile_report.py")
    listed = {c.label for c in cr.KERNELS}
    for label in cr.jit_kernels():
        name = label.rsplit(".", 1)[1]
        assert label in listed or name in cr.DEVICE_FUNCTIONS, (
            f"@triton.jit {label} is neither compiled (KERNELS) nor a device function "
            f"(DEVICE_FUNCTIONS) in benchmarks/compile_report.py")
    assert len(KEYS) == len(set(KEYS))


def test_launch_specialization_is_the_jit_s():
    """Pointers and multiple-of-16 sizes carry tt.divisibility 16; a 1 becomes a constant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from benchmarks import compile_report as cr\n"
        "fn, t, sig, cx, attrs, opts = cr.specialize(cr.KERNELS[0], 'bf16', 'sm_90')\n"
        "names = [p.name for p in fn.params]\n"
        "print(json.dumps({'sig': sig, 'attrs': {names[k[0]]: v for k, v in attrs.items()},"
        " 'warps': opts.num_warps, 'arch': opts.arch}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    div = [["tt.divisibility", 16]]
    assert got["sig"]["logits_ptr"] == "*bf16" and got["attrs"]["logits_ptr"] == div
    assert got["attrs"]["vocab"] == div and got["attrs"]["stride_t"] == div
    assert got["attrs"]["ignore_index"] == []  # -100 is not a multiple of 16
    assert got["sig"]["BLOCK_V"] == "constexpr" and got["arch"] == "sm90"


def test_a_launch_that_does_not_match_the_kernel_is_named():
    case = cr.KernelCase("fastpo.kernels.logprobs_triton", "_logps_forward_kernel", "stream",
                         lambda v, a: ({"logits_ptr": cr.F32, "bogus": 3}, {}))
    with pytest.raises(ValueError, match=r"_logps_forward_kernel.*missing \['labels_ptr'.*"
                                         r"unknown \['bogus'\]"):
        cr.specialize(case, "fp32", "sm_90")


def test_sass_widths():
    assert cr._width("LDG.E.128") == 128 and cr._width("LDG.E.128.CONSTANT") == 128
    assert cr._width("LDGSTS.E.BYPASS.128") == 128 and cr._width("LDG.E.64") == 64
    assert cr._width("LDG.E.U16") == 16 and cr._width("LDG.E") == 32


@pytest.mark.parametrize("key", [_param(k) for k in KEYS])
def test_compile_gates(compiled, key):
    rows, proc = compiled
    assert key in rows, f"{key} missing from the report:\n{proc.stdout[-2000:]}"
    row = rows[key]
    assert "error" not in row, row.get("error")
    _label, variant, arch = key
    assert row["registers"] <= 255
    assert row["stack_bytes"] == 0, f"{row['stack_bytes']} B of stack (spills)"
    assert row["local_bytes"] == 0, f"{row['local_bytes']} B of local memory"
    assert row["shared_total"] <= cr.SHARED_LIMIT[arch], row["shared_total"]
    if cr.expects_wgmma(row):
        assert row["wgmma"], "no HGMMA (wgmma) in an sm_90 dot kernel"
    if row["kind"] == "dot" and variant != "fp32":
        assert row["wgmma"] or row["mma"], "tl.dot does not run on tensor cores"
    if row["kind"] == "stream":
        assert row["load_bits"] == 128, f"widest global load {row['load_bits']} bits"
    assert row["failures"] == []


def test_report_table(compiled):
    rows, proc = compiled
    table = cr.markdown(list(rows.values()))
    assert table.count("\n") == len(rows) + 1
    assert re.search(r"\| `logprobs_triton\._logps_forward_kernel` \| bf16 \| sm_90 \| \d+ \| 0 "
                     r"\| 0 \|", table)
    # the command's status: 0 exactly when every failing row is a known one
    unexpected = [r for r in rows.values() if r["failures"] and not cr.known_failure(r)]
    assert proc.returncode == (1 if unexpected else 0), proc.stderr[-2000:]
