"""Real-data suite (``--suite e2e-real``): TRL's DPOTrainer against fastpo-train in each layout.

The job, the same for every row: SmolLM2-135M-Instruct (the embedded weights,
``engine/data/assets``) with LoRA (r 16, α 32, every linear layer of the blocks), sigmoid DPO (β
0.1), AdamW (lr 3e-4), 4 pairs per step, fp32 on CPU (bf16 on CUDA), on the real ``dpo_en_demo``
pairs whose prompt + completion fit 512 tokens (the others are dropped, nothing is truncated). Each
row runs in its own process (the harness), takes ``steps`` optimizer steps per timed call over the
first ``steps`` micro-batches of the epoch's seeded shuffle (the same pairs in the same order for
every row, reset at each call), after one warm-up call; tokens/s counts prompt + completion tokens
of every sequence (a shared prompt counts twice, as in a concatenated batch) over the timed calls.

    trl                    TRL's ``DPOTrainer.compute_loss`` + backward + AdamW, as shipped (its
                           reference = the adapter disabled), no gradient checkpointing
    fastpo_<layout>        ``fastpo.engine.train.Trainer.train_step`` (what ``fastpo-train`` runs,
                           DeepSpeed ZeRO 0 as the default job) with ``data.layout`` padded,
                           packed, shared, shared_packed; length grouping off, so every row sees
                           TRL's batches
    fastpo_padded_grouped  padded rows with length-aware batching (different batches: same pairs
                           over an epoch, less padding)
    fastpo_auto            the default: ``data.layout: auto``
    fastpo_profile         one ``auto`` step cut into stages (collate, policy decoder forward,
                           head/op forward, reference forward, loss, head/op backward, decoder
                           backward, optimizer); the stage times are in the row's notes

Each fastpo row carries the FLOPs of its layout's batches next to padded rows of the same pairs,
and :func:`summary` prints them beside the speed-up over ``fastpo_padded``
(:func:`benchmarks.suites.e2e.layout_figures`).

Memory: the harness's peak resident-set growth during one call (``peak_mem_bytes``) and, in the
notes, the process's peak RSS (model, optimizer and data included).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from benchmarks.harness import CaseSpec, SkipCase, Workload, _status_kib
from benchmarks.suites.e2e import layout_figures, trl_step
from benchmarks.suites.e2e import summary as _summary

LAYOUT_ROWS = ("padded", "packed", "shared", "shared_packed")
IMPLS = ("trl", *(f"fastpo_{n}" for n in LAYOUT_ROWS), "fastpo_padded_grouped", "fastpo_auto",
         "fastpo_profile")
QUICK_IMPLS = ("trl", "fastpo_padded", "fastpo_packed", "fastpo_shared", "fastpo_auto",
               "fastpo_profile")
MAX_LENGTH, PAIRS, BETA, LR = 512, 4, 0.1, 3e-4
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"])


def cases(device: str, size: str) -> list[CaseSpec]:
    """Rows at ``size``: smoke/quick take fewer steps and rows (quick: a few minutes)."""
    if size in ("smoke", "quick"):
        steps, warmup, reps, impls = 1, 1, 1, QUICK_IMPLS
    else:
        steps, warmup, reps, impls = 4, 1, 3, IMPLS
    params = {"steps": steps, "pairs": PAIRS, "max_length": MAX_LENGTH,
              "dtype": "bf16" if device == "cuda" else "fp32"}
    return [CaseSpec(suite="e2e_real", family="dpo_lora_real", impl=impl, params=dict(params),
                     device=device, warmup=warmup if impl != "fastpo_profile" else 1,
                     reps=reps if impl != "fastpo_profile" else 1, timeout_s=1800.0)
            for impl in impls]


# ------------------------------------------------------------------------------ the job
def job_config(layout: str, params: dict[str, Any], device: str, out_dir: str,
               group_by_length: bool = False):
    """The fastpo-train config of the job (the default job at 512 tokens, no truncation)."""
    from fastpo.engine.train.config_loading import load_config

    overrides = [
        ("data.max_length", params["max_length"]), ("data.max_prompt_length",
                                                    params["max_length"]),
        ("data.truncation_mode", "drop"), ("data.eval_fraction", 0.0),
        ("data.layout", layout), ("data.group_by_length", group_by_length),
        ("optimization.micro_batch_size", params["pairs"]),
        ("optimization.max_steps", 100_000), ("optimization.warmup_steps", 0),
        ("optimization.lr_scheduler", "constant"), ("optimization.learning_rate", LR),
        ("optimization.precision", params["dtype"]), ("logging.output_dir", out_dir),
        ("logging.eval_before", False), ("logging.progress", "none"),
        ("logging.tensorboard", False), ("checkpoint.export", "none"),
        ("checkpoint.on_signal", False)]
    return load_config(None, overrides=overrides)


def _process_peak_mib() -> float:
    return (_status_kib("VmHWM") or 0) / 1024


def _step_tokens(dataset, batches) -> int:
    return sum(2 * len(dataset[i].prompt_ids) + len(dataset[i].chosen_ids)
               + len(dataset[i].rejected_ids) for b in batches for i in b)


def _fastpo_trainer(spec: CaseSpec, layout: str, group_by_length: bool = False):
    from fastpo.engine.train import Trainer

    out_dir = tempfile.mkdtemp(prefix="fastpo-bench-real-")
    cfg = job_config(layout, spec.params, spec.device, out_dir, group_by_length)
    return Trainer(cfg)


def _figures(trainer: Any, batches: list[list[int]], device: str) -> dict[str, Any]:
    """The layout FLOPs of ``batches`` as the trainer lays them out, and as padded rows."""
    laid, padded, scored = [], [], 0
    for indices in batches:
        batch = trainer.source.collate(indices)
        laid.append((batch.attention_plan, *batch.input_ids.shape))
        lengths = [len(trainer.train_set[i].prompt_ids) + len(c) for i in indices
                   for c in (trainer.train_set[i].chosen_ids, trainer.train_set[i].rejected_ids)]
        padded.append((len(lengths), max(lengths)))
        scored += int(batch.target_index.numel())
    return layout_figures(laid, padded, config=trainer.backend.module.config, scored=scored,
                          device=device)


def _fastpo_workload(spec: CaseSpec, layout: str, group_by_length: bool = False) -> Workload:
    trainer = _fastpo_trainer(spec, layout, group_by_length)
    steps = spec.params["steps"]
    batches = trainer.source.batches(0)[:steps]
    resolved = trainer.cfg.data.layout
    workload = Workload(lambda: None, tokens=_step_tokens(trainer.train_set, batches),
                        extra=_figures(trainer, batches, spec.device))

    def run() -> float | None:
        trainer.source.rewind()  # the same batches every call
        record: dict[str, Any] = {}
        for _ in range(steps):
            record = trainer.train_step()
        trainer.read_metrics()  # the one host read of the logging step (completes the record)
        workload.notes = (f"fastpo-train step, data.layout {resolved}, {len(trainer.train_set)} "
                          f"pairs ≤ {spec.params['max_length']} tokens; process peak RSS "
                          f"{_process_peak_mib():.0f} MiB")
        return record.get("loss")

    workload.fn = run
    return workload


def summary(group: list[dict[str, Any]]) -> list[str]:
    """The layout rows against ``fastpo_padded`` (:func:`benchmarks.suites.e2e.summary`)."""
    return _summary(group, padded_impl="fastpo_padded")


def _profile_workload(spec: CaseSpec) -> Workload:
    """One ``auto`` step with each stage timed (the device synchronised between stages)."""
    from fastpo.engine.model import forward as fwd

    trainer = _fastpo_trainer(spec, "auto")
    indices = trainer.source.batches(0)[0]
    device = trainer.rt.device
    workload = Workload(lambda: None, tokens=_step_tokens(trainer.train_set, [indices]))
    original = fwd.final_hidden_states
    marks: dict[str, float] = {}

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed_body(model, batch):
        start = sync()
        hidden = original(model, batch)
        marks["body"] = sync() - start
        if hidden.requires_grad:
            hidden.register_hook(lambda g: marks.__setitem__("head_backward_end", sync()))
        return hidden

    def run() -> float:
        stages: dict[str, float] = {}
        fwd.final_hidden_states = timed_body
        try:
            trainer.backend.module.train()
            t = sync()
            batch = trainer.source.collate(indices)
            t, stages["collate"] = sync(), sync() - t
            obj = trainer.objective
            with trainer.backend.autocast():
                policy = fwd.forward_logps(trainer.backend.model, batch,
                                           **trainer.forward_options)
                now = sync()
                stages["policy decoder forward"] = marks["body"]
                stages["policy head/op forward"] = now - t - marks["body"]
                t = now
                reference = trainer.reference.reference_logps(batch,
                                                              with_tail_logps=obj.with_tails)
                t, stages["reference forward"] = sync(), sync() - t
                out = obj(policy, reference, batch)
            t, stages["loss"] = sync(), sync() - t
            trainer.backend.backward(out.loss)
            end = sync()
            stages["head/op backward"] = marks.get("head_backward_end", t) - t
            stages["decoder backward"] = end - marks.get("head_backward_end", t)
            t = end
            trainer.backend.step(nonfinite=out.loss.detach().isfinite().logical_not())
            stages["optimizer"] = sync() - t
        finally:
            fwd.final_hidden_states = original
        total = sum(stages.values())
        workload.notes = (f"data.layout {trainer.cfg.data.layout}; stages (s): " + ", ".join(
            f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in stages.items())
            + f"; process peak RSS {_process_peak_mib():.0f} MiB")
        return float(out.loss.detach())

    workload.fn = run
    return workload


# ------------------------------------------------------------------------------ TRL
def _trl_workload(spec: CaseSpec) -> Workload:
    import datasets
    import trl
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from fastpo.engine.data.assets import default_model_dir
    from fastpo.engine.data.batch import plan_batches
    from fastpo.engine.train.job import load_datasets
    from fastpo.engine.train.model_loading import load_tokenizer, model_path

    params, device = spec.params, spec.device
    cfg = job_config("padded", params, device, tempfile.mkdtemp(prefix="fastpo-bench-trl-"))
    tokenizer = load_tokenizer(cfg, model_path(cfg))
    train, _ = load_datasets(cfg, tokenizer)
    batches = plan_batches(train, pairs_per_batch=params["pairs"], seed=cfg.seed,
                           epoch=0)[: params["steps"]]
    dtype = torch.bfloat16 if params["dtype"] == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype,
                                                attn_implementation="sdpa").to(device)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA))
    out_dir = tempfile.mkdtemp(prefix="fastpo-bench-trl-")
    args = trl.DPOConfig(output_dir=out_dir, report_to="none",
                         per_device_train_batch_size=params["pairs"],
                         max_length=2 * params["max_length"], beta=BETA,
                         loss_type=["sigmoid"], learning_rate=LR,
                         bf16=params["dtype"] == "bf16", gradient_checkpointing=False,
                         use_cpu=device == "cpu", disable_tqdm=True, save_strategy="no")
    words = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * 2
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(words))
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    inputs = []
    for b in batches:
        rows = [{"prompt_ids": train[i].prompt_ids, "chosen_ids": train[i].chosen_ids,
                 "rejected_ids": train[i].rejected_ids} for i in b]
        inputs.append({k: v.to(device) for k, v in collate(rows).items()})
    model = trainer.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    workload = Workload(lambda: None, tokens=_step_tokens(train, batches))

    def run() -> float:
        loss = None
        for batch in inputs:
            loss = trl_step(trainer, model, optimizer, batch)
        workload.notes = (f"TRL {trl.__version__} DPOTrainer.compute_loss, LoRA, no gradient "
                          f"checkpointing; process peak RSS {_process_peak_mib():.0f} MiB")
        return float(loss)

    workload.fn = run
    return workload


def build(spec: CaseSpec) -> Workload:
    """The workload of one row (called in the measuring process)."""
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipCase("no CUDA device")
    if spec.impl == "trl":
        return _trl_workload(spec)
    if spec.impl == "fastpo_profile":
        return _profile_workload(spec)
    if spec.impl == "fastpo_padded_grouped":
        return _fastpo_workload(spec, "padded", group_by_length=True)
    if spec.impl.startswith("fastpo_"):
        layout = spec.impl.removeprefix("fastpo_")
        if layout in (*LAYOUT_ROWS, "auto"):
            return _fastpo_workload(spec, layout)
    raise SkipCase(f"unknown implementation {spec.impl!r}")
