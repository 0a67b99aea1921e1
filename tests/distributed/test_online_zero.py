"""Online DPO on 2 ranks (DeepSpeed ZeRO-2, CPU, gloo): each rank generates its share of a round,
the ranks train on one global batch, and a run resumed from a checkpoint taken between rounds
regenerates the next round and trains exactly like the run that was never stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trainer_helpers import save_tiny_llama

REWARD = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


def _launch(config: dict, path: Path, env: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    cli = Path(sys.executable).with_name("fastpo-train")
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(cli),
                           "--config", str(path)], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _steps(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r and "step" in r}


@pytest.mark.distributed
def test_two_rank_online_run_resumes_exactly(tmp_path, tokenizer):
    model = save_tiny_llama(tmp_path / "model", tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 3}?"}) + "\n"
                               for i in range(16)))
    (tmp_path / "zero_rewards.py").write_text(REWARD)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    job = {
        "model": {"name_or_path": str(model),
                  "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"max_prompt_length": 24},
        "optimization": {"learning_rate": 1e-3, "max_steps": 6, "micro_batch_size": 2},
        "logging": {"output_dir": str(tmp_path / "whole"), "progress": "none",
                    "tensorboard": False, "eval_before": False},
        "checkpoint": {"export": "none", "every_steps": 2, "keep_last": 3},
        "deepspeed": {"enabled": True, "zero_stage": 2},
        "online": {"prompts": str(prompts), "samples_per_prompt": 3, "max_new_tokens": 6,
                   "prompts_per_generation": 4, "steps_per_generation": 2,
                   "scorer": {"function": "zero_rewards:length"}},
    }
    _launch(job, tmp_path / "whole.yaml", env)
    whole = _steps(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert all(r["online/pairs"] > 0 for r in whole.values())
    # a new round starts at steps 1, 3, 5; resume after step 4: round 3 is generated again
    resumed_job = dict(job, logging=dict(job["logging"], output_dir=str(tmp_path / "resumed")),
                       checkpoint=dict(job["checkpoint"], every_steps=0, resume=str(
                           tmp_path / "whole" / "checkpoints" / "step-00000004")))
    _launch(resumed_job, tmp_path / "resumed.yaml", env)
    resumed = _steps(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        for key in ("loss", "online/score_mean", "online/completion_length_mean", "grad_norm"):
            if key in whole[step]:
                assert resumed[step][key] == whole[step][key], (step, key)
