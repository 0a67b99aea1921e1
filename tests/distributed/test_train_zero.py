"""2 ranks on CPU under the deepspeed launcher (ZeRO-2 and ZeRO-3, tiny model) against one plain
process at the same global batch: the loss trajectory, the gradient norms, the held-out metrics
and the trained weights agree to fp32 round-off. Covers the fused linear op on a ZeRO-3
partitioned lm_head, a ZeRO-3-sharded separate reference, TR-DPO sync under ZeRO-3 (separate
reference and LoRA), KTO's cross-rank KL estimate, and resuming from a DeepSpeed checkpoint.

All 2-rank jobs run in one launcher invocation (the process start-up dominates the cost).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import merge, save_tiny_llama, trainable_gradients

from fastpo.engine.train import Callback, train
from fastpo.engine.train.checkpoint import validate_checkpoint
from fastpo.engine.train.config_loading import config_from_dict

pytestmark = pytest.mark.distributed

SCRIPT = """
import json, sys
import torch
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train import train
sys.path[:0] = [sys.argv[-3], sys.argv[-3] + '/..']  # this file's folder and tests/
from test_train_zero import FirstGradients, SignalOnRank

jobs = json.loads(open(sys.argv[-2]).read())
results = {}
for name, data in jobs.items():
    callbacks = [FirstGradients(data["logging"]["output_dir"] + "/grads.pt")]
    if "_sigterm" in data:
        callbacks.append(SignalOnRank(**data.pop("_sigterm")))
    result = train(config_from_dict(data), callbacks=callbacks)
    results[name] = {"loss": [r["loss"] for r in result.history],
                     "grad_norm": [r["grad_norm"] for r in result.history],
                     "steps": [r["step"] for r in result.history],
                     "eval_after": result.eval_after, "stopped": result.stopped}
if torch.distributed.get_rank() == 0:
    with open(sys.argv[-1], "w") as f:
        json.dump(results, f)
"""


class FirstGradients(Callback):
    """Saves every trainable parameter's full gradient of step 1 (before clipping and the
    optimizer); under ZeRO the gradient is assembled from the shards (a collective call)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer) -> None:
        if trainer.pos.step != 0:
            return
        grads = trainable_gradients(trainer)
        if trainer.rt.is_main:
            torch.save(grads, self.path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer, demo_pairs_path):
    root = tmp_path_factory.mktemp("zero")
    save_tiny_llama(root / "model", tokenizer)
    (root / "pairs.json").write_text(json.dumps(json.loads(demo_pairs_path.read_text())[:20]))
    return root


class SignalOnRank(Callback):
    """SIGTERM to this process at the end of ``step``, on rank ``rank`` only."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer, step, record) -> None:
        if step == self.step and trainer.rt.rank == self.rank:
            signal.raise_signal(signal.SIGTERM)


def jobs(root: Path, world: int) -> dict[str, dict]:
    """The same global batch of 4 pairs per step: 4 per micro-batch in one process, 2 per rank
    with 2 ranks."""
    def out(name):
        return str(root / f"w{world}" / name)

    base = {
        "model": {"name_or_path": str(root / "model")},
        "data": {"train": str(root / "pairs.json"), "max_length": 40, "max_prompt_length": 20,
                 "eval_fraction": 0.2},
        "optimization": {"micro_batch_size": 4 // world, "learning_rate": 2e-3, "max_steps": 3,
                         "max_grad_norm": 0.5, "warmup_steps": 1},
        "deepspeed": {"enabled": world > 1},
        "logging": {"progress": "none", "tensorboard": False, "eval_before": False},
        "checkpoint": {"export": "full"},
    }
    lora = {"enabled": True, "r": 4, "dropout": 0.0, "target_modules": "all-linear"}
    specs = {
        "zero2": {"deepspeed": {"zero_stage": 2}, "checkpoint": {"every_steps": 2}},
        "zero3_sync": {"deepspeed": {"zero_stage": 3},
                       "reference": {"sync_steps": 2, "sync_alpha": 0.5}},
        "zero3_lora_kto": {"deepspeed": {"zero_stage": 3}, "model": {"lora": lora},
                           "loss": {"method": "kto"}, "reference": {"sync_steps": 2},
                           "checkpoint": {"export": "merged"}},
    }
    out_jobs = {}
    for name, spec in specs.items():
        data = merge(base, spec)
        if world == 1:  # the plain single process: no DeepSpeed at all
            data["deepspeed"] = {"enabled": False}
        data["logging"]["output_dir"] = out(name)
        out_jobs[name] = data
    if world > 1:  # resume the ZeRO-2 run from its step-2 DeepSpeed checkpoint
        out_jobs["zero2_resume"] = merge(out_jobs["zero2"], {
            "logging": {"output_dir": out("zero2_resume")},
            "checkpoint": {"every_steps": 0, "export": "none",
                           "resume": str(Path(out("zero2")) / "checkpoints" / "step-00000002")}})
        # only rank 1 is told to stop: both ranks must stop after the same step
        out_jobs["zero2_sigterm"] = merge(out_jobs["zero2"], {
            "logging": {"output_dir": out("zero2_sigterm")},
            "checkpoint": {"every_steps": 0, "export": "none"}})
        out_jobs["zero2_sigterm"]["_sigterm"] = {"step": 1, "rank": 1}
    return out_jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process(assets, tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher is not installed (deepspeed is a dependency)"
    (tmp_path / "jobs.json").write_text(json.dumps(jobs(assets, 2)))
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()),
         str(tmp_path / "script.py"), str(Path(__file__).parent), str(tmp_path / "jobs.json"),
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    multi = json.loads((tmp_path / "out.json").read_text())

    for name, data in jobs(assets, 1).items():
        single = train(config_from_dict(data),
                       callbacks=[FirstGradients(data["logging"]["output_dir"] + "/grads.pt")])
        got = multi[name]
        # the full gradient of every trainable tensor at step 1 (ZeRO-3: the fused linear op's
        # gradient of the gathered lm_head reduce-scattered into the shards, then reassembled)
        ours = torch.load(Path(data["logging"]["output_dir"]) / "grads.pt")
        theirs = torch.load(assets / "w2" / name / "grads.pt")
        assert ours.keys() == theirs.keys() and ours
        assert sum(g.norm() > 0 for g in ours.values()) >= len(ours) // 2
        for key, grad in ours.items():  # (LoRA A has a zero gradient while B is still 0)
            error = (theirs[key] - grad).norm() / grad.norm().clamp(min=1e-30)
            assert error < 1e-5 if grad.norm() > 0 else theirs[key].norm() == 0, (name, key)
        assert got["steps"] == [1, 2, 3]
        assert got["loss"] == pytest.approx([r["loss"] for r in single.history],
                                            rel=1e-5, abs=1e-6), name
        assert got["grad_norm"] == pytest.approx([r["grad_norm"] for r in single.history],
                                                 rel=1e-5, abs=1e-6), name
        # held-out rewards are β·(sums of ~40 fp32 log-probs of ~-10): round-off ~1e-5
        for key in ("items", "loss", "rewards/accuracies", "rewards/margins"):
            assert got["eval_after"][key] == pytest.approx(single.eval_after[key], rel=1e-4,
                                                           abs=1e-5), (name, key)
        # the exported weights (gathered from the ZeRO shards) equal the single process's: the
        # update of every tensor agrees to 1e-3 relative (Adam divides by sqrt(v) + eps: the
        # 1e-6 round-off of a near-zero gradient can move single elements by % of the lr)
        from safetensors.torch import load_file

        start = load_file(str(assets / "model" / "model.safetensors"))
        ours = load_file(str(single.export_dir / "model.safetensors"))
        theirs = load_file(str(assets / "w2" / name / "final" / "model.safetensors"))
        assert ours.keys() == theirs.keys() == start.keys()
        for key in ours:  # (frozen tensors of a merged LoRA export do not move)
            update = (ours[key] - start[key]).norm()
            error = (theirs[key] - ours[key]).norm() / update.clamp(min=1e-30)
            assert error < 1e-3 if update > 0 else torch.equal(theirs[key], ours[key]), (name, key)
    # the run resumed from the DeepSpeed checkpoint of step 2 recomputes step 3 exactly
    assert multi["zero2_resume"]["steps"] == [3]
    assert multi["zero2_resume"]["loss"] == pytest.approx(multi["zero2"]["loss"][2:], rel=1e-6)
    # SIGTERM on rank 1 after step 1: both ranks stopped there (else rank 0 would wait in step
    # 2's collectives until the timeout) and wrote a complete checkpoint of step 1
    assert multi["zero2_sigterm"]["stopped"] == "signal"
    assert multi["zero2_sigterm"]["steps"] == [1]
    assert multi["zero2_sigterm"]["loss"] == pytest.approx(multi["zero2"]["loss"][:1], rel=1e-6)
    ckpt = assets / "w2" / "zero2_sigterm" / "checkpoints" / "step-00000001"
    assert validate_checkpoint(ckpt) is None
