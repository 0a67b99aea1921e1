"""Helpers shared by the trainer tests (plain process and 2-rank): job dicts, a tiny model and
a tiny judge saved as model folders."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, section by section (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def save_tiny_llama(path: Path, tokenizer, **config: object) -> Path:
    """A tiny random Llama (seed 0) saved with ``tokenizer`` as a model folder at ``path``;
    ``config`` overrides ``tiny_llama_config`` settings (e.g. ``tie_word_embeddings=True``)."""
    from transformers import LlamaForCausalLM

    from fastpo.engine.data.assets import tiny_llama_config

    config = tiny_llama_config(len(tokenizer), initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id, **config)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def save_position_judge(path, tokenizer, multiples):
    """A tiny Llama judge whose next-token logits after any chat question are the same.

    Its attention and MLP outputs are zero (``o_proj``, ``down_proj``), so the hidden state at
    the last position is the embedding of the last token, which the chat template's generation
    prompt fixes (``"<|im_start|>assistant\\n"``); the untied head is zero but for the rows of
    the tokens in ``multiples`` (``{"1": 100.0}``: that multiple of that embedding). So the
    answer and its probabilities do not depend on the question: a judge of position only
    (``{"1": 100.0}`` answers "1" greedily, whatever it is asked)."""
    from transformers import LlamaForCausalLM

    from fastpo.engine.data.assets import tiny_llama_config

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                           add_generation_prompt=True)
    last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    config = tiny_llama_config(len(tokenizer), initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    assert not config.tie_word_embeddings
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for text, multiple in multiples.items():
            (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
            model.lm_head.weight[token] = multiple * model.model.embed_tokens.weight[last]
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def job(tiny_dir, pairs_file, out, **sections) -> dict:
    """A short job on the tiny model and the pairs file (2 steps, no export); ``sections``
    merged over it."""
    base = {
        "model": {"name_or_path": str(tiny_dir)},
        "data": {"train": str(pairs_file), "max_length": 40, "max_prompt_length": 20,
                 "eval_fraction": 0.0},
        "optimization": {"micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": 2,
                         "max_grad_norm": 1.0},
        "logging": {"output_dir": str(out), "progress": "none", "tensorboard": False,
                    "eval_before": False},
        "checkpoint": {"export": "none"},
    }
    return merge(base, sections)


def run(data: dict, **kw):
    """Train the job dict (validated like a config file)."""
    from fastpo.engine.train import train
    from fastpo.engine.train.config_loading import config_from_dict

    return train(config_from_dict(data), **kw)


def losses(history) -> list[float]:
    return [r["loss"] for r in history]


_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


@contextlib.contextmanager
def isolated_launch():
    """Inside: a job may set the launcher's variables and start a process group. After: the
    group is destroyed and the variables are as before, so neither leaks into later tests or the
    subprocesses they start (TRL's Trainer, for one, reads them; a leaked MASTER_PORT names a
    port this process may still hold)."""
    import torch.distributed as dist

    saved = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            groups = sys.modules.get("deepspeed.utils.groups")
            if groups is not None:  # DeepSpeed caches a clone of the world group: gone with it
                groups._WORLD_GROUP = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# A child process that trains a job (argv[1], JSON) and SIGKILLs itself at the end of step argv[2]:
# what a crash or an OOM kill leaves behind, for the exact-resume tests.
KILLED_RUN = """
import json, os, signal, sys
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train import Callback, train

data, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])

class Kill(Callback):
    def on_step_end(self, trainer, step, record):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

train(config_from_dict(data), callbacks=[Kill()])
"""


def run_killed(data: dict, kill_at: int, **kwargs):
    """Train ``data`` in a child process killed after step ``kill_at``; the finished process."""
    import json
    import subprocess

    return subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(data), str(kill_at)],
                          capture_output=True, text=True, timeout=600, **kwargs)


def launch_workers(test_file: str, report_dir: Path, *, world: int, report_env: str
                   ) -> tuple[str, list[dict]]:
    """Run ``test_file --worker`` on ``world`` ranks with DeepSpeed's launcher (one thread each,
    compiled Triton not interpreted); each rank writes ``report_dir/rank<k>.json``. Returns the
    launcher's output and the reports, in rank order, after asserting that every rank wrote."""
    import json
    import socket
    import subprocess

    launcher = Path(sys.executable).with_name("deepspeed")  # deepspeed is a dependency
    assert launcher.exists(), f"deepspeed launcher not found next to {sys.executable}"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env[report_env] = str(report_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [str(launcher), "--num_gpus", str(world), "--master_port", str(port),
         str(Path(test_file).resolve()), "--worker"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    reports = [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]
    assert sorted(r["rank"] for r in reports) == list(range(world)), output[-4000:]
    return output, reports
