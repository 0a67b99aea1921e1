"""The ``train`` extra (``pip install 'fastpo[train]'``), checked in its own venv: ``fastpo-train``
runs a tiny job to completion offline and online, and ``--resume`` continues a run exactly.

Run by ``install_paths.py`` (``make test-install``) with the fresh venv's python, from a scratch
folder outside the checkout; not collected by pytest. Arguments: the SmolLM2 tokenizer folder
and the demo pairs file (both from the dev venv's asset cache; nothing is downloaded).

1. ``import fastpo`` and the ops still import none of the trainer (installed here).
2. A tiny random Llama with the real tokenizer, saved as a model folder; 8 real pairs.
3. ``fastpo-train --config job.yaml``: 4 steps (constant learning rate, a checkpoint every 2).
4. The same job stopped at 2 steps, then ``fastpo-train --config job.yaml --resume``: steps 3-4
   continue from the step-2 checkpoint with the losses of the uninterrupted run.
5. Online DPO (LoRA, pairs generated each round and scored by a function scorer): 2 steps.
Each run is the console script of the venv, as a user starts it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from check_kernels_only import check_ops, fail

STEPS = 4
REWARDS = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


def fastpo_train(work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the venv's ``fastpo-train`` in ``work``; its output (exit status 0 asserted)."""
    script = Path(sys.executable).with_name("fastpo-train")
    if not script.is_file():
        fail(f"the console script {script} was not installed")
    proc = subprocess.run([str(script), *args], cwd=work, capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        fail(f"fastpo-train {' '.join(args)} exited {proc.returncode}:\n{output[-3000:]}")
    return output


def train_records(out: Path) -> dict[int, dict]:
    """The last ``train`` record of each step in ``out/metrics.jsonl``."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            records[record["step"]] = record
    return records


def write_job(work: Path, model: Path, pairs: Path) -> Path:
    import yaml

    job = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(pairs), "max_length": 40, "max_prompt_length": 20,
                 "eval_fraction": 0.0},
        "optimization": {"micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": STEPS,
                         "lr_scheduler": "constant", "max_grad_norm": 1.0},
        "logging": {"output_dir": "full", "progress": "none", "tensorboard": False,
                    "eval_before": False},
        "checkpoint": {"export": "none", "every_steps": 2},
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def main() -> None:
    tokenizer_dir, demo_pairs = Path(sys.argv[1]), Path(sys.argv[2])
    work = Path.cwd()
    print(f"train install: {check_ops()}", flush=True)

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fastpo.engine.data.assets import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_llama_config(len(tokenizer), initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = work / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(str(model))
    tokenizer.save_pretrained(str(model))
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps(json.loads(demo_pairs.read_text())[:8]))
    job = write_job(work, model, pairs)

    # offline, to completion
    fastpo_train(work, "--config", str(job))
    full = train_records(work / "full")
    if sorted(full) != list(range(1, STEPS + 1)):
        fail(f"the offline run logged steps {sorted(full)}, not 1-{STEPS}")
    if not all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in full.values()):
        fail(f"a step without a finite loss and a gradient: {list(full.values())}")

    # stopped after 2 steps, then resumed from its checkpoint
    fastpo_train(work, "--config", str(job), "--logging.output_dir", "part",
                 "--optimization.max_steps", "2")
    if sorted(train_records(work / "part")) != [1, 2]:
        fail("the 2-step run did not log steps 1-2")
    output = fastpo_train(work, "--config", str(job), "--logging.output_dir", "part", "--resume")
    part = train_records(work / "part")
    # appended by the second run: steps 3-4 only (a fresh start would log steps 1-2 again)
    logged = [(r["kind"], r.get("step")) for r in map(json.loads, (
        work / "part" / "metrics.jsonl").read_text().splitlines()) if r["kind"] != "eval"]
    want = [("train", 1), ("train", 2), ("summary", None), ("train", 3), ("train", 4),
            ("summary", None)]
    if logged != want:
        fail(f"the run and its --resume logged {logged}, not {want}:\n{output[-2000:]}")
    for step in (3, 4):
        a, b = full[step]["loss"], part[step]["loss"]
        if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7):
            fail(f"step {step} after --resume: loss {b}, the uninterrupted run's {a}")

    # online DPO with a function scorer (a module on PYTHONPATH)
    rewards = work / "rewards"
    rewards.mkdir()
    (rewards / "install_rewards.py").write_text(REWARDS)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 3}?"}) + "\n"
                               for i in range(8)))
    online = ["--config", str(job), "--logging.output_dir", "online",
              "--optimization.max_steps", "2", "--checkpoint.every_steps", "0",
              "--model.lora.enabled", "true", "--model.lora.r", "4",
              "--online.prompts", str(prompts), "--online.samples_per_prompt", "3",
              "--online.max_new_tokens", "6", "--online.prompts_per_generation", "4",
              "--online.steps_per_generation", "2",
              "--online.scorer.function", "install_rewards:length"]
    fastpo_train(work, *online, env={**os.environ, "PYTHONPATH": str(rewards)})
    steps = train_records(work / "online")
    if sorted(steps) != [1, 2] or not all(r.get("online/pairs", 0) > 0 and
                                           math.isfinite(r["loss"]) for r in steps.values()):
        fail(f"the online run did not train 2 steps on generated pairs: {list(steps.values())}")
    import transformers

    print(f"train install: ok (torch {torch.__version__}, transformers "
          f"{transformers.__version__}: fastpo-train offline {STEPS} steps, resumed 2 -> {STEPS} "
          f"with the same losses, online 2 steps on {steps[1]['online/pairs']:.0f} scored pairs "
          "per step)")


if __name__ == "__main__":
    main()
