"""The reference strategies in training: TR-DPO soft sync of a separate reference, iterative rounds
resetting it, the LoRA soft update (the base moves, the policy stays), and a precomputed
reference giving the same losses as a live one."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import job, losses, run

from fastpo.engine.train import Callback


# ------------------------------------------------------------------ the reference follows
def test_tr_dpo_soft_sync_of_a_separate_reference(tiny_dir, pairs_file, tmp_path):
    seen = []

    class Snap(Callback):
        def on_step_end(self, trainer, step, record):
            seen.append((trainer.reference.state_dict(),
                         {n: p.detach().clone()
                          for n, p in trainer.backend.module.named_parameters()}))

    run(job(tiny_dir, pairs_file, tmp_path, reference={"sync_steps": 1, "sync_alpha": 0.25},
            optimization={"max_steps": 3}), callbacks=[Snap()])
    # the sync after step 1 moved the reference a quarter of the way to the policy
    (ref1, pol1), (ref2, _) = seen[0], seen[1]
    for name, value in ref2.items():
        torch.testing.assert_close(value, torch.lerp(ref1[name], pol1[name], 0.25))
    assert any(not torch.equal(ref1[n], ref2[n]) for n in ref1)


def test_iterative_rounds_reset_the_reference_to_the_policy(tiny_dir, pairs_file, tmp_path):
    result = run(job(tiny_dir, pairs_file, tmp_path,
                     model={"lora": {"enabled": True, "r": 4}},
                     reference={"rounds": 2}, optimization={"max_steps": 4},
                     data={"layout": "padded"}))  # fixed batches: ref_kl depends on the batch
    history = result.history
    # steps 1 and 3 start a round: the reference equals the policy, so every reward is 0
    for step in (0, 2):
        assert history[step]["ref_kl"] == pytest.approx(0.0, abs=1e-4)
        assert history[step]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(history[1]["ref_kl"]) > 1e-3 and abs(history[3]["ref_kl"]) > 1e-3


def test_lora_soft_update_keeps_the_policy_and_moves_the_base(tiny_model):
    import peft

    from fastpo.engine.model.reference_sync import soft_update_lora

    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.tensor([[3, 70, 800, 9000, 4, 12]])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0, delta = layer.base_layer.weight.detach().clone(), layer.get_delta_weight("default")
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert soft_update_lora(model, 0.3) == 4
    torch.testing.assert_close(layer.base_layer.weight, w0 + 0.3 * delta)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, policy, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            moved = model(input_ids=ids).logits
    assert (moved - base).abs().max() > 1e-3


def test_precomputed_reference_gives_the_same_losses(tiny_dir, pairs_file, tmp_path):
    separate = run(job(tiny_dir, pairs_file, tmp_path / "a"))
    cache = tmp_path / "cache"
    precomputed = run(job(tiny_dir, pairs_file, tmp_path / "b",
                          reference={"mode": "precomputed", "cache_dir": str(cache)}))
    assert (cache / "train.safetensors").is_file()
    assert losses(precomputed.history) == pytest.approx(losses(separate.history), rel=1e-5)
    again = run(job(tiny_dir, pairs_file, tmp_path / "c",
                    reference={"mode": "precomputed", "cache_dir": str(cache)}))
    assert losses(again.history) == pytest.approx(losses(separate.history), rel=1e-5)
