"""The training job: data → batches → policy/reference log-probs → loss → (DeepSpeed) step.

    from fastpo.engine.train.config_loading import load_config
    from fastpo.engine.train import train
    result = train(load_config("job.yaml", overrides=["--loss.beta", "0.2"]))

One code path for one process or N ranks, offline or online: a step's micro-batches come from a
batch source (``batch_source.py``): a preference file's planned epochs (``offline_source.py``) or
pairs the policy generates and a scorer ranks (``online_source.py``). Every ``log_every`` steps the
loss, TRL's metrics, KL, tokens/s and peak memory go to the progress bar, ``metrics.jsonl`` and
TensorBoard; held-out evaluation reports reward accuracy and margins (online: the mean score of
fresh samples); checkpoints are atomic; ``checkpoint.resume`` continues a killed run exactly.
Faults of the environment (a full disk, a second job on the folder, a lost rank) end the job
with one line (:mod:`.job_guard`).

No host synchronization between logging points: losses, metrics, non-finite counts and the
gradient norm stay on the device (:class:`~.metrics_log.StepMetrics`) until a logging point
(checkpoint, evaluation, stop) reads them in one packed collective and one copy; a non-finite
step is skipped on the device, ``on_nonfinite: stop`` raises at that read, and a non-finite
held-out loss fails the run (:class:`NonFiniteError`, exit status 1).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.batch import PreferenceBatch
from ..model.forward import forward_logps
from .batch_source import BatchSource, SourceExhausted
from .callbacks import Callback
from .checkpoint import CheckpointManager, seed_everything, write_text_atomic
from .config import TrainConfig
from .config_loading import to_yaml
from .deepspeed_backend import DeepSpeedBackend
from .evaluation import PairEvaluation
from .interrupts import StopSignals
from .job import build_reference, load_datasets
from .job_guard import JobGuard
from .layout import resolve_layout
from .metrics_log import RunLogger, StepMetrics, gather_ranks, peak_memory_mb, setup_logging
from .model_loading import (
    export_model,
    load_dtype,
    load_policy,
    load_tokenizer,
    model_path,
    policy_router,
    vocab_size,
)
from .objective import Objective
from .offline_source import OfflineSource
from .reference_schedule import reference_update
from .reports import nonfinite_eval_text, nonfinite_step_text, progress_text, run_summary
from .runtime import init_runtime, zero3_loading
from .step_weighting import StepCounts, step_counts
from .torch_backend import TorchBackend
from .trainer_checkpoint import check_checkpoint_room, resume_trainer, save_trainer_checkpoint

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf and ``on_nonfinite`` is ``stop``, or a held-out
    loss is not finite."""


@dataclass
class TrainResult:
    steps: int
    stopped: str  # "completed" | "early_stopping" | "exhausted" | "signal"
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    output_dir: Path
    export_dir: Path | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_signal: int | None = None  # the signal that stopped the run (stopped == "signal")
    closing: str | None = None  # held-out before → after, for the CLI's one summary line


@dataclass(slots=True)
class _Position:
    step: int = 0  # optimizer steps done (the source keeps its own position in its data)


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
        self.guard = JobGuard(self.rt, cfg)
        with self.guard.watching(release=False):
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
        self.evaluator: Any  # PairEvaluation | OnlineEvaluation
        if cfg.online is not None:  # online DPO: no preference file, no held-out pairs
            from .online_setup import build_online

            self.train_set = self.eval_set = None
            self.source: BatchSource
            self.source, self.evaluator = build_online(cfg, self.tokenizer, runtime=rt,
                                                       policy=lambda: self.backend.module)
        else:
            self.train_set, self.eval_set = load_datasets(cfg, self.tokenizer, runtime=rt)
            resolve_layout(cfg, self.train_set, model_path=self.base_path,  # layout: auto
                           device_type=rt.device.type, with_kl=self.objective_with_kl())
            self.source = OfflineSource(cfg, self.train_set, rank=rt.rank,
                                        world_size=rt.world_size, device=rt.device,
                                        pad_token_id=self.pad_id, with_kl=self.objective_with_kl())
            self.evaluator = PairEvaluation(self.eval_set)
        self.total_steps = self.source.total_steps
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
            self.router = policy_router(cfg, policy)  # MoE: the router loss; else None
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
        self.objective = Objective(cfg.loss, vocab_size=self.vocab_size, router=self.router,
                                   ranked=cfg.ranked, all_reduce_mean=self.rt.all_reduce_mean)
        self.listwise = self.objective.listwise  # ranked items (not pairs) are the step's unit
        self.forward_options = self.objective.forward_options(cfg.model)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.output_dir / "checkpoints",
                                      keep_last=cfg.checkpoint.keep_last, rank=rt.rank,
                                      barrier=rt.barrier)
        resume_trainer(self)
        self.log = RunLogger.for_job(cfg, enabled=rt.is_main, total_steps=self.total_steps,
                                     initial_step=self.pos.step)
        if rt.is_main:
            write_text_atomic(self.output_dir / "config.yaml", to_yaml(cfg))

    def objective_with_kl(self) -> bool:
        return self.cfg.loss.method == "kto" and "kto" in self.cfg.loss.resolved_loss_types()

    # -------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        self.read_metrics()  # never checkpoint past a non-finite step that stop would refuse
        path = save_trainer_checkpoint(self)
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.pos.step, path)
        self._window_start = time.perf_counter()
        return path

    # ------------------------------------------------------------------------------ steps
    def forward(self, batch: PreferenceBatch, reference_logps: Callable[[PreferenceBatch], Any]
                | None = None, counts: StepCounts | None = None):
        """The objective's output for ``batch`` (with the step's ``counts``: its share of the
        step's loss): policy, then reference log-probs (default: the reference's), autocast."""
        obj = self.objective
        with self.backend.autocast():
            policy = forward_logps(self.backend.model, batch, **self.forward_options)
            if reference_logps is None:
                reference = self.reference.reference_logps(batch, with_tail_logps=obj.with_tails)
            else:
                reference = reference_logps(batch)
            return obj(policy, reference, batch, counts)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the accumulation's micro-batches, no host synchronization: the
        record gets the device's values (loss, metrics, skipped, ...) at :meth:`read_metrics`."""
        t0 = time.perf_counter()
        self.backend.module.train()
        tokens = 0
        batches = list(self.source.step_batches())  # every pair of the step weighs the same
        counts = step_counts(batches, runtime=self.rt, listwise=self.listwise)
        for batch in batches:
            out = self.forward(batch, counts=counts)  # logged × M: the step's mean over M, ranks
            self.step_metrics.add(out.loss.detach() * len(batches), out.metrics)
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
        record = {"step": self.pos.step, **self.source.end_step(), "lr": lr,
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
        # the only honest clock without a sync per step: the read waits for the device;
        # generation (online training) is timed apart, in its own rate
        generating = sum(r.get("online/generation_seconds", 0.0) for r in records)
        seconds, self._window_start = max(now - self._window_start - generating, 1e-9), now
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
    def evaluate(self) -> dict[str, float] | None:
        """The held-out evaluation (:class:`~.evaluation.PairEvaluation`, or the online mean
        score of fresh samples); the steps' metrics are read first."""
        self.read_metrics()
        result = self.evaluator.run(self)
        self._window_start = time.perf_counter()  # tokens/s counts training time only
        return result

    def _after_eval(self, result: dict[str, float]) -> bool:
        """Track the best primary metric (reward accuracy, or the online mean score); True when
        early stopping says stop."""
        log = self.cfg.logging
        acc = result[self.evaluator.primary]
        if self.best_eval is None or acc > self.best_eval + log.early_stopping_min_delta:
            self.best_eval, self.bad_evals = acc, 0
            return False
        self.bad_evals += 1
        return bool(log.early_stopping_patience and self.bad_evals >= log.early_stopping_patience)

    def _maybe_sync(self) -> None:
        """The reference update that is due (:mod:`.reference_schedule`), if any."""
        alpha = reference_update(self.cfg.reference, self.pos.step, self.total_steps)
        if alpha is not None:
            self.reference.soft_update(self.backend.module, alpha)
            self.ref_version += 1
            logger.info("step %d: reference ← %.3g·policy + %.3g·reference", self.pos.step,
                        alpha, 1 - alpha)

    # -------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        signals = StopSignals() if self.cfg.checkpoint.on_signal else contextlib.nullcontext()
        with self.guard.watching(), signals as sig:
            return self._run(sig)

    def _signalled(self, signals: StopSignals | None) -> int | None:
        """The stop signal any rank received (all ranks agree), or None."""
        return self.guard.any_rank((signals.received if signals else None) or 0) or None

    def _run(self, signals: StopSignals | None) -> TrainResult:
        cfg, t_start = self.cfg, time.perf_counter()
        log = cfg.logging
        stopped, stop_signal = "completed", None
        try:
            check_checkpoint_room(self, first=True)
            if self.pos.step == 0 and log.eval_before:
                self.eval_before = self.evaluate()
                self._report_eval("before", self.eval_before)
                if self.eval_before is not None:
                    self._after_eval(self.eval_before)
            self._window_start = time.perf_counter()
            while self.pos.step < self.total_steps:
                try:
                    record = self.train_step()
                except SourceExhausted as exc:  # before the step's first forward
                    stopped = "exhausted"
                    self.log.message(f"{exc}; stopping after step {self.pos.step}")
                    break
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
                    self.log.message(f"early stopping at step {self.pos.step}: no "
                                     f"{self.evaluator.primary} gain in {self.bad_evals} "
                                     "evaluations")
                    break
            self.read_metrics()
            self.log.close_progress()  # the final bar, drawn once; later lines print below it
            eval_after, export_dir = None, None
            if stopped != "signal":  # a preempted job has seconds left: no evaluation, no export
                eval_after = self.evaluate()
                self._report_eval("after", eval_after)
                export_dir = Path(cfg.checkpoint.export_dir or self.output_dir / "final")
                self.guard.check_export_room(self.backend.module, export_dir, cfg)
                export_dir = export_model(
                    cfg, self.backend.module, self.tokenizer, export_dir,
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
        self.log.message(self.evaluator.text(when, self.pos.step, result))
        for cb in self.callbacks:
            cb.on_eval(self, self.pos.step, result)
        if not math.isfinite(result.get("loss", 0.0)):
            raise NonFiniteError(nonfinite_eval_text(when, self.pos.step, result))

    def _report_summary(self, result: TrainResult) -> None:
        summary = run_summary(steps=result.steps, stopped=result.stopped, seconds=result.seconds,
                              eval_before=result.eval_before, eval_after=result.eval_after,
                              export_dir=result.export_dir)
        result.closing = self.evaluator.closing(summary, result.eval_before, result.eval_after)
        self.log.log(summary, kind="summary")


def train(cfg: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run the job described by ``cfg``; see :class:`Trainer`. Its paths are checked first, so a
    missing file or an output folder that is a file is named before any model loads."""
    from .config_loading import check_paths

    check_paths(cfg)
    return Trainer(cfg, callbacks=callbacks).run()
