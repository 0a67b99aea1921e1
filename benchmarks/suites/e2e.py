"""End-to-end suite: one DPO training step (policy + reference, forward + backward + optimizer).

Every implementation trains the same randomly initialised model on the same batch with the same
loss (sigmoid DPO, β = 0.1) and the same optimizer (AdamW, lr 1e-6):

    trl            TRL's ``DPOTrainer.compute_loss`` as shipped (its chunked fused lm_head)
    trl+fastpo     the same trainer after ``fastpo.engine.integrations.trl.patch_trainer``
    fastpo         fastpo's engine: ``forward_logps`` (fused linear op) for the policy, a
                   ``FrozenReference``, ``preference_loss``; padded batch
    fastpo_packed  the same on a padding-free (packed) batch
    fastpo_shared  the same with each pair as one [prompt | chosen | rejected] row, so the prompt
                   runs once per pair (``collate_pairs(..., share_prompt=True)``)

Every row carries its model-FLOP utilization (the step's model FLOPs per second over a GEMM rate
measured in the same process, :mod:`benchmarks.mfu`). Each fastpo row also carries the FLOPs its
layout needs next to the padded rows of the same pairs
(``layout_figures``), and :func:`summary` prints, per layout row, those ratios beside the measured
speed-up over the padded row (the issue's target: a packed or shared-prompt row's speed-up over
padded rows at least its attention-FLOP saving, within 20 %).

TRL runs in fp32 without gradient checkpointing here (its defaults on CPU are bf16 autocast and
checkpointing), so that all rows do the same arithmetic. TRL also computes per-token entropy and
top-1 accuracy for its metrics every step (and so does ``trl+fastpo``, to keep TRL's metrics);
the engine computes the metrics of ``fastpo.engine.losses`` (no entropy).

Model: SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
embeddings) in full runs; fewer layers in ``--quick``; a tiny Llama in ``--smoke``. Batch:
``P`` pairs, prompts of ``Lp`` tokens and completions of about ``Lc`` tokens (ragged).
"""

from __future__ import annotations

import copy
import random
import tempfile
from typing import Any

import torch

from benchmarks.harness import CaseSpec, SkipCase, Workload
from benchmarks.mfu import batch_mfu_figures, mfu_column

IMPLS = ("trl", "trl+fastpo", "fastpo", "fastpo_packed", "fastpo_shared")
LAYOUTS = {"padded": "padded batch", "packed": "packed batch",
           "shared": "shared-prompt rows (prompt once per pair)"}
BETA = 0.1
LR = 1e-6


def cases(device: str, size: str) -> list[CaseSpec]:
    """The DPO-step cases at ``size`` ("smoke", "quick" or "full") on ``device``."""
    if size == "smoke":
        grid = [{"model": "tiny", "V": 1024, "P": 2, "Lp": 16, "Lc": 16}]
        reps, warmup = 2, 1
    elif size == "quick":
        grid = [{"model": "smollm2-135m", "layers": 2, "V": 49152, "P": 1, "Lp": 64, "Lc": 64}]
        reps, warmup = 2, 1
    elif device == "cuda":
        grid = [{"model": "smollm2-135m", "layers": 30, "V": 49152, "P": 8, "Lp": 512,
                 "Lc": 512}]
        reps, warmup = 5, 2
    else:
        grid = [{"model": "smollm2-135m", "layers": 30, "V": 49152, "P": 2, "Lp": 128,
                 "Lc": 128}]
        reps, warmup = 2, 1
    dtype = "bf16" if device == "cuda" else "fp32"
    # --quick keeps to its 3-minute budget: the packed row is the padded row's twin there
    impls = [i for i in IMPLS if size != "quick" or i != "fastpo_packed"]
    return [CaseSpec(suite="e2e", family="dpo_step", impl=impl,
                     params={**params, "dtype": dtype}, device=device, warmup=warmup, reps=reps)
            for params in grid for impl in impls]


# --------------------------------------------------------------------------- model and data


def model_config(params: dict[str, Any]):
    """A transformers LlamaConfig for the case."""
    from transformers import LlamaConfig

    if params["model"] == "tiny":
        return LlamaConfig(vocab_size=params["V"], hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=4096, tie_word_embeddings=False,
                           attn_implementation="sdpa")
    if params["model"] == "smollm2-135m":
        return LlamaConfig(vocab_size=params["V"], hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=params.get("layers", 30), num_attention_heads=9,
                           num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                           attn_implementation="sdpa")
    if params["model"] == "llama-1b":  # Llama-3.2-1B's shape (1.24B parameters), random weights
        return LlamaConfig(vocab_size=params["V"], hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                           tie_word_embeddings=True, attn_implementation="sdpa")
    raise ValueError(f"unknown benchmark model {params['model']!r}")


def make_models(params: dict[str, Any], device: str):
    """(policy, reference): identical random initialisations."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if params.get("dtype") == "bf16" else torch.float32
    with torch.device(device):  # initialised where it runs: seconds of host work for a 1B model
        policy = LlamaForCausalLM(model_config(params)).to(dtype=dtype)
    return policy, copy.deepcopy(policy)


def make_pairs(params: dict[str, Any], *, seed: int = 0) -> list[tuple[list, list, list]]:
    """``P`` (prompt, chosen, rejected) id lists; completions of Lc ± Lc/4 tokens, EOS last."""
    rng = random.Random(seed)
    vocab, eos = params["V"], 1
    pairs = []
    spread = max(1, params["Lc"] // 4)

    def ids(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    for _ in range(params["P"]):
        prompt = ids(params["Lp"])
        chosen = [*ids(params["Lc"] + rng.randint(-spread, spread) - 1), eos]
        rejected = [*ids(params["Lc"] + rng.randint(-spread, spread) - 1), eos]
        pairs.append((prompt, chosen, rejected))
    return pairs


def word_tokenizer(vocab_size: int):
    """An in-memory word-level tokenizer (``<pad>`` = 0, ``<eos>`` = 1) for TRL's constructor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _tokens(pairs) -> int:
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)


# --------------------------------------------------------------------------- TRL


def trl_step(trainer: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             batch: dict[str, Any]) -> torch.Tensor:
    """One step of TRL's DPOTrainer as the suites time it: its ``compute_loss`` (the loss and
    metrics a training step runs), backward, the optimizer step; the logged metrics are dropped
    so they do not pile up across repetitions."""
    model.train()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    return loss.detach()


def _trl_workload(spec: CaseSpec, *, patched: bool) -> Workload:
    import importlib

    import trl  # first: without TRL the row is "not installed", not an error about its needs
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    datasets = importlib.import_module("datasets")  # TRL's own dependency, after TRL

    params, device = spec.params, spec.device
    policy, ref = make_models(params, device)
    tokenizer = word_tokenizer(params["V"])
    words = [{"prompt": "w2 w3", "chosen": " w4", "rejected": " w5"}] * 2
    out_dir = tempfile.mkdtemp(prefix="fastpo-bench-trl-")
    args = trl.DPOConfig(output_dir=out_dir, report_to="none", per_device_train_batch_size=2,
                         max_length=None, beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
                         bf16=params.get("dtype") == "bf16", gradient_checkpointing=False,
                         use_cpu=device == "cpu", disable_tqdm=True, save_strategy="no")
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args,
                             train_dataset=datasets.Dataset.from_list(words),
                             processing_class=tokenizer)
    if patched:
        from fastpo.engine.integrations.trl import patch_trainer

        patch_trainer(trainer)
    collate = DataCollatorForPreference(pad_token_id=0)
    pairs = make_pairs(params)
    batch = collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    batch = {k: v.to(device) for k, v in batch.items()}
    model = trainer.model
    optimizer = _optimizer(model)

    def step() -> torch.Tensor:
        return trl_step(trainer, model, optimizer, batch)

    note = "TRL DPOTrainer.compute_loss, fp32, no gradient checkpointing"
    # model FLOPs of the same pairs as concatenated sequences (what TRL runs)
    from fastpo.engine.data.batch import collate_pairs
    from fastpo.engine.data.dataset import TokenizedPair

    figures = batch_mfu_figures(
        collate_pairs([TokenizedPair(p, c, r) for p, c, r in pairs], pad_token_id=0),
        config=policy.config, device=device, dtype=next(policy.parameters()).dtype)
    return Workload(step, tokens=_tokens(pairs), extra=figures,
                    notes=note + (", patched" if patched else ""))


# --------------------------------------------------------------------------- fastpo engine


def _fastpo_workload(spec: CaseSpec, *, layout: str) -> Workload:
    from fastpo.engine.data.batch import collate_pairs
    from fastpo.engine.data.dataset import TokenizedPair
    from fastpo.engine.losses import preference_loss
    from fastpo.engine.model.forward import forward_logps, split_pairs
    from fastpo.engine.model.reference import FrozenReference

    params, device = spec.params, spec.device
    policy, ref_model = make_models(params, device)
    reference = FrozenReference(ref_model)
    pairs = make_pairs(params)
    batch = collate_pairs([TokenizedPair(p, c, r) for p, c, r in pairs], pad_token_id=0,
                          padding_free=layout == "packed",
                          share_prompt=layout == "shared").to(device)
    optimizer = _optimizer(policy)
    vocab = params["V"]

    def step() -> torch.Tensor:
        policy.train()
        out = forward_logps(policy, batch, with_logits_sum=True).sequence
        ref = reference.sequence_logps(batch)
        chosen, rejected = split_pairs(out, batch.num_pairs)
        ref_chosen, ref_rejected = split_pairs(ref, batch.num_pairs)
        result = preference_loss(
            chosen.logps, rejected.logps, ref_chosen.logps, ref_rejected.logps,
            loss_type="sigmoid", beta=BETA, chosen_num_tokens=chosen.num_tokens,
            rejected_num_tokens=rejected.num_tokens, chosen_logits_sum=chosen.logits_sum,
            rejected_logits_sum=rejected.logits_sum, vocab_size=vocab)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.loss.detach()

    padded = collate_pairs([TokenizedPair(p, c, r) for p, c, r in pairs], pad_token_id=0)
    shape = tuple(batch.input_ids.shape)
    figures = layout_figures([(batch.attention_plan, *shape)],
                             [tuple(padded.input_ids.shape)], config=policy.config,
                             scored=int(batch.target_index.numel()), device=device)
    figures.update(batch_mfu_figures(batch, config=policy.config, device=device,
                                     dtype=next(policy.parameters()).dtype))
    return Workload(step, tokens=_tokens(pairs), extra=figures,
                    notes=f"fastpo engine, {LAYOUTS[layout]}")


# --------------------------------------------------------------------------- layout FLOPs


def layout_figures(batches: list[tuple[Any, int, int]], padded: list[tuple[int, int]], *,
                   config: Any, scored: int, device: str) -> dict[str, Any]:
    """The FLOPs a layout's micro-batches need (``(plan or None, rows, width)`` each) and those
    of the padded rows of the same items (``(rows, width)`` each), from the lengths alone
    (``fastpo.engine.data.attention_cost``); and how segment attention runs them here."""
    from fastpo.engine.data.attention_cost import (
        ModelDims,
        choose_attention,
        forward_flops,
        needed_pairs,
    )

    dims, layers = ModelDims.of(config), config.num_hidden_layers
    pairs = sum(needed_pairs(plan, r, w) for plan, r, w in batches)
    padded_pairs = sum(needed_pairs(None, r, w) for r, w in padded)
    modes = {"padded" if plan is None else choose_attention(
        plan, heads=dims.heads, head_dim=dims.head_dim, device_type=device.split(":")[0],
        threads=torch.get_num_threads()) for plan, _, _ in batches}
    step = forward_flops(sum(r * w for _, r, w in batches), pairs, dims=dims, layers=layers,
                         scored=scored, vocab=config.vocab_size)
    padded_step = forward_flops(sum(r * w for r, w in padded), padded_pairs, dims=dims,
                                layers=layers, scored=scored, vocab=config.vocab_size)
    return {"attention": "/".join(sorted(modes)), "attention_pairs": pairs,
            "padded_attention_pairs": padded_pairs, "forward_flops": step,
            "padded_forward_flops": padded_step,
            "attention_share": layers * pairs * dims.flops_per_pair() / step}


def summary(group: list[dict[str, Any]], padded_impl: str = "fastpo") -> list[str]:
    """Per layout row: the attention- and step-FLOP ratios of padded rows over it (what it
    saves), the measured speed-up over the padded row (tokens/s), and whether the speed-up
    reaches each ratio within 20 % and is at least 1."""
    base = next((r for r in group if r["impl"] == padded_impl and r["status"] == "ok"), None)
    rows = [r for r in group if r["status"] == "ok" and (r.get("extra") or {}).get(
        "attention_pairs")]
    utilization = mfu_column(group)
    if utilization:
        utilization = ["Model-FLOP utilization: the step's model FLOPs (policy forward + backward "
                       "and reference forward over the real tokens) per second over a GEMM rate "
                       "measured in the same process (`benchmarks/mfu.py`):", "", *utilization,
                       ""]
    if base is None or not base.get("tokens_per_s") or not rows:
        return utilization
    lines = [f"Layouts against `{padded_impl}` (padded rows of the same pairs); FLOP ratios = "
             "padded FLOPs / the row's, from the batch lengths (attention: Σ over pieces of "
             "queries × keys vs rows × padded length²; step: forward FLOPs of decoder and head); "
             "a row meets a ratio when its speed-up ≥ 0.8 × it:", "",
             "| impl | attention run as | attention share of step FLOPs | attention-FLOP ratio "
             "| step-FLOP ratio | speed-up | meets attention ratio | meets step ratio "
             "| not slower |", "|---|---|---:|---:|---:|---:|---|---|---|"]
    for row in rows:
        x = row["extra"]
        attn = x["padded_attention_pairs"] / x["attention_pairs"]
        step = x["padded_forward_flops"] / x["forward_flops"]
        speed = row["tokens_per_s"] / base["tokens_per_s"]

        def verdict(ok: bool) -> str:
            return "meets" if ok else "does not"

        lines.append(f"| {row['impl']} | {x['attention']} | {100 * x['attention_share']:.1f} % "
                     f"| {attn:.2f} | {step:.2f} | {speed:.2f} | {verdict(speed >= 0.8 * attn)} "
                     f"| {verdict(speed >= 0.8 * step)} | {verdict(speed >= 1.0)} |")
    return [*lines, "", *utilization]


def build(spec: CaseSpec) -> Workload:
    """The workload of one case (called in the measuring process)."""
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipCase("no CUDA device")
    if spec.impl == "trl":
        return _trl_workload(spec, patched=False)
    if spec.impl == "trl+fastpo":
        return _trl_workload(spec, patched=True)
    if spec.impl in ("fastpo", "fastpo_packed", "fastpo_shared"):
        return _fastpo_workload(spec, layout=spec.impl.partition("_")[2] or "padded")
    raise SkipCase(f"unknown implementation {spec.impl!r}")
