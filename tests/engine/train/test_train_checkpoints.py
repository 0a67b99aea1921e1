"""The trainer's checkpoints end to end: a killed run resumes exactly, checkpoints are atomic
and pruned, a named checkpoint is validated, and the merged and full exports reload with
transformers."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from trainer_helpers import job, losses, merge, run, run_killed

from fastpo.engine.train import Callback
from fastpo.engine.train.checkpoint import LATEST, MANIFEST, CheckpointManager, validate_checkpoint
from fastpo.engine.train.metrics_log import read_jsonl

# ------------------------------------------------------------------------- kill and resume


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
    proc = run_killed(killed, 3)
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


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tiny_dir, pairs_file, tmp_path):
    """A job SIGKILLed at several seeded-random moments (the end of a step, mid-step, while a
    checkpoint's files are written, between its rename and ``latest``, inside an evaluation)
    and resumed each time ends with the per-step losses, held-out results and final weights of
    an uninterrupted run, bit for bit."""
    import random

    from safetensors.torch import load_file

    sections = dict(
        model={"lora": {"enabled": True, "r": 4, "dropout": 0.2,
                        "target_modules": ["q_proj", "v_proj", "up_proj"]}},
        data={"eval_fraction": 0.25},
        optimization={"max_steps": 8, "gradient_accumulation_steps": 2},
        logging={"eval_every": 3},
        checkpoint={"every_steps": 2, "keep_last": 2, "export": "adapter"})
    steps = [f"{kind}:{k}" for kind in ("step", "mid-step") for k in range(1, 8)]
    files = [f"checkpoint-files:{k}" for k in (2, 4, 6)]
    seals = [f"checkpoint-seal:{k}" for k in (2, 4, 6)]
    rng = random.Random(2026)
    chosen: dict[int, str] = {}
    for pool in (steps, files, seals, ["eval:3", "eval:6"]):  # one moment of each kind
        moment = rng.choice([m for m in pool if int(m.rsplit(":", 1)[1]) not in chosen])
        chosen[int(moment.rsplit(":", 1)[1])] = moment
    schedule = [chosen[k] for k in sorted(chosen)]  # four moments at distinct steps, in order

    out = tmp_path / "killed"
    data = merge(job(tiny_dir, pairs_file, out, **sections), {"checkpoint": {"resume": True}})
    for moment in schedule:
        proc = run_killed(data, moment)
        assert proc.returncode == -signal.SIGKILL, (moment, proc.stderr[-3000:])
        leftovers = [p.name for p in (out / "checkpoints").glob(".tmp-*")]
        if moment.startswith("checkpoint-files"):
            assert leftovers, moment  # killed inside the write: the next run removes it
    resumed = run(data)
    assert resumed.stopped == "completed" and not list((out / "checkpoints").glob(".tmp-*"))
    straight = run(job(tiny_dir, pairs_file, tmp_path / "straight", **sections))

    def last_per_step(kind: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl", kind)
                if r.get("when") != "before"}

    assert last_per_step("train") == {r["step"]: r["loss"] for r in straight.history}, schedule
    held_out = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl",
                                                         "eval") if r.get("when") != "before"}
    assert last_per_step("eval") == held_out and sorted(held_out) == [3, 6, 8]
    assert resumed.eval_after == straight.eval_after
    killed_weights = load_file(str(resumed.export_dir / "adapter_model.safetensors"))
    straight_weights = load_file(str(straight.export_dir / "adapter_model.safetensors"))
    assert killed_weights.keys() == straight_weights.keys() and killed_weights
    for name, value in straight_weights.items():
        assert killed_weights[name].equal(value), (name, schedule)


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
