"""Helpers shared by the trainer tests (plain process and 2-rank): job dicts, a tiny model and
a tiny judge saved as model folders."""

from __future__ import annotations

import contextlib
import copy
import json
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


def write_forms(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as JSON, JSONL, CSV, Parquet, Arrow and a save_to_disk folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "rows.json", "jsonl": folder / "rows.jsonl",
             "csv": folder / "rows.csv", "parquet": folder / "rows.parquet",
             "arrow": folder / "rows.arrow", "folder": folder / "saved"}
    paths["json"].write_text(json.dumps(rows))
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.Table.from_pylist(rows)
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["folder"]))
    return paths


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
def importable_module(folder: Path, name: str, source: str):
    """``source`` written as module ``name`` in ``folder``, which is on ``sys.path`` inside the
    block (a function scorer's ``module:function``)."""
    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))


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


# A child process that trains a job (argv[1], JSON) and SIGKILLs itself at a moment of argv[2]:
# what a crash, an OOM kill or a preemption without notice leaves behind, for the exact-resume
# tests. The moment is "N" or "step:N" (the end of step N), "mid-step:N" (step N's backward
# passes done, before its optimizer step), "checkpoint-files:N" (while the checkpoint of step N
# is written: the backend's files are in its .tmp- folder), "checkpoint-seal:N" (the checkpoint of
# step N renamed into place, ``latest`` not yet pointing at it) or "eval:N" (inside the held-out
# evaluation after step N).
KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train import Callback, train
from fastpo.engine.train import checkpoint, evaluation, trainer_checkpoint

data, moment = json.loads(sys.argv[1]), sys.argv[2]
kind, _, at = moment.rpartition(":")
kind, at = kind or "step", int(at)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Kill(Callback):
    def on_step_end(self, trainer, step, record):
        if kind == "step" and step == at:
            die()
    def on_before_optimizer_step(self, trainer):
        if kind == "mid-step" and trainer.pos.step + 1 == at:
            die()

if kind == "checkpoint-files":
    save_rng = trainer_checkpoint.save_rng
    def killing_save_rng(folder, rank):
        if Path(folder).name == f".tmp-step-{at:08d}":
            die()
        return save_rng(folder, rank)
    trainer_checkpoint.save_rng = killing_save_rng
if kind == "checkpoint-seal":
    write_text_atomic = checkpoint.write_text_atomic
    def killing_write(path, text):
        if Path(path).name == checkpoint.LATEST and text.strip() == f"step-{at:08d}":
            die()
        return write_text_atomic(path, text)
    checkpoint.write_text_atomic = killing_write
if kind == "eval":
    run = evaluation.PairEvaluation.run
    def killing_run(self, trainer):
        if trainer.pos.step == at:
            die()
        return run(self, trainer)
    evaluation.PairEvaluation.run = killing_run

train(config_from_dict(data), callbacks=[Kill()])
"""


def run_killed(data: dict, kill_at: int | str, **kwargs):
    """Train ``data`` in a child process SIGKILLed at ``kill_at`` (a step, or a moment of
    ``KILLED_RUN``); the finished process."""
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


# ------------------------------------------------------------------------ the real CLI, faults
def fastpo_train(config: dict, where: Path, *args: str, timeout: float = 600,
                 env: dict | None = None):
    """``fastpo-train --config <where>/job.yaml ARGS`` as a user runs it; the finished
    process (its output captured)."""
    import shutil
    import subprocess

    import yaml

    train = shutil.which("fastpo-train", path=str(Path(sys.executable).parent))
    assert train, "fastpo-train is not installed next to the test's Python"
    path = where / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([train, "--config", str(path), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc) -> str:
    """The one ``fastpo-train: error:`` line of a failed run, after checking that no
    traceback was printed."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastpo-train: error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def can_mount_tmpfs(where: Path) -> bool:
    """Whether this process may mount a size-limited tmpfs (root, in a sandbox that allows it)."""
    import subprocess

    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


@contextlib.contextmanager
def tmpfs(where: Path, **options: object):
    """A tmpfs mounted at ``where`` with ``options`` (``size="100m"``, ``nr_inodes=20``);
    :func:`remount` changes them; unmounted after."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, *flags: str, **options: object) -> None:
    """Change a :func:`tmpfs` mount: ``remount(p, "ro")``, ``remount(p, "rw", size="300m")``."""
    import subprocess

    opts = ",".join(["remount", *flags, *(f"{k}={v}" for k, v in options.items())])
    subprocess.run(["mount", "-o", opts, str(where)], check=True)


def tiny_moe(kind: str, vocab_size: int, **config: object) -> torch.nn.Module:
    """A tiny random MoE causal LM (seed 0): ``"mixtral"`` (Mixtral-style, 4 experts, top-2) or
    ``"qwen2_moe"`` (Qwen-MoE-style: 4 routed experts, top-2, and a shared expert)."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, router_aux_loss_coef=0.05, initializer_range=0.1)
    torch.manual_seed(0)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, **config))
    if kind == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **common, num_experts=4, moe_intermediate_size=24,
            shared_expert_intermediate_size=24, **config))
    raise ValueError(f"unknown MoE kind {kind!r}")


def trainable_gradients(trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full gradient (float64, on the host); under DeepSpeed ZeRO
    assembled from the shards (a collective call: every rank calls it)."""
    out = {}
    for name, param in trainer.backend.module.named_parameters():
        if not param.requires_grad:
            continue
        if trainer.rt.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(param)
        else:
            grad = param.grad
        out[name] = grad.detach().double().cpu().clone()
    return out
