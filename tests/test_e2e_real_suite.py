"""The real-data suite is registered (``--suite e2e-real``) and its rows are the job's layouts;
running it takes minutes of real training, so it belongs to ``python -m benchmarks``, not here."""

from __future__ import annotations

import argparse

from benchmarks import __main__ as cli
from benchmarks.suites import e2e_real


def test_suite_is_registered_and_lists_trl_and_every_layout(tmp_path):
    args = cli._parse(["run", "--suite", "e2e-real", "--quick"])
    quick = cli.collect_cases(args, tmp_path)
    assert [s.impl for s in quick] == list(e2e_real.QUICK_IMPLS)
    assert all(s.suite == "e2e_real" and s.params["max_length"] == 512 for s in quick)
    full = cli.collect_cases(argparse.Namespace(**{**vars(args), "quick": False}), tmp_path)
    assert {f"fastpo_{n}" for n in e2e_real.LAYOUT_ROWS} | {"trl", "fastpo_auto"} <= {
        s.impl for s in full}
    # "all" stays the short suites
    every = cli.collect_cases(cli._parse(["run", "--suite", "all", "--smoke"]), tmp_path)
    assert not any(s.suite == "e2e_real" for s in every)


def test_job_config_is_the_default_job_at_512_tokens(tmp_path):
    params = {"steps": 1, "pairs": 4, "max_length": 512, "dtype": "fp32"}
    cfg = e2e_real.job_config("shared", params, "cpu", str(tmp_path))
    assert (cfg.data.layout, cfg.data.max_length, cfg.data.truncation_mode) == (
        "shared", 512, "drop")
    assert cfg.model.lora.enabled and cfg.optimization.micro_batch_size == 4
    assert cfg.data.group_by_length is False and cfg.loss.resolved_loss_types() == ["sigmoid"]
