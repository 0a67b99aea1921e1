"""The trainer end to end on a tiny random Llama (SmolLM2 tokenizer) and a few real demo pairs:
every loss type, logging and held-out evaluation, early stopping, packed, shared-prompt and
token-budget batches, and a few steps of the embedded default job. Checkpoints, resume and export:
``test_train_checkpoints.py``; non-finite losses: ``test_train_nonfinite.py``; the reference
strategies in training: ``test_train_reference.py``; the DeepSpeed backend:
``test_train_deepspeed.py``; stopping on a signal: ``test_interrupts.py``."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import job, losses, run

from fastpo.engine.losses import CPO_LOSS_TYPES, KTO_LOSS_TYPES, LOSS_TYPES
from fastpo.engine.train import Callback, cli
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train.metrics_log import read_jsonl

# ------------------------------------------------------------------------- every loss type
LOSS_CASES = (
    [("dpo", t, {"label_smoothing": 0.1} if t == "exo_pair" else {}) for t in LOSS_TYPES]
    + [("dpo", "sigmoid", {"ld_alpha": 0.5}), ("dpo", "sigmoid", {"use_weighting": True}),
       ("dpo", "sigmoid", {"f_divergence_type": "js_divergence"}),
       ("dpo", "sigmoid", {"reference_free": True}),
       ("dpo", ["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]})]
    + [("cpo", t, {}) for t in CPO_LOSS_TYPES] + [("simpo", "simpo", {}), ("orpo", "orpo", {})]
    + [("kto", t, {}) for t in KTO_LOSS_TYPES]
)


@pytest.mark.parametrize("method, loss_type, extra", LOSS_CASES,
                         ids=[f"{m}-{t}-{'-'.join(e)}" for m, t, e in LOSS_CASES])
def test_every_loss_type_trains_two_steps(tiny_dir, pairs_file, tmp_path, method, loss_type,
                                          extra):
    # LoRA keeps these runs short (the optimizer touches the adapter only)
    data = job(tiny_dir, pairs_file, tmp_path, loss={"method": method, "loss_type": loss_type,
                                                     **extra},
               model={"lora": {"enabled": True, "r": 4, "target_modules": "all-linear"}})
    trainer_out = {}

    class Grab(Callback):
        def on_step_end(self, trainer, step, record):
            trainer_out["module"] = trainer.backend.module

    result = run(data, callbacks=[Grab()])
    assert result.steps == 2 and len(result.history) == 2
    for record in result.history:
        assert math.isfinite(record["loss"]) and not record["skipped"]
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
        assert "rewards/chosen" in record and "logps/chosen" in record
    cfg = config_from_dict(data)
    assert ("ref_kl" in result.history[0]) == cfg.loss.needs_reference()
    if method != "kto":
        assert "rewards/accuracies" in result.history[0]
    else:
        assert "kl" in result.history[0]
    adapter = {n: p for n, p in trainer_out["module"].named_parameters() if p.requires_grad}
    assert len(adapter) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    # B starts at zero: every one has moved after two updates
    assert all(p.abs().sum() > 0 for n, p in adapter.items() if "lora_B" in n)


# ----------------------------------------------------------------------- logging and eval
def test_jsonl_eval_and_summary(tiny_dir, pairs_file, tmp_path):
    data = job(tiny_dir, pairs_file, tmp_path,
               data={"eval_fraction": 0.25},
               optimization={"max_steps": 3, "gradient_accumulation_steps": 2,
                             "micro_batch_size": 1, "warmup_steps": 1},
               logging={"eval_every": 2, "eval_before": True})
    result = run(data)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for r in train_records:
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logits/chosen", "nll_loss", "ref_kl", "lr", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 50
    assert train_records[0]["lr"] == pytest.approx(0.5e-3)  # warmup: (0 + 1) / (1 + 1)
    assert train_records[0]["ref_kl"] == 0.0 and train_records[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-6)  # policy = reference at step 1
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["when"], r["step"]) for r in evals] == [("before", 0), ("eval", 2), ("after", 3)]
    assert evals[0]["rewards/accuracies"] == 0.0 and evals[0]["items"] == 4
    assert evals[-1]["rewards/margins"] != 0.0
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["accuracy_before"] == 0.0 and summary["steps"] == 3
    assert result.eval_after["rewards/accuracies"] == summary["accuracy_after"]
    assert (tmp_path / "config.yaml").is_file()


# ------------------------------------------------------------------------ early stopping
def test_early_stopping_on_flat_reward_accuracy(tiny_dir, pairs_file, tmp_path):
    result = run(job(tiny_dir, pairs_file, tmp_path, data={"eval_fraction": 0.25},
                     optimization={"learning_rate": 1e-12, "max_steps": 8},
                     logging={"eval_every": 1, "eval_before": True,
                              "early_stopping_patience": 2, "early_stopping_min_delta": 0.3}))
    assert result.stopped == "early_stopping" and result.steps == 2


def test_packing_and_checkpointing_train_like_padded(tiny_dir, pairs_file, tmp_path):
    # explicit layouts, the same batches (length grouping off: it is a padded-layout choice)
    padded = run(job(tiny_dir, pairs_file, tmp_path / "a", optimization={"max_steps": 3},
                     data={"layout": "padded", "group_by_length": False}))
    packed = run(job(tiny_dir, pairs_file, tmp_path / "b", data={"layout": "packed"},
                     optimization={"max_steps": 3}, model={"gradient_checkpointing": True}))
    assert losses(packed.history) == pytest.approx(losses(padded.history), rel=2e-5, abs=2e-6)
    assert packed.history[0]["tokens"] == padded.history[0]["tokens"]


def test_shared_prompt_trains_like_concatenated_pairs(tiny_dir, pairs_file, tmp_path):
    padded = run(job(tiny_dir, pairs_file, tmp_path / "a", optimization={"max_steps": 3}))
    shared = run(job(tiny_dir, pairs_file, tmp_path / "b", data={"share_prompt": True},
                     optimization={"max_steps": 3}))
    assert losses(shared.history) == pytest.approx(losses(padded.history), rel=2e-5, abs=2e-6)
    assert shared.history[0]["tokens"] == padded.history[0]["tokens"]  # same pairs, same count
    with pytest.raises(ValueError, match="share_prompt"):
        config_from_dict(job(tiny_dir, pairs_file, tmp_path / "c", data={"share_prompt": True},
                             loss={"method": "kto"}))


def test_rng_used_while_resolving_assets_does_not_change_the_run(tiny_dir, pairs_file, tmp_path,
                                                                  monkeypatch):
    """A first run converts the default model (random numbers drawn); a later run finds it
    cached. The LoRA initialisation, and so the losses, must be the same in both."""
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8}}
    warm = run(job(tiny_dir, pairs_file, tmp_path / "a", model=lora))
    from fastpo.engine.train import loop as train_module

    resolve = train_module.model_path

    def converting_model_path(cfg):
        torch.rand(1000)  # what a conversion's model construction does to the global RNG
        return resolve(cfg)

    monkeypatch.setattr(train_module, "model_path", converting_model_path)
    cold = run(job(tiny_dir, pairs_file, tmp_path / "b", model=lora))
    assert losses(cold.history) == losses(warm.history)
    assert losses(cold.history)[1] != losses(cold.history)[0]  # the adapter did train


def test_token_budget_batches_and_bf16_autocast(tiny_dir, pairs_file, tmp_path):
    data = job(tiny_dir, pairs_file, tmp_path / "a", data={"padding_free": True},
               optimization={"max_tokens_per_batch": 160, "max_steps": 3})
    del data["optimization"]["micro_batch_size"]  # the token budget alone
    budget = run(data)
    assert all(0 < r["tokens"] <= 160 for r in budget.history)
    fp32 = run(job(tiny_dir, pairs_file, tmp_path / "b"))
    bf16 = run(job(tiny_dir, pairs_file, tmp_path / "c", optimization={"precision": "bf16"}))
    assert all(math.isfinite(x) for x in losses(bf16.history))
    assert losses(bf16.history) == pytest.approx(losses(fp32.history), abs=2e-2)


# ------------------------------------------------------------------------- the default job
def test_default_job_smoke(tmp_path, capsys):
    """A few steps of the embedded default job (SmolLM2-135M + LoRA, real pairs), shortened."""
    out = tmp_path / "default"
    status = cli.main(["--optimization.max_steps", "2", "--optimization.micro_batch_size", "1",
                       "--data.max_train_items", "2", "--data.max_eval_items", "1",
                       "--data.max_length", "40", "--data.max_prompt_length", "20",
                       "--logging.output_dir", str(out), "--logging.progress", "none"])
    assert status == 0
    assert "held-out reward accuracy 0.000 →" in capsys.readouterr().out
    summary = read_jsonl(out / "metrics.jsonl", "summary")[0]
    assert summary["steps"] == 2 and summary["accuracy_before"] == 0.0
    # before the first step the policy is the reference: every margin 0, the loss log 2
    assert summary["loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["margin_before"] == 0.0
    assert (out / "final" / "adapter_config.json").is_file()


def test_gradient_checkpointing_is_switched_on(tiny_dir, pairs_file, tmp_path, recwarn):
    from fastpo.engine.train.model_loading import load_policy

    cfg = config_from_dict(job(tiny_dir, pairs_file, tmp_path, model={
        "gradient_checkpointing": True}))
    model = load_policy(cfg, str(tiny_dir), torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = (base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing")
            else base.is_gradient_checkpointing)
    assert flag
    assert not [w for w in recwarn if "checkpointing" in str(w.message)
                and "deprecated" in str(w.message)]
