"""The trainer end to end on a tiny random Llama (SmolLM2 tokenizer) and a few real demo pairs:
every loss type, logging, kill-and-resume, atomic checkpoints, export + reload, non-finite
handling, reference sync (TR-DPO, iterative), early stopping, precomputed reference, packing,
DeepSpeed checkpoints of a tied LoRA model, and a few steps of the embedded default job.
Stopping on a signal: ``test_interrupts.py``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from trainer_helpers import job, losses, merge, run

from fastpo.engine.losses import CPO_LOSS_TYPES, KTO_LOSS_TYPES, LOSS_TYPES
from fastpo.engine.train import Callback, NonFiniteError, cli
from fastpo.engine.train.checkpoint import LATEST, MANIFEST, CheckpointManager, validate_checkpoint
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


# ------------------------------------------------------------------------- kill and resume
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from fastpo.engine.train.config_loading import config_from_dict
    from fastpo.engine.train import Callback, train

    data, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])

    class Kill(Callback):
        def on_step_end(self, trainer, step, record):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    train(config_from_dict(data), callbacks=[Kill()])
""")


def test_kill_and_resume_continues_exactly(tiny_dir, pairs_file, tmp_path):
    # 12 training pairs, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch; the run
    # is killed after step 3 (checkpoint at 2), so the resumed run redoes step 3 and crosses the
    # epoch boundary; LoRA dropout makes the RNG state matter
    sections = dict(
        model={"lora": {"enabled": True, "r": 4, "dropout": 0.2,
                        "target_modules": ["q_proj", "v_proj", "up_proj"]}},
        data={"max_train_items": 12},
        optimization={"max_steps": 5, "gradient_accumulation_steps": 2, "warmup_steps": 2},
        checkpoint={"every_steps": 2, "keep_last": 2, "export": "adapter"})
    killed = job(tiny_dir, pairs_file, tmp_path / "killed", **sections)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(killed), "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step-00000002"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000002"]
    first = read_jsonl(tmp_path / "killed" / "metrics.jsonl", "train")
    assert [r["step"] for r in first] == [1, 2, 3]

    resumed = run(merge(killed, {"checkpoint": {"resume": True}}))
    assert [r["step"] for r in resumed.history] == [3, 4, 5]
    assert [r["epoch"] for r in resumed.history] == [0, 1, 1]
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000002", "step-00000004"]
    straight = run(job(tiny_dir, pairs_file, tmp_path / "straight", **sections))
    expected = losses(straight.history)
    assert losses(first) == pytest.approx(expected[:3], rel=1e-6, abs=1e-7)
    assert losses(resumed.history) == pytest.approx(expected[2:], rel=1e-6, abs=1e-7)

    # the exported adapter reloads with plain transformers + PEFT and gives the policy's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                                         str(resumed.export_dir)).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                                          str(straight.export_dir)).eval()
    ids = torch.tensor([[1, 50, 600, 7000, 2]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()(input_ids=ids).logits
    assert not torch.allclose(base, reference(input_ids=ids).logits, atol=1e-4)


def test_merged_and_full_exports_reload_with_transformers(tiny_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([[1, 50, 600, 7000, 2, 31]])
    grab = {}

    class Grab(Callback):
        def on_step_end(self, trainer, step, record):
            grab["module"] = trainer.backend.module

    for name, extra in (("merged", {"model": {"lora": {"enabled": True, "r": 4,
                                                       "target_modules": "all-linear"}}}),
                        ("full", {})):
        result = run(job(tiny_dir, pairs_file, tmp_path / name, checkpoint={"export": name},
                         **extra), callbacks=[Grab()])
        reloaded = AutoModelForCausalLM.from_pretrained(str(result.export_dir)).eval()
        assert not hasattr(reloaded, "peft_config")
        AutoTokenizer.from_pretrained(str(result.export_dir))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits,
                                       grab["module"].eval()(input_ids=ids).logits,
                                       atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------- atomic checkpoints
def make_checkpoint(manager: CheckpointManager, step: int, payload: bytes = b"x" * 100):
    tmp = manager.begin(step)
    (tmp / "model.bin").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "opt.bin").write_bytes(payload * 2)
    return manager.commit(tmp, step)


def test_checkpoints_are_atomic_and_pruned(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest_valid() is None
    for step in (10, 20, 30):
        make_checkpoint(manager, step)
    assert [s for s, _ in manager.checkpoints()] == [20, 30]  # keep_last
    assert manager.latest_valid().name == "step-00000030"
    manifest = json.loads((tmp_path / "step-00000030" / MANIFEST).read_text())
    assert manifest["files"] == {"model.bin": 100, "sub/opt.bin": 200}

    # a checkpoint being written (killed before commit) is never taken
    tmp = manager.begin(40)
    (tmp / "model.bin").write_bytes(b"partial")
    assert manager.latest_valid().name == "step-00000030"
    # a folder that looks final but has no manifest (half-copied) is skipped
    (tmp_path / "step-00000050").mkdir()
    (tmp_path / "step-00000050" / "model.bin").write_bytes(b"y")
    assert manager.latest_valid().name == "step-00000030"

    # truncating a file of the latest checkpoint makes resume fall back to the previous one
    with open(tmp_path / "step-00000030" / "sub" / "opt.bin", "r+b") as f:
        f.truncate(50)
    assert "sub/opt.bin has 50 bytes, the manifest says 200" in validate_checkpoint(
        tmp_path / "step-00000030")
    with caplog.at_level("WARNING"):
        assert manager.latest_valid().name == "step-00000020"
    assert "is not usable" in caplog.text

    # a crash between writing the files and the rename leaves the old latest in place
    manager2 = CheckpointManager(tmp_path / "b", keep_last=3)
    make_checkpoint(manager2, 1)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("step-00000002"):
            raise OSError("disk vanished")
        return real_replace(src, dst)

    os.replace = crash
    try:
        with pytest.raises(OSError, match="disk vanished"):
            make_checkpoint(manager2, 2)
    finally:
        os.replace = real_replace
    assert manager2.latest_valid().name == "step-00000001"
    assert (tmp_path / "b" / LATEST).read_text().strip() == "step-00000001"


def test_resume_from_a_named_checkpoint_is_validated(tiny_dir, pairs_file, tmp_path):
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    with pytest.raises(ValueError, match=r"not a usable checkpoint \(no manifest\.json"):
        run(job(tiny_dir, pairs_file, tmp_path, checkpoint={"resume": str(bad)}))


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
                     reference={"rounds": 2}, optimization={"max_steps": 4}))
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


# ------------------------------------------------------------------------ early stopping
def test_early_stopping_on_flat_reward_accuracy(tiny_dir, pairs_file, tmp_path):
    result = run(job(tiny_dir, pairs_file, tmp_path, data={"eval_fraction": 0.25},
                     optimization={"learning_rate": 1e-12, "max_steps": 8},
                     logging={"eval_every": 1, "eval_before": True,
                              "early_stopping_patience": 2, "early_stopping_min_delta": 0.3}))
    assert result.stopped == "early_stopping" and result.steps == 2


# --------------------------------------------------------------- reference variants, packing
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


def test_packing_and_checkpointing_train_like_padded(tiny_dir, pairs_file, tmp_path):
    padded = run(job(tiny_dir, pairs_file, tmp_path / "a", optimization={"max_steps": 3}))
    packed = run(job(tiny_dir, pairs_file, tmp_path / "b", data={"padding_free": True},
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


def test_deepspeed_lora_checkpoint_leaves_out_a_frozen_tied_head(tokenizer, pairs_file, tmp_path):
    """The frozen lm_head of a tied model is the embedding under a second name: not saved."""
    from trainer_helpers import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    sections = dict(model={"lora": lora}, deepspeed={"enabled": True},
                    optimization={"max_steps": 3}, checkpoint={"every_steps": 2})
    saved = job(model_dir, pairs_file, tmp_path / "a", **sections)
    first = run(saved)
    states = torch.load(tmp_path / "a" / "checkpoints" / "step-00000002" / "deepspeed"
                        / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    names = list(states["module"])
    assert names and all("lora_" in name for name in names), names  # adapters only
    resumed = run(merge(saved, {"logging": {"output_dir": str(tmp_path / "b")},
                                "checkpoint": {"resume": str(tmp_path / "a" / "checkpoints"
                                                             / "step-00000002")}}))
    assert [r["step"] for r in resumed.history] == [3]
    assert losses(resumed.history) == pytest.approx(losses(first.history)[2:], rel=1e-6)
