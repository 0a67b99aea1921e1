"""MoE policies in fastpo-train: the router load-balancing loss (``model.router_aux_loss_coef``,
the config's own by default, as TRL) is transformers' own for the batch, enters the trained loss
with its weight and reaches the routers; tiny random Mixtral-style and Qwen-MoE-style models."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import job, run, tiny_moe

KINDS = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module", params=KINDS)
def moe_dir(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    model = tiny_moe(request.param, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _trainer(moe_dir, pairs_file, out, **sections):
    from fastpo.engine.train import Trainer
    from fastpo.engine.train.config_loading import config_from_dict

    sections.setdefault("data", {})["layout"] = "padded"
    return Trainer(config_from_dict(job(moe_dir, pairs_file, out, **sections)))


def test_router_loss_is_transformers_own_and_enters_the_loss(moe_dir, pairs_file, tmp_path):
    trainer = _trainer(moe_dir, pairs_file, tmp_path / "run")
    assert trainer.objective.router.coef == 0.05  # the config's own
    batch = trainer.source.collate([0, 5, 9])
    model = trainer.backend.module
    out = trainer.forward(batch)
    assert "aux_loss" in out.metrics
    # transformers' own forward on the same padded rows gives the same load-balancing loss
    own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, output_router_logits=True).aux_loss
    torch.testing.assert_close(out.metrics["aux_loss"], own.detach().float(), rtol=1e-6,
                               atol=1e-7)
    # the trained loss is the preference loss + coef · aux, and the routers get its gradient
    trainer.objective.router = None
    plain = trainer.forward(batch)
    assert "aux_loss" not in plain.metrics
    torch.testing.assert_close(out.loss - plain.loss, 0.05 * own.float(), rtol=1e-5, atol=1e-7)
    gates = [p for n, p in model.named_parameters() if n.endswith(".gate.weight")]  # routers
    assert gates
    aux_grads = torch.autograd.grad(out.loss - plain.loss, gates)
    assert all(g.abs().sum() > 0 for g in aux_grads)


def test_moe_trains_with_the_router_loss_logged(moe_dir, pairs_file, tmp_path):
    result = run(job(moe_dir, pairs_file, tmp_path / "run",
                     model={"router_aux_loss_coef": 0.1}, data={"layout": "packed"}))
    assert len(result.history) == 2
    for record in result.history:
        assert record["aux_loss"] > 0 and torch.isfinite(torch.tensor(record["loss"]))


def test_router_loss_off_and_refused_on_a_dense_model(moe_dir, tiny_dir, pairs_file, tmp_path):
    from fastpo.engine.errors import InputError

    trainer = _trainer(moe_dir, pairs_file, tmp_path / "off", model={"router_aux_loss_coef": 0})
    assert trainer.objective.router is None
    assert "aux_loss" not in trainer.forward(trainer.source.collate([0, 1])).metrics
    with pytest.raises(InputError, match=r"router_aux_loss_coef is 0\.1, but LlamaForCausalLM is "
                                          "not a mixture-of-experts model"):
        _trainer(tiny_dir, pairs_file, tmp_path / "dense", model={"router_aux_loss_coef": 0.1})
