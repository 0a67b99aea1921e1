"""Exact pair weighting (``engine/train/step_weighting.py``): the gradient a step accumulates over
micro-batches of uneven sizes equals the gradient of the mean loss over all the step's items in
one batch, to 1e-6 relative in fp32: on one process (plain and DeepSpeed, with accumulation)
and on 2 ranks with uneven shares (DeepSpeed launcher, ZeRO-2). The step's micro-batches are
set by the test (as a token budget or an online round would cut them: 1, 3 and 2 items). DPO
with the SFT term (its NLL per token of the whole step), KTO's examples
(``apo_zero_unpaired``: KTO's own z₀ is the micro-batch's estimate, as in TRL, so no
full-batch identity holds for it) and CPO's NLL term.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # tests/ (a launcher worker's path)
from trainer_helpers import isolated_launch, job, trainable_gradients  # noqa: E402

REPORT_DIR_ENV = "FASTPO_TEST_REPORT_DIR"
UNEVEN = {"micro_batch_size": 1, "gradient_accumulation_steps": 3, "max_grad_norm": 0.0}
GROUPS = [[3], [0, 7, 5], [10, 2]]  # one step's micro-batches (dataset indices)
RANK_GROUPS = [[[3], [0, 7, 5]], [[10, 2], [12]]]  # 4 items on rank 0, 3 on rank 1
LOSSES = {
    "dpo_sft": {"method": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "kto_items": {"method": "kto", "loss_type": "apo_zero_unpaired"},
    "cpo_nll": {"method": "cpo", "cpo_alpha": 0.7},
}


def _job(tiny_dir, pairs_file, out, loss: dict, **sections) -> dict:
    base = {"optimization": dict(UNEVEN), "loss": loss, "deepspeed": {"enabled": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return job(tiny_dir, pairs_file, out, **base)


def _trainer(data: dict):
    """A Trainer of ``data`` in an output folder of its own (the folder's lock is held by the
    Trainer: the tests build several side by side)."""
    from fastpo.engine.train import Trainer
    from fastpo.engine.train.config_loading import config_from_dict

    data = json.loads(json.dumps(data))
    out = Path(data["logging"]["output_dir"])
    data["logging"]["output_dir"] = str(out.with_name(f"{out.name}-{next(_RUNS)}"))
    return Trainer(config_from_dict(data))


_RUNS = itertools.count()


def step_and_record(trainer, groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """One training step over the micro-batches ``groups`` (dataset indices): the accumulated
    gradient just before the optimizer step."""
    from fastpo.engine.train import Callback

    trainer.source.step_indices = lambda: groups
    grads: dict[str, torch.Tensor] = {}

    class Capture(Callback):
        def on_before_optimizer_step(self, t) -> None:
            grads.update(trainable_gradients(t))

    trainer.callbacks = [*trainer.callbacks, Capture()]
    trainer.last_record = trainer.train_step()
    return grads


def full_batch_grads(data: dict, indices: list[int]) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over ``indices`` as ONE batch, in a plain process."""
    data = json.loads(json.dumps(data))
    data["deepspeed"] = {"enabled": False}
    trainer = _trainer(data)
    batch = trainer.source.collate(indices)
    out = trainer.forward(batch)  # no step counts: the batch's own mean
    out.loss.backward()
    return trainable_gradients(trainer)


def mean_of_means_grads(data: dict, groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """What per-micro-batch means ÷ accumulation gave (the old weighting), for contrast."""
    data = json.loads(json.dumps(data))
    data["deepspeed"] = {"enabled": False}
    trainer = _trainer(data)
    for group in groups:
        (trainer.forward(trainer.source.collate(group)).loss / len(groups)).backward()
    return trainable_gradients(trainer)


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys() and got
    num = sum(float((got[k] - want[k]).square().sum()) for k in want)
    den = sum(float(want[k].square().sum()) for k in want)
    assert den > 0
    return (num / den) ** 0.5


@pytest.mark.parametrize("loss", list(LOSSES))
def test_uneven_micro_batches_give_the_full_batch_gradient(tiny_dir, pairs_file, tmp_path, loss):
    data = _job(tiny_dir, pairs_file, tmp_path / "run", LOSSES[loss])
    grads = step_and_record(_trainer(data), GROUPS)
    want = full_batch_grads(data, [i for g in GROUPS for i in g])
    assert relative_error(grads, want) < 1e-6
    # the per-micro-batch mean weighting is measurably off on the same split
    assert relative_error(mean_of_means_grads(data, GROUPS), want) > 1e-3


def test_uneven_micro_batches_under_deepspeed_accumulation(tiny_dir, pairs_file, tmp_path):
    """DeepSpeed does not divide the step's share by the accumulation steps again."""
    data = _job(tiny_dir, pairs_file, tmp_path / "run", LOSSES["dpo_sft"],
                deepspeed={"enabled": True, "zero_stage": 0})
    with isolated_launch():
        grads = step_and_record(_trainer(data), GROUPS)
    assert relative_error(grads, full_batch_grads(data, [i for g in GROUPS for i in g])) < 1e-6


def test_the_logged_loss_is_the_step_mean(tiny_dir, pairs_file, tmp_path):
    """The step's record shows the mean loss over all its pairs, not a mean of batch means."""
    data = _job(tiny_dir, pairs_file, tmp_path / "run", LOSSES["dpo_sft"])
    trainer = _trainer(data)
    step_and_record(trainer, GROUPS)
    record = trainer.last_record
    trainer.read_metrics()  # completes the step's record in place
    ref = _trainer(json.loads(json.dumps(data)))
    full = ref.forward(ref.source.collate([i for g in GROUPS for i in g])).loss
    assert record["loss"] == pytest.approx(float(full), rel=1e-5)


# ------------------------------------------------------------------------------------ 2 ranks
@pytest.mark.distributed
def test_two_ranks_with_uneven_shares_give_the_full_batch_gradient(tiny_dir, pairs_file,
                                                                    tmp_path):
    from trainer_helpers import launch_workers

    data = _job(tiny_dir, pairs_file, tmp_path / "run", LOSSES["dpo_sft"],
                deepspeed={"enabled": True, "zero_stage": 2},
                optimization={"gradient_accumulation_steps": 2})
    (tmp_path / "job.json").write_text(json.dumps(data))
    _, reports = launch_workers(__file__, tmp_path, world=2, report_env=REPORT_DIR_ENV)
    assert [r["groups"] for r in reports] == RANK_GROUPS
    grads = torch.load(tmp_path / "grads.pt")
    data["optimization"]["gradient_accumulation_steps"] = 1
    want = full_batch_grads(data, [i for groups in RANK_GROUPS for g in groups for i in g])
    assert relative_error(grads, want) < 1e-6


def worker() -> None:
    folder = Path(os.environ[REPORT_DIR_ENV])
    data = json.loads((folder / "job.json").read_text())
    trainer = _trainer(data)
    rank = trainer.rt.rank
    grads = step_and_record(trainer, RANK_GROUPS[rank])
    if rank == 0:
        torch.save(grads, folder / "grads.pt")
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank,
                                                          "groups": RANK_GROUPS[rank]}))


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()
