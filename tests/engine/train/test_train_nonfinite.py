"""Non-finite losses in training: the run stops naming the step, or (``on_nonfinite: skip``) the
update is skipped on the device and reported at the next read; a NaN held-out loss fails the run
and the CLI exits 1."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import job, run

from fastpo.engine.train import Callback, NonFiniteError, cli
from fastpo.engine.train.metrics_log import read_jsonl


# ------------------------------------------------------------------------------ non-finite
class PoisonLoss(Callback):
    """Makes the loss of the micro-batches of one step NaN (through the objective)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step + 1 == self.step and not hasattr(trainer, "_poisoned"):
            trainer._poisoned = True
            objective = trainer.objective

            def poisoned(*args, **kwargs):
                out = objective(*args, **kwargs)
                if trainer.pos.step + 1 == self.step:
                    out.loss = out.loss * float("nan")
                return out

            trainer.objective = poisoned
            trainer.objective.with_tails = objective.with_tails
            trainer.objective.with_sum_sq = objective.with_sum_sq


def test_nonfinite_loss_stops_naming_the_step(tiny_dir, pairs_file, tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2"):
        run(job(tiny_dir, pairs_file, tmp_path, optimization={"max_steps": 3}),
            callbacks=[PoisonLoss(2)])


def test_nonfinite_step_is_skipped_when_configured(tiny_dir, pairs_file, tmp_path):
    snapshots = []

    class Snap(Callback):
        def on_step_end(self, trainer, step, record):
            snapshots.append({n: p.detach().clone()
                              for n, p in trainer.backend.module.named_parameters()})

    result = run(job(tiny_dir, pairs_file, tmp_path, optimization={
        "max_steps": 3, "on_nonfinite": "skip"}), callbacks=[PoisonLoss(2), Snap()])
    flags = [r["skipped"] for r in result.history]
    assert flags == [False, True, False]
    assert math.isnan(result.history[1]["loss"]) and math.isfinite(result.history[2]["loss"])
    assert all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])
    assert not all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])


def test_nonfinite_steps_between_logging_points_are_found_at_the_read(tiny_dir, pairs_file,
                                                                      tmp_path):
    """Metrics are read every 2 steps: step 3's NaN loss is found at the read after step 4,
    which names step 3; its update was skipped on the device, step 4's applied."""
    result = run(job(tiny_dir, pairs_file, tmp_path, optimization={
        "max_steps": 4, "on_nonfinite": "skip"}, logging={"log_every": 2}),
        callbacks=[PoisonLoss(3)])
    assert [r["skipped"] for r in result.history] == [False, False, True, False]
    assert math.isnan(result.history[2]["loss"])
    assert all(math.isfinite(result.history[i]["loss"]) for i in (0, 1, 3))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl", "train")] == [2, 4]
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3 "):
        run(job(tiny_dir, pairs_file, tmp_path / "stop", optimization={"max_steps": 4},
                logging={"log_every": 2}), callbacks=[PoisonLoss(3)])


def test_a_nan_held_out_loss_fails_the_run(tiny_dir, pairs_file, tmp_path):
    """Weights gone NaN after the last step: the evaluation after training says so and the run
    ends with NonFiniteError (``fastpo-train`` exit status 1), exporting nothing."""

    class Ruin(Callback):
        def on_step_end(self, trainer, step, record):
            if step == 2:
                with torch.no_grad():
                    for p in trainer.backend.module.parameters():
                        p.fill_(float("nan"))

    data = job(tiny_dir, pairs_file, tmp_path, data={"eval_fraction": 0.25},
               checkpoint={"export": "full"})
    with pytest.raises(NonFiniteError, match=r"held-out loss is nan after training \(4 items\)"):
        run(data, callbacks=[Ruin()])
    assert not (tmp_path / "final").exists()
    evals = read_jsonl(tmp_path / "metrics.jsonl", "eval")
    assert evals[-1]["when"] == "after" and math.isnan(evals[-1]["loss"])


def test_cli_exits_1_when_the_held_out_loss_is_nan(tiny_dir, pairs_file, tmp_path, capsys):
    """A learning rate of 1e30 (finite, so accepted) ruins the weights in one step."""
    status = cli.main(["--model.name_or_path", str(tiny_dir), "--data.train", str(pairs_file),
                       "--data.max_length", "40", "--data.max_prompt_length", "20",
                       "--data.eval_fraction", "0.25", "--deepspeed.enabled", "false",
                       "--optimization.learning_rate", "1e30", "--optimization.warmup_steps",
                       "0", "--optimization.max_steps", "1", "--optimization.on_nonfinite",
                       "skip", "--logging.output_dir", str(tmp_path), "--logging.progress",
                       "none", "--logging.eval_before", "false", "--checkpoint.export", "none"])
    assert status == 1
    assert "held-out loss is nan after training" in capsys.readouterr().err
