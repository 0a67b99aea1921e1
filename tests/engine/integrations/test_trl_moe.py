"""MoE models in a patched TRL trainer keep fastpo's head: the router load-balancing loss comes
with fastpo's output as with TRL's (``aux_loss``, weighted by ``router_aux_loss_coef``), and
three DPO / KTO steps log the same values (``aux_loss`` included) and reach the same weights as
TRL's own fused head, on tiny random Mixtral-style and Qwen-MoE-style models."""

from __future__ import annotations

import copy

import pytest

trl = pytest.importorskip("trl", reason="the TRL integration is tested with TRL installed")
pytest.importorskip("datasets")

from test_trl_integration import (  # noqa: E402
    STEPS,
    _assert_logs_match,
    _assert_params_match,
    _common_args,
    _preference_dataset,
    _train,
    _unpaired_dataset,
    trl_head_forbidden,  # noqa: F401 (a fixture)
)
from trainer_helpers import tiny_moe  # noqa: E402

from fastpo.engine.integrations import trl as fastpo_trl  # noqa: E402


def _trainer(kind: str, model, tokenizer, tmp_path, name: str):
    common = _common_args(tmp_path, name)
    if kind == "kto":
        args = trl.KTOConfig(**common, per_device_train_batch_size=4)
        return trl.KTOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model),
                              args=args, train_dataset=_unpaired_dataset(),
                              processing_class=tokenizer)
    args = trl.DPOConfig(**common, per_device_train_batch_size=2)
    return trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                          train_dataset=_preference_dataset(), processing_class=tokenizer)


@pytest.mark.parametrize(("moe", "trainer"), [("mixtral", "dpo"), ("qwen2_moe", "kto")])
def test_moe_steps_match_trl_with_the_router_loss(tokenizer, tmp_path, moe, trainer,
                                                  trl_head_forbidden):  # noqa: F811
    model = tiny_moe(moe, len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    stock = _trainer(trainer, model, tokenizer, tmp_path, "stock")
    assert stock.aux_loss_enabled  # TRL trains this model with the router loss
    stock_logs = _train(stock)
    fast = fastpo_trl.patch_trainer(_trainer(trainer, model, tokenizer, tmp_path, "fast"))
    trl_head_forbidden()
    fast_logs = _train(fast)
    _assert_logs_match(stock_logs, fast_logs, ("loss", "aux_loss"))
    assert all(entry["aux_loss"] > 0 for entry in fast_logs)
    _assert_params_match(stock.model, fast.model)
    policy = fastpo_trl.path_counts(fast)["policy"]  # (KTO: examples and KL pass each step)
    assert set(policy) == {"linear"} and policy["linear"] >= STEPS
