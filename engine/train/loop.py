"""The training job: data → batches → policy/reference log-probs → loss → (DeepSpeed) step.

    from fastpo.engine.train.config_loading import load_config
    from fastpo.engine.train import train
    result = train(load_config("job.yaml", overrides=["--loss.beta", "0.2"]))

One code path for a plain process and for N ranks under the ``deepspeed`` launcher: each rank
takes its shard of every global batch (``plan_batches(num_shards=world)``), so the run sees
``micro_batch_size × gradient_accumulation_steps × world_size`` items per step whatever the
layout. Every ``log_every`` steps the loss, TRL's metrics, the policy/reference KL estimate,
tokens/s and peak memory go to the progress bar, ``metrics.jsonl`` and TensorBoard; evaluation
on the held-out split reports reward accuracy and margins; checkpoints are atomic
(``checkpoint.py``) and ``checkpoint.resume`` continues a killed run exactly.

No host synchronization between logging points: losses, metrics, non-finite counts and the
gradient norm stay on the device (:class:`~.metrics_log.StepMetrics`) until the next logging
point (or checkpoint, evaluation, stop) reads them in one packed collective and one copy; a
non-finite step is skipped on the device and ``on_nonfinite: stop`` raises at that read. A
held-out loss that is not finite fails the run (:class:`NonFiniteError`, exit status 1).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.batch import PreferenceBatch, collate_batch, plan_batches, rank_share
from ..model.forward import forward_logps
from .checkpoint import (
    STATE_FILE,
    CheckpointManager,
    load_rng,
    resume_point,
    save_rng,
    seed_everything,
    write_text_atomic,
)
from .config import TrainConfig
from .config_loading import to_yaml
from .interrupts import StopSignals
from .job import build_reference, load_datasets
from .layout import resolve_layout
from .metrics_log import RunLogger, StepMetrics, gather_ranks, peak_memory_mb, setup_logging
from .model_loading import (
    export_model,
    load_dtype,
    load_policy,
    load_tokenizer,
    model_path,
    vocab_size,
)
from .objective import Objective, summarize_eval
from .reports import (
    eval_text,
    nonfinite_eval_text,
    nonfinite_step_text,
    progress_text,
    run_summary,
    summary_text,
)
from .runtime import DeepSpeedBackend, TorchBackend, init_runtime, zero3_loading

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf and ``on_nonfinite`` is ``stop``, or a held-out
    loss is not finite."""


@dataclass
class TrainResult:
    steps: int
    stopped: str  # "completed" | "early_stopping" | "signal"
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    output_dir: Path
    export_dir: Path | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_signal: int | None = None  # the signal that stopped the run (stopped == "signal")


@dataclass
class _Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0


class Callback:
    """Hooks into the loop (all no-ops); e.g. tests kill the process at a chosen point."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """After the step's backward passes, before the optimizer (gradients in place)."""

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None: ...

    def on_eval(self, trainer: Trainer, step: int, result: dict[str, float]) -> None: ...


class Trainer:
    def __init__(self, cfg: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.rt = init_runtime(cfg)
        setup_logging(self.rt.rank)
        seed_everything(cfg.seed)
        self.output_dir = Path(cfg.logging.output_dir)
        self.pos = _Position()
        self.eval_before: dict[str, float] | None = None
        self.best_eval: float | None = None
        self.bad_evals = 0
        self.ref_version = 0
        self.history: list[dict[str, Any]] = []
        self._eval_ref_cache: dict[tuple[int, int], Any] = {}
        self._setup()
        self.step_metrics = StepMetrics(self.rt.device)
        self._unread: list[dict[str, Any]] = []  # records of steps not read back yet
        self._window_start = time.perf_counter()

    # ------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.base_path = model_path(cfg)
        self.tokenizer = load_tokenizer(cfg, self.base_path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.train_set, self.eval_set = load_datasets(cfg, self.tokenizer)
        resolve_layout(cfg, self.train_set, model_path=self.base_path,  # data.layout: auto
                       device_type=rt.device.type, with_kl=self.objective_with_kl())
        self.epoch_batches: dict[int, list[list[int]]] = {}
        opt = cfg.optimization
        per_epoch = len(self._batches(0)) // opt.gradient_accumulation_steps
        if per_epoch == 0:
            raise ValueError(
                f"the training split ({len(self.train_set)} items) makes no full step of "
                f"{opt.gradient_accumulation_steps} micro-batches × {rt.world_size} ranks; "
                "lower the batch size or accumulation, or add data")
        self.total_steps = opt.max_steps or sum(
            len(self._batches(e)) // opt.gradient_accumulation_steps
            for e in range(opt.num_epochs))
        dtype = load_dtype(cfg)
        self.ds_config = None
        if rt.deepspeed:
            from .deepspeed_config import build_deepspeed_config

            self.ds_config = build_deepspeed_config(cfg, world_size=rt.world_size)
        with zero3_loading(self.ds_config):
            # seed again: a first run converts the default assets above, and that draws random
            # numbers; the adapter's initialisation must not depend on whether the cache was warm
            seed_everything(cfg.seed)
            policy = load_policy(cfg, self.base_path, dtype)
            self.vocab_size = vocab_size(policy)
            # the reference is built before DeepSpeed wraps the policy: a precomputed cache runs
            # it once over the data, and a separate ZeRO-3 reference gets its own engine
            self.reference = build_reference(
                cfg, policy=policy, base_path=self.base_path, dtype=dtype, runtime=rt,
                ds_config=self.ds_config, datasets=(self.train_set, self.eval_set),
                pad_token_id=self.pad_id)
            if rt.deepspeed:
                self.backend: TorchBackend | DeepSpeedBackend = DeepSpeedBackend(
                    policy, cfg, self.ds_config, total_steps=self.total_steps)
            else:
                self.backend = TorchBackend(policy, cfg, total_steps=self.total_steps,
                                            device=rt.device)
            self.reference.attach(self.backend.module)  # the (possibly DeepSpeed-cast) policy
        self.objective = Objective(cfg.loss, vocab_size=self.vocab_size,
                                   all_reduce_mean=self._all_reduce_mean)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.output_dir / "checkpoints",
                                      keep_last=cfg.checkpoint.keep_last, rank=rt.rank,
                                      barrier=rt.barrier)
        self._resume()
        self.log = RunLogger(self.output_dir, enabled=rt.is_main, progress=cfg.logging.progress,
                             tensorboard=cfg.logging.tensorboard, total_steps=self.total_steps,
                             initial_step=self.pos.step)
        if rt.is_main:
            write_text_atomic(self.output_dir / "config.yaml", to_yaml(cfg))
        # the stop-signal agreement is host state: reduced on the CPU (gloo), no device sync
        self._host_group = None
        if rt.world_size > 1 and torch.distributed.get_backend() != "gloo":
            self._host_group = torch.distributed.new_group(backend="gloo")

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size == 1:
            return t
        t = t.detach().clone()
        return self.rt.all_reduce_(t) / self.rt.world_size

    def _batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (dataset indices) of ``epoch``."""
        if epoch not in self.epoch_batches:
            opt, data = self.cfg.optimization, self.cfg.data
            self.epoch_batches = {epoch: plan_batches(
                self.train_set, pairs_per_batch=opt.pairs_per_batch(),
                max_tokens_per_batch=opt.max_tokens_per_batch,
                shuffle=True, seed=self.cfg.seed, epoch=epoch, padding_free=data.padding_free,
                share_prompt=data.share_prompt, group_by_length=data.length_grouping(),
                with_kl=self.objective_with_kl(), num_shards=self.rt.world_size,
                shard_index=self.rt.rank)}
        return self.epoch_batches[epoch]

    def objective_with_kl(self) -> bool:
        return self.cfg.loss.method == "kto" and "kto" in self.cfg.loss.resolved_loss_types()

    def _collate(self, dataset: Any, indices: list[int]) -> PreferenceBatch:
        """The micro-batch on the device: collated on the host, pinned and copied without
        blocking on CUDA (the copy overlaps the work already queued)."""
        batch = collate_batch(dataset, indices, pad_token_id=self.pad_id,
                              padding_free=self.cfg.data.padding_free,
                              share_prompt=self.cfg.data.share_prompt,
                              with_kl=self.objective_with_kl())
        if self.rt.device.type == "cuda":
            return batch.pin_memory().to(self.rt.device, non_blocking=True)
        return batch.to(self.rt.device)

    # ------------------------------------------------------------------------------ resume
    def _state(self) -> dict[str, Any]:
        return {"step": self.pos.step, "epoch": self.pos.epoch,
                "step_in_epoch": self.pos.step_in_epoch, "eval_before": self.eval_before,
                "best_eval": self.best_eval, "bad_evals": self.bad_evals,
                "ref_version": self.ref_version, "world_size": self.rt.world_size,
                "total_steps": self.total_steps}

    def _reference_follows(self) -> bool:
        return self.cfg.reference.sync_steps > 0 or self.cfg.reference.rounds > 1

    def _resume(self) -> None:
        found = resume_point(self.ckpt, self.cfg.checkpoint.resume, world_size=self.rt.world_size)
        if found is None:
            return
        folder, state = found
        self.backend.load(folder)
        reference_file = folder / "reference.safetensors"
        if reference_file.is_file():
            from .safe_load import load_safetensors

            self.reference.load_state_dict(load_safetensors(reference_file),
                                           source=str(reference_file))
        self.pos = _Position(state["step"], state["epoch"], state["step_in_epoch"])
        self.eval_before = state.get("eval_before")
        self.best_eval = state.get("best_eval")
        self.bad_evals = state.get("bad_evals", 0)
        self.ref_version = state.get("ref_version", 0)
        load_rng(folder, self.rt.rank)
        logger.info("resumed from %s at step %d (epoch %d)", folder, self.pos.step, self.pos.epoch)

    def save_checkpoint(self) -> Path:
        self.read_metrics()  # never checkpoint past a non-finite step that stop would refuse
        step = self.pos.step
        tmp = self.ckpt.begin(step)
        follows = self._reference_follows()
        self.backend.save(tmp, rank=self.rt.rank,
                          include_frozen=follows and self.cfg.model.lora.enabled)
        state = self.reference.state_dict() if follows else {}
        if state:
            if self.rt.is_main:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state.items()},
                          str(tmp / "reference.safetensors"))
        save_rng(tmp, self.rt.rank)
        if self.rt.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(self._state(), indent=1), encoding="utf-8")
        path = self.ckpt.commit(tmp, step)
        for cb in self.callbacks:
            cb.on_checkpoint(self, step, path)
        self._window_start = time.perf_counter()
        return path

    # ------------------------------------------------------------------------------ steps
    def _micro_batches(self) -> Iterator[list[int]]:
        """The micro-batches of the next optimizer step (advancing epochs as needed)."""
        ga = self.cfg.optimization.gradient_accumulation_steps
        while (self.pos.step_in_epoch + 1) * ga > len(self._batches(self.pos.epoch)):
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
        batches = self._batches(self.pos.epoch)
        start = self.pos.step_in_epoch * ga
        yield from batches[start:start + ga]

    def _forward(self, batch: PreferenceBatch,
                 reference_logps: Callable[[PreferenceBatch], Any] | None = None):
        """The objective's output for ``batch``: policy, then reference log-probs (by default
        the reference's, for training), under the backend's autocast."""
        obj = self.objective
        with self.backend.autocast():
            policy = forward_logps(self.backend.model, batch,
                                   use_fused_linear=self.cfg.model.use_fused_linear,
                                   with_logits_sum=True, with_tail_logps=obj.with_tails,
                                   with_log_sum_sq_probs=obj.with_sum_sq)
            if reference_logps is None:
                reference = self.reference.reference_logps(batch, with_tail_logps=obj.with_tails)
            else:
                reference = reference_logps(batch)
            return obj(policy, reference, batch)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the accumulation's micro-batches, no host synchronization: the
        record gets the device's values (loss, metrics, skipped, ...) at :meth:`read_metrics`."""
        t0 = time.perf_counter()
        self.backend.module.train()
        tokens = 0
        for indices in self._micro_batches():
            batch = self._collate(self.train_set, indices)
            out = self._forward(batch)
            self.step_metrics.add(out.loss, out.metrics)
            self.backend.backward(out.loss)
            tokens += batch.num_sequence_tokens
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        lr = self.backend.lr()  # the rate this step's update uses
        # a non-finite loss in any micro-batch skips the update on the device
        outcome = self.backend.step(nonfinite=self.step_metrics.nonfinite_losses())
        self.step_metrics.end_step(grad_norm=outcome.grad_norm, applied=outcome.applied,
                                   tokens=tokens, peak_memory_mb=peak_memory_mb(self.rt.device))
        self.pos.step += 1
        self.pos.step_in_epoch += 1
        record = {"step": self.pos.step, "epoch": self.pos.epoch, "lr": lr,
                  "step_seconds": time.perf_counter() - t0}
        self._unread.append(record)
        return record

    def read_metrics(self) -> None:
        """Complete the records of the steps since the last read (one packed collective, one
        copy); a skipped step raises :class:`NonFiniteError` under ``stop``, else warns."""
        records, self._unread = self._unread, []
        if not records:
            return
        steps = self.step_metrics.read(functools.partial(gather_ranks,
                                                         world_size=self.rt.world_size))
        now = time.perf_counter()
        seconds, self._window_start = max(now - self._window_start, 1e-9), now
        # the only honest clock without a sync per step: the read waits for the device
        tokens_per_s = sum(s["tokens"] for s in steps) / seconds
        stop = self.cfg.optimization.on_nonfinite == "stop"
        for record, values in zip(records, steps):
            applied, nonfinite = values.pop("applied"), values.pop("nonfinite_losses")
            record.update(values, skipped=not applied, tokens_per_s=tokens_per_s)
            if applied:
                continue
            problem = nonfinite_step_text(record, nonfinite)
            if stop:
                raise NonFiniteError(f"{problem}; the update was skipped. Set "
                                     "optimization.on_nonfinite: skip to skip such steps, or "
                                     "lower the learning rate")
            logger.warning("%s: the step's update was skipped", problem)

    def _logging_step(self) -> bool:
        return self.pos.step % self.cfg.logging.log_every == 0 \
            or self.pos.step == self.total_steps

    # ------------------------------------------------------------------------------- eval
    def _eval_batches(self) -> list[tuple[list[int], bool]]:
        """This rank's eval batches, the same number on every rank (see ``rank_share``)."""
        opt, data = self.cfg.optimization, self.cfg.data
        batches = plan_batches(self.eval_set, pairs_per_batch=opt.pairs_per_batch(),
                               max_tokens_per_batch=opt.max_tokens_per_batch, shuffle=False,
                               padding_free=data.padding_free, with_kl=self.objective_with_kl(),
                               share_prompt=data.share_prompt)
        return rank_share(batches, rank=self.rt.rank, world_size=self.rt.world_size)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Held-out loss, reward accuracy, margins and rewards (summed over every rank; read
        once, after the last batch)."""
        self.read_metrics()
        if len(self.eval_set) == 0:
            return None
        module = self.backend.module
        was_training = module.training
        module.eval()
        obj = self.objective
        total = torch.zeros(8, dtype=torch.float64, device=self.rt.device)
        self.reference.use("eval")
        try:
            for i, (indices, counts) in enumerate(self._eval_batches()):
                batch = self._collate(self.eval_set, indices)
                out = self._forward(batch, functools.partial(self._eval_reference, i))
                if counts:
                    total += out.eval_sums.to(total.device)
        finally:
            module.train(was_training)
            self.reference.use("train")
        self.rt.all_reduce_(total)
        result = summarize_eval(total, paired=obj.paired)  # the evaluation's one read
        self._window_start = time.perf_counter()  # tokens/s counts training time only
        return result

    def _eval_reference(self, i: int, batch: PreferenceBatch):
        """Reference log-probs of eval batch ``i``, cached until the reference changes."""
        key = (self.ref_version, i)
        if key not in self._eval_ref_cache:
            self._eval_ref_cache = {k: v for k, v in self._eval_ref_cache.items()
                                    if k[0] == self.ref_version}
            self._eval_ref_cache[key] = self.reference.reference_logps(
                batch, with_tail_logps=self.objective.with_tails)
        return self._eval_ref_cache[key]

    def _after_eval(self, result: dict[str, float]) -> bool:
        """Track the best accuracy; True when early stopping says stop."""
        log = self.cfg.logging
        acc = result["rewards/accuracies"]
        if self.best_eval is None or acc > self.best_eval + log.early_stopping_min_delta:
            self.best_eval, self.bad_evals = acc, 0
            return False
        self.bad_evals += 1
        return bool(log.early_stopping_patience and self.bad_evals >= log.early_stopping_patience)

    # ------------------------------------------------------------------------ reference sync
    def _sync_reference(self, alpha: float) -> None:
        self.reference.soft_update(self.backend.module, alpha)
        self.ref_version += 1
        logger.info("step %d: reference ← %.3g·policy + %.3g·reference", self.pos.step, alpha,
                    1 - alpha)

    def _maybe_sync(self) -> None:
        ref, step = self.cfg.reference, self.pos.step
        if step >= self.total_steps:
            return
        round_len = self.total_steps // ref.rounds if ref.rounds > 1 else 0
        if round_len and step % round_len == 0:
            self._sync_reference(1.0)
        elif ref.sync_steps and step % ref.sync_steps == 0:
            self._sync_reference(ref.sync_alpha)

    # -------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        with StopSignals() if self.cfg.checkpoint.on_signal else contextlib.nullcontext() as sig:
            return self._run(sig)

    def _signalled(self, signals: StopSignals | None) -> int | None:
        """The stop signal any rank received (all ranks agree), or None."""
        local = signals.received if signals else None
        if self.rt.world_size == 1:
            return local
        got = torch.tensor([float(local or 0)])  # host memory, reduced by gloo: no device sync
        torch.distributed.all_reduce(got, op=torch.distributed.ReduceOp.MAX,
                                     group=self._host_group)
        return int(got[0]) or None

    def _run(self, signals: StopSignals | None) -> TrainResult:
        cfg, t_start = self.cfg, time.perf_counter()
        log = cfg.logging
        stopped, stop_signal = "completed", None
        try:
            if self.pos.step == 0 and log.eval_before:
                self.eval_before = self.evaluate()
                self._report_eval("before", self.eval_before)
                if self.eval_before is not None:
                    self._after_eval(self.eval_before)
            self._window_start = time.perf_counter()
            while self.pos.step < self.total_steps:
                record = self.train_step()
                self.history.append(record)
                if self._logging_step():
                    self.read_metrics()
                    self.log.log(record)
                    self.log.update_progress(self.pos.step, progress_text(record))
                for cb in self.callbacks:
                    cb.on_step_end(self, self.pos.step, record)
                self._maybe_sync()
                stop_signal = self._signalled(signals)
                if stop_signal is not None:
                    path = self.save_checkpoint()  # reads the steps' metrics first
                    stopped = "signal"
                    self.log.message(f"{signal.Signals(stop_signal).name}: stopped after step "
                                     f"{self.pos.step}, checkpoint {path}; run again with "
                                     "--resume to continue")
                    break
                stop = False
                if log.eval_every and self.pos.step % log.eval_every == 0 \
                        and self.pos.step < self.total_steps:
                    result = self.evaluate()
                    self._report_eval("eval", result)
                    stop = result is not None and self._after_eval(result)
                every = cfg.checkpoint.every_steps
                if every and self.pos.step % every == 0:
                    self.save_checkpoint()
                if stop:
                    stopped = "early_stopping"
                    self.log.message(f"early stopping at step {self.pos.step}: no reward-accuracy "
                                     f"gain in {self.bad_evals} evaluations")
                    break
            self.read_metrics()
            eval_after, export_dir = None, None
            if stopped != "signal":  # a preempted job has seconds left: no evaluation, no export
                eval_after = self.evaluate()
                self._report_eval("after", eval_after)
                export_dir = export_model(
                    cfg, self.backend.module, self.tokenizer,
                    Path(cfg.checkpoint.export_dir or self.output_dir / "final"),
                    base_path=self.base_path, rank=self.rt.rank, barrier=self.rt.barrier)
            result = TrainResult(self.pos.step, stopped, self.eval_before, eval_after,
                                 self.output_dir, export_dir, time.perf_counter() - t_start,
                                 self.history, stop_signal)
            self._report_summary(result)
            return result
        finally:
            self.log.close()

    def _report_eval(self, when: str, result: dict[str, float] | None) -> None:
        if result is None:
            return
        self.log.log({"step": self.pos.step, "when": when, **result}, kind="eval")
        self.log.message(eval_text(when, self.pos.step, result))
        for cb in self.callbacks:
            cb.on_eval(self, self.pos.step, result)
        if not math.isfinite(result["loss"]):
            raise NonFiniteError(nonfinite_eval_text(when, self.pos.step, result))

    def _report_summary(self, result: TrainResult) -> None:
        summary = run_summary(steps=result.steps, stopped=result.stopped, seconds=result.seconds,
                              eval_before=result.eval_before, eval_after=result.eval_after,
                              export_dir=result.export_dir)
        self.log.log(summary, kind="summary")
        text = summary_text(summary)
        if text is not None:
            self.log.message(text)


def train(cfg: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run the job described by ``cfg``; see :class:`Trainer`. Its paths are checked first, so a
    missing file or an output folder that is a file is named before any model loads."""
    from .config_loading import check_paths

    check_paths(cfg)
    return Trainer(cfg, callbacks=callbacks).run()
