"""What a user sees: log lines print on lines of their own above the progress bar (tqdm's
logging redirect), the final bar is drawn once and left, later lines print below it, and
``fastpo-train`` ends with one summary line."""

from __future__ import annotations

import logging
import re
import sys

from trainer_helpers import job

from fastpo.engine.train import cli
from fastpo.engine.train.metrics_log import RunLogger


def test_log_lines_go_above_the_bar_and_the_final_bar_is_drawn_once(tmp_path, capsys):
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as basicConfig makes
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log = RunLogger(tmp_path, enabled=True, progress="tqdm", total_steps=3)
        for step in (1, 2, 3):
            log.update_progress(step, f"loss 0.{step}")
            if step == 2:
                logging.getLogger("fastpo.engine.train.example").warning("a log line")
        log.close_progress()
        log.message("[after step 3] held-out: fine")
        logging.getLogger("fastpo.engine.train.example").warning("a later line")
        log.close()
    finally:
        root.removeHandler(handler)
    captured = capsys.readouterr()
    pieces = re.split(r"[\r\n]", captured.err)
    assert "a log line" in pieces  # a line of its own, not spliced into the bar's line
    assert not any("a log line" in p and p != "a log line" for p in pieces)
    final = [i for i, p in enumerate(pieces) if p.startswith("train: 100%")]
    assert len(final) == 1  # drawn once, by close(), and left
    assert pieces.index("a later line") > final[-1]  # nothing redraws the bar after it closes
    assert captured.out == "[after step 3] held-out: fine\n"


def test_fastpo_train_ends_with_one_summary_line(tiny_dir, pairs_file, tmp_path, capsys):
    import json

    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job(tiny_dir, pairs_file, tmp_path / "run",
                                     data={"eval_fraction": 0.25},
                                     logging={"eval_before": True, "progress": "tqdm"})))
    assert cli.main(["--config", str(config)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("[before step 0] held-out (4 items): reward accuracy 0.000")
    assert lines[1].startswith("[after step 2] held-out (4 items)")
    assert len(lines) == 3 and re.fullmatch(
        r"fastpo-train: 2 steps \(completed\) in \d+ s; held-out reward accuracy 0\.000 → "
        r"[01]\.\d{3}, margin 0\.0000 → -?\d\.\d{4}, loss 0\.6931 → \d\.\d{4}", lines[2])
    bars = [p for p in re.split(r"[\r\n]", captured.err) if p.startswith("train: 100%")]
    assert len(bars) == 1  # drawn once when the steps end, not again for each later message
