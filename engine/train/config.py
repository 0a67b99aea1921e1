"""The typed configuration of a training job: one pydantic tree (loaded by ``config_loading``).

Sections: ``model`` (policy, LoRA, quantization), ``reference`` (how the reference log-probs are
obtained and whether the reference follows the policy), ``data`` (in ``data_config``), ``loss``
(in ``loss_config``), ``ranked`` (in ``ranked_config``: ranked data's pair rule and loss),
``optimization``, ``deepspeed``, ``logging`` (progress, JSONL, trackers, evaluation, early
stopping) and ``checkpoint``. Every section forbids unknown keys (``config_base.Section``).
Cross-field rules that no single field can check (ZeRO-3 with a precomputed reference, LoRA with
a separate reference ...) live in :meth:`TrainConfig._check_combinations`.

Without a config file the embedded default job (``default.yaml`` next to this module) is the
base: SmolLM2-135M-Instruct + LoRA on the 300 demo pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..online.config import OnlineConfig
from .config_base import ConfigError, Section
from .data_config import DataConfig
from .loss_config import LossConfig
from .ranked_config import RankedConfig

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
DEFAULT_MICRO_BATCH = 4


# ------------------------------------------------------------------------------------ model
class LoraConfig(Section):
    """LoRA adapter on the policy (PEFT). The reference is then the policy with it disabled."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class QuantizationConfig(Section):
    """QLoRA: the frozen base loaded quantized by bitsandbytes (transformers'
    ``BitsAndBytesConfig``; the ``qlora`` extra), a LoRA adapter trained on top. The output head
    stays unquantized (transformers' default), so the fused linear op keeps reading it."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: the quantization constants quantized too
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # 4-bit matmuls
    skip_modules: list[str] | None = None  # modules kept unquantized (default: the head)


class ModelConfig(Section):
    """The policy. ``name_or_path`` null means SmolLM2-135M-Instruct from the package registry."""

    name_or_path: str | None = None
    tokenizer: str | None = None  # default: the model's folder
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the precision's
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    use_fused_linear: bool = True  # logps from hidden states + lm_head weight (no logits)
    # MoE policies: the router load-balancing loss's weight; null: the model config's own
    # router_aux_loss_coef (as TRL), 0: off
    router_aux_loss_coef: float | None = Field(None, ge=0.0)
    # entropy and top-1 accuracy per token (TRL's metrics), from the head's own pass; logged
    token_statistics: bool = True
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig | None = None  # QLoRA (with lora.enabled)


# -------------------------------------------------------------------------------- reference
class ReferenceConfig(Section):
    """Where the reference log-probs come from, and whether the reference follows the policy.

    mode: ``auto`` = ``none`` for reference-free losses, ``adapter_disabled`` with LoRA, else
    ``separate``; ``precomputed`` caches them once over the training data (keyed by weights,
    data and tokenization). ``sync_steps`` > 0: TR-DPO soft update every N optimizer steps,
    ref ← (1 − α)·ref + α·policy. ``rounds`` > 1: iterative DPO, ref ← policy at each round.
    """

    mode: Literal["auto", "separate", "adapter_disabled", "precomputed", "none"] = "auto"
    name_or_path: str | None = None  # separate: default = the policy's initial weights
    device: str | None = None  # e.g. "cpu" to keep a separate reference off the accelerator
    cache_dir: str | None = None  # precomputed: default <output_dir>/reference_cache
    sync_steps: int = Field(0, ge=0)
    sync_alpha: float = Field(0.6, gt=0.0, le=1.0)
    rounds: int = Field(1, ge=1)


# ----------------------------------------------------------------------------- optimization
class OptimizationConfig(Section):
    """AdamW, schedule, batch shape and numerics. Batches are per rank: a step sees
    micro_batch_size × gradient_accumulation_steps × world_size pairs."""

    learning_rate: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    micro_batch_size: int | None = Field(None, gt=0)  # pairs (KTO: examples) per rank per
    #                                 micro-step; null: 4, or no cap beside a token budget
    max_tokens_per_batch: int | None = Field(None, gt=0)  # a token budget per micro-batch
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0: no clipping
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    num_epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides num_epochs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def pairs_per_batch(self) -> int | None:
        """The item cap of a micro-batch: micro_batch_size; unset, 4 without a token budget and
        none with one (the budget alone decides)."""
        if self.micro_batch_size is None:
            return None if self.max_tokens_per_batch is not None else DEFAULT_MICRO_BATCH
        return self.micro_batch_size


# -------------------------------------------------------------------------------- deepspeed
class DeepSpeedSection(Section):
    """DeepSpeed. ``enabled: auto`` uses it under a launcher (several ranks), with ZeRO > 0, or
    with a user JSON (``config_file``); a single plain process uses PyTorch otherwise."""

    enabled: bool | Literal["auto"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    config_file: str | None = None  # a DeepSpeed JSON; "auto" values are filled from here
    communication_backend: str | None = None  # default: the accelerator's (gloo on CPU)
    cpu_shm_comm: bool = False  # build DeepSpeed's shared-memory op (inference only; slow JIT)
    # seconds a collective waits for a rank before the job stops naming it (a dead rank's
    # closed connection is seen at once; this bounds a hung one); torch's default is 30 minutes
    timeout_s: float = Field(300.0, gt=0.0)


# ---------------------------------------------------------------------------------- logging
class LoggingConfig(Section):
    """Progress bar, JSONL (``<output_dir>/metrics.jsonl``), experiment trackers, evaluation.
    ``report_to``: tensorboard, wandb, mlflow, trackio (each an extra: ``fastpo[wandb]``), with
    the JSONL's metric names; ``project`` / ``run_name`` name the tracker run (default run name:
    the output folder's); ``tensorboard: auto`` adds TensorBoard when it is installed."""

    output_dir: str = "runs/fastpo"
    log_every: int = Field(1, gt=0)
    progress: Literal["auto", "tqdm", "rich", "none"] = "auto"
    tensorboard: bool | Literal["auto"] = "auto"
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list)
    project: str = "fastpo"  # W&B / Trackio project, MLflow experiment
    run_name: str | None = None
    mlflow_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else MLflow's
    eval_every: int = Field(0, ge=0)  # 0: evaluate only before and after training
    eval_before: bool = True
    early_stopping_patience: int = Field(0, ge=0)  # evaluations without improvement; 0: off
    early_stopping_min_delta: float = Field(0.0, ge=0.0)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value: object) -> object:
        """``report_to: wandb`` is ``[wandb]``; ``none`` is ``[]``."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value


# ------------------------------------------------------------------------------- checkpoint
class CheckpointConfig(Section):
    """Atomic checkpoints every N steps under ``dir`` (default ``<output_dir>/checkpoints``),
    the last ``keep_last`` kept. ``resume``: true = the latest valid one, or a checkpoint path.
    ``export``: final ``save_pretrained`` (auto: the adapter with LoRA, else the full model).
    ``on_signal``: SIGTERM/SIGINT finish the step, write a checkpoint and stop (exit status
    128 + the signal); false leaves the signals alone."""

    every_steps: int = Field(0, ge=0)
    keep_last: int = Field(2, gt=0)
    dir: str | None = None
    resume: bool | str = False
    export: Literal["auto", "adapter", "merged", "full", "none"] = "auto"
    export_dir: str | None = None  # default <output_dir>/final
    on_signal: bool = True


# ------------------------------------------------------------------------------------- root
class TrainConfig(Section):
    """A whole training job."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    online: OnlineConfig | None = None  # online DPO: pairs generated during training
    ranked: RankedConfig = Field(default_factory=RankedConfig)  # ranked data: pairs, loss

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        try:
            self.loss.check()
            if self.ranked.loss == "plackett_luce":
                self.ranked.check_loss(self.loss)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        problems = combination_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def reference_mode(self) -> str:
        """The reference mode with ``auto`` resolved."""
        mode = self.reference.mode
        if mode != "auto":
            return mode
        if not self.loss.needs_reference():
            return "none"
        return "adapter_disabled" if self.model.lora.enabled else "separate"

    def uses_deepspeed(self, world_size: int) -> bool:
        """Whether this job runs through DeepSpeed with ``world_size`` ranks."""
        ds = self.deepspeed
        if ds.enabled != "auto":
            return bool(ds.enabled)
        return (world_size > 1 or ds.zero_stage > 0 or ds.config_file is not None
                or self.optimization.precision == "fp16")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def combination_problems(cfg: TrainConfig) -> list[str]:
    """Settings that are valid one by one but not together (each message names the keys)."""
    problems = []
    lora, ref, ds, opt = cfg.model.lora, cfg.reference, cfg.deepspeed, cfg.optimization
    mode = cfg.reference_mode()
    needs_ref = cfg.loss.needs_reference()
    if lora.enabled and ref.mode == "separate":
        problems.append("model.lora.enabled with reference.mode 'separate': the policy with its "
                        "adapter disabled is the reference (no second copy); use "
                        "reference.mode 'adapter_disabled' (or 'auto')")
    if ref.mode == "adapter_disabled" and not lora.enabled:
        problems.append("reference.mode 'adapter_disabled' needs model.lora.enabled: true")
    if ref.name_or_path is not None and mode != "separate":
        problems.append(f"reference.name_or_path is only used with reference.mode 'separate' "
                        f"(the mode here is {mode!r})")
    if needs_ref and mode == "none":
        problems.append(f"loss {cfg.loss.method}/{cfg.loss.resolved_loss_types()} needs reference "
                        "log-probs but reference.mode is 'none' (set loss.reference_free: true "
                        "for a reference-free DPO)")
    if not needs_ref and mode not in ("none",):
        problems.append(f"loss {cfg.loss.method}/{cfg.loss.resolved_loss_types()} uses no "
                        f"reference; reference.mode {mode!r} would run one for nothing "
                        "(use 'auto' or 'none')")
    follows = ref.sync_steps > 0 or ref.rounds > 1
    if follows and mode in ("none", "precomputed"):
        problems.append(f"reference.sync_steps / reference.rounds make the reference follow the "
                        f"policy, which a reference.mode {mode!r} cannot do")
    if mode == "precomputed" and ds.zero_stage == 3:
        problems.append("reference.mode 'precomputed' with deepspeed.zero_stage 3: precomputing "
                        "hashes and runs the whole (gathered) reference model before training; "
                        "use zero_stage <= 2, or a 'separate' reference (sharded under ZeRO-3)")
    conflict = cfg.data.layout_conflict()
    if conflict:
        problems.append(conflict)
    shared_key = "data.share_prompt" if cfg.data.share_prompt else "data.layout " + repr(
        cfg.data.layout)
    if cfg.data.wants_shared_prompt() and cfg.loss.method == "kto":
        problems.append(f"{shared_key} applies to paired losses (shared-prompt rows); "
                        "loss.method 'kto' trains on unpaired examples")
    if cfg.data.wants_shared_prompt() and cfg.model.attn_implementation not in ("sdpa", "eager"):
        problems.append(f"{shared_key} (shared-prompt rows) needs model.attn_implementation "
                        f"'sdpa' or 'eager' (segment attention or a custom attention mask), not "
                        f"{cfg.model.attn_implementation!r}")
    if ds.offload_param != "none" and ds.zero_stage != 3:
        problems.append("deepspeed.offload_param needs deepspeed.zero_stage 3")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if "nvme" in (ds.offload_param, ds.offload_optimizer) and not ds.nvme_path:
        problems.append("NVMe offload needs deepspeed.nvme_path")
    if ds.enabled is False and (ds.zero_stage > 0 or ds.config_file or opt.precision == "fp16"):
        problems.append("deepspeed.enabled is false, but deepspeed.zero_stage > 0, "
                        "deepspeed.config_file or fp16 precision need DeepSpeed")
    if opt.warmup_steps and opt.warmup_ratio:
        problems.append("give optimization.warmup_steps or optimization.warmup_ratio, not both")
    log = cfg.logging
    has_eval = cfg.data.eval is not None or cfg.data.eval_fraction > 0
    if log.early_stopping_patience and not (log.eval_every and has_eval):
        problems.append("logging.early_stopping_patience needs logging.eval_every > 0 and a "
                        "held-out split (data.eval or data.eval_fraction > 0)")
    if log.tensorboard is False and "tensorboard" in log.report_to:
        problems.append("logging.report_to lists tensorboard but logging.tensorboard is false")
    if log.eval_every and not has_eval:
        problems.append("logging.eval_every > 0 needs data.eval or data.eval_fraction > 0")
    export = cfg.checkpoint.export
    if export in ("adapter", "merged") and not lora.enabled:
        problems.append(f"checkpoint.export {export!r} needs model.lora.enabled (use 'full')")
    problems += quantization_problems(cfg)
    return problems


def quantization_problems(cfg: TrainConfig) -> list[str]:
    """What a quantized (QLoRA) base cannot be combined with."""
    quant, problems = cfg.model.quantization, []
    if quant is None:
        return problems
    if not cfg.model.lora.enabled:
        problems.append("model.quantization needs model.lora.enabled: the quantized base is "
                        "frozen, a LoRA adapter is what trains (QLoRA)")
    if cfg.deepspeed.zero_stage == 3:
        problems.append("model.quantization with deepspeed.zero_stage 3 is not supported: "
                        "ZeRO-3 would partition the bitsandbytes weights; use zero_stage <= 2 "
                        "(the adapter's optimizer state is what ZeRO 1-2 shard)")
    if cfg.checkpoint.export == "full":
        problems.append("checkpoint.export 'full' with model.quantization would write the "
                        "quantized base; use 'adapter' (or 'auto') or 'merged' (the adapter "
                        "folded into the unquantized base weights)")
    if cfg.reference.mode == "separate":
        problems.append("model.quantization: the reference is the quantized policy with its "
                        "adapter disabled (reference.mode 'adapter_disabled' or 'auto'), or "
                        "'precomputed'")
    if quant.bits == 8 and (quant.quant_type != "nf4" or not quant.double_quant):
        problems.append("model.quantization.quant_type / double_quant apply to bits 4 only")
    return problems
