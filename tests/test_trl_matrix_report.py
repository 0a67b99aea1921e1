"""The TRL version matrix script's own logic: what counts as a match, and the table it prints.

(The matrix itself installs TRL releases into throwaway venvs: ``python -m benchmarks.trl_matrix``.)
"""

from __future__ import annotations

from benchmarks import trl_matrix


def _logs(*losses, rewards=0.5):
    return [{"loss": x, "rewards/margins": rewards, "grad_norm": 1.0} for x in losses]


def test_compare_accepts_rounding_and_flags_any_logged_value():
    same = trl_matrix._compare(_logs(0.69, 0.6), _logs(0.69 + 1e-7, 0.6), steps=2)
    assert same["ok"] and abs(same["max_abs_dloss"] - 1e-7) < 1e-12
    loss_off = trl_matrix._compare(_logs(0.69, 0.6), _logs(0.69, 0.61), steps=2)
    assert not loss_off["ok"] and "loss" in loss_off["first_mismatch"]
    metric_off = trl_matrix._compare(_logs(0.69), _logs(0.69, rewards=0.6), steps=1)
    assert not metric_off["ok"] and metric_off["max_abs_dloss"] == 0.0
    assert "rewards/margins" in metric_off["first_mismatch"]
    short = trl_matrix._compare(_logs(0.69), _logs(0.69, 0.6), steps=2)
    assert not short["ok"] and "expected 2" in short["error"]


def test_markdown_table():
    ok = {"ok": True, "max_abs_dloss": 1.2e-7}
    table = trl_matrix.markdown([
        {"version": "1.14.2", "refused": "needs trl >= 1.15 (installed: 1.14.2)", "seconds": 5.0},
        {"version": "1.15.0", "dpo": ok, "kto": {"ok": False, "max_abs_dloss": 0.1},
         "seconds": 48.6, "unmet": ["transformers>=9 (have 5.24.0)"]},
        {"version": "1.16.0", "dpo": ok, "kto": {"error": "TypeError: x"}, "seconds": 11.0},
    ])
    lines = table.splitlines()
    assert lines[2] == "| 1.14.2 | refused (below the minimum) | refused | 5 |"
    assert lines[3] == "| 1.15.0 | ok, 1.2e-07 | **MISMATCH**, 1.0e-01 | 49 |"
    assert lines[4] == "| 1.16.0 | ok, 1.2e-07 | **fails**: TypeError: x | 11 |"
    assert "- 1.15.0: unmet requirements transformers>=9 (have 5.24.0)" in lines
