"""TRL's per-token metrics in fastpo-train (``model.token_statistics``, on by default): the
entropy over the completion tokens and the top-1 accuracy on the chosen ones, taken from the
head's own pass, equal the float64 values of the full logits, on the fused and the logits path;
a run logs them, and switching them off removes them."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import job, run


def _trainer(tiny_dir, pairs_file, out, **sections):
    from fastpo.engine.train import Trainer
    from fastpo.engine.train.config_loading import config_from_dict

    return Trainer(config_from_dict(job(tiny_dir, pairs_file, out, **sections)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "logits"])
def test_token_metrics_match_float64(tiny_dir, pairs_file, tmp_path, fused):
    trainer = _trainer(tiny_dir, pairs_file, tmp_path / "run",
                       model={"use_fused_linear": fused}, data={"layout": "padded"})
    batch = trainer.source.collate([0, 3, 8])
    out = trainer.forward(batch)
    model = trainer.backend.module
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.double()
    z = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
    labels = batch.labels.reshape(-1).index_select(0, batch.target_index)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    chosen = batch.target_sequence < batch.num_pairs
    want_entropy = entropy.mean()
    want_accuracy = (z.argmax(-1) == labels)[chosen].double().mean()
    assert float(out.metrics["entropy"]) == pytest.approx(float(want_entropy), rel=1e-5)
    assert float(out.metrics["mean_token_accuracy"]) == pytest.approx(float(want_accuracy),
                                                                      abs=1e-7)


def test_a_run_logs_them_unless_switched_off(tiny_dir, pairs_file, tmp_path):
    on = run(job(tiny_dir, pairs_file, tmp_path / "on"))
    assert all(0 < r["entropy"] and 0 <= r["mean_token_accuracy"] <= 1 for r in on.history)
    off = run(job(tiny_dir, pairs_file, tmp_path / "off", model={"token_statistics": False}))
    assert all("entropy" not in r and "mean_token_accuracy" not in r for r in off.history)
    assert [r["loss"] for r in off.history] == pytest.approx([r["loss"] for r in on.history],
                                                             rel=1e-6)
