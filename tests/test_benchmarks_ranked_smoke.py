"""The ranked-data suite runs end to end at its smoke size: every row computes the same loss (so
their timings compare), the K-way rows need fewer sequences and tokens than the expanded pairs,
and the summary prints the FLOP ratios and the MFU beside the speed-ups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.suites import ranked

REPO = Path(__file__).resolve().parent.parent


def test_ranked_suite_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--suite", "ranked", "--device", "cpu",
         "--smoke", "--in-process", "--reps", "1", "--warmup", "0", "--no-plots", "--out",
         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == list(ranked.IMPLS)
    checks = [r["check"] for r in rows.values()]
    assert max(checks) - min(checks) < 1e-5, checks  # the same loss in every layout
    pairs, kway = rows["pairs_padded"]["extra"], rows["kway_rows"]["extra"]
    assert kway["sequences"] * 2 <= pairs["sequences"]  # K = 3: 3 completions vs 3 pairs × 2
    assert kway["tokens_computed"] < pairs["tokens_computed"]
    assert kway["padded_forward_flops"] > kway["forward_flops"]
    assert all(r["extra"]["gemm_flops_per_s"] > 0 and r["extra"]["model_flops"] > 0
               for r in rows.values())
    assert "step-FLOP ratio" in proc.stdout and "MFU" in proc.stdout
