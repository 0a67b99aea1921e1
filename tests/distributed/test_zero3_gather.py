"""gathered_lm_head under a real 2-rank DeepSpeed ZeRO-3 run on CPU.

The test launches this file under the deepspeed launcher (``--num_gpus 2`` picks the CPU
accelerator, two processes). Each rank trains a tiny model whose lm_head weight is partitioned
(a 0-element shard on each rank) and computes sequence logps with the fused linear op, once with
the op called after the model returned its hidden states and once inside a module's forward with
the lm_head tied to the input embedding. The gradients DeepSpeed reduces into the shards
(``safe_get_full_grad``) must equal those of a single-process run of the same model on the union
of both ranks' batches, and an optimizer step must go through.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

VOCAB, HIDDEN, SEQ, BATCH, WORLD = 67, 24, 9, 2, 2
REPORT_DIR_ENV = "FASTPO_TEST_REPORT_DIR"
# (tied embeddings, op inside a module forward, that module passed as fwd_module)
CASES = ((False, False, False), (True, True, True), (True, True, False))


class TinyLM(nn.Module):
    """Embedding → one tanh layer → hidden states; lm_head (optionally tied) not called here."""

    def __init__(self, tied: bool, bias: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(ids)))


class LogpsWrapper(nn.Module):
    """A module whose forward runs the model body and the fused op (the engine's usage)."""

    def __init__(self, lm: TinyLM, register: bool) -> None:
        super().__init__()
        self.lm = lm
        self.register = register

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from fastpo.kernels.linear_logprobs import linear_sequence_logps
        from fastpo.kernels.zero3 import gathered_lm_head

        hidden = self.lm(ids)
        with gathered_lm_head(self.lm, fwd_module=self if self.register else None) as (weight,
                                                                                      bias):
            return linear_sequence_logps(hidden, weight, labels, bias=bias).logps


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :3] = -100  # prompt
    labels[:, -1] = -100
    return ids, labels


def pair_loss(logps: torch.Tensor) -> torch.Tensor:
    """A DPO-shaped loss on (chosen, rejected) = rows (0, 1)."""
    return -torch.nn.functional.logsigmoid(0.5 * (logps[0] - logps[1]))


def reference_grads(model: TinyLM) -> dict[str, torch.Tensor]:
    """Mean over the ranks' batches of the plain-PyTorch gradients (DeepSpeed averages ranks)."""
    from fastpo.kernels.linear_logprobs import linear_sequence_logps

    model.zero_grad()
    for rank in range(WORLD):
        ids, labels = rank_batch(rank)
        head = model.lm_head
        out = linear_sequence_logps(model(ids), head.weight, labels, bias=head.bias)
        (pair_loss(out.logps) / WORLD).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run_case(tied: bool, inside_forward: bool, register: bool) -> dict[str, float]:
    import copy

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from fastpo.kernels.linear_logprobs import linear_sequence_logps
    from fastpo.kernels.zero3 import gathered_lm_head

    torch.manual_seed(0)
    lm = TinyLM(tied=tied, bias=not tied)
    expected = reference_grads(copy.deepcopy(lm))
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        # Partition every parameter, however small (the default keeps small ones whole).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    module = LogpsWrapper(lm, register) if inside_forward else lm
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      config=config)
    head_weight = lm.lm_head.weight
    partitioned = head_weight.numel() == 0 and head_weight.ds_tensor.numel() < VOCAB * HIDDEN
    ids, labels = rank_batch(engine.global_rank)
    if inside_forward:
        logps = engine(ids, labels)
    else:
        hidden = engine(ids)
        with gathered_lm_head(lm) as (weight, bias):
            gathered_shape = tuple(weight.shape)
            logps = linear_sequence_logps(hidden, weight, labels, bias=bias).logps
        if gathered_shape != (VOCAB, HIDDEN):
            raise RuntimeError(f"gathered weight has shape {gathered_shape}")
    engine.backward(pair_loss(logps))
    released = head_weight.numel() == 0  # partitioned again after the backward
    names = dict(lm.named_parameters())
    errors = {}
    for name, param in names.items():
        got = safe_get_full_grad(param)
        errors[name] = float("inf") if got is None else float((got - expected[name]).abs().max())
    engine.step()
    scale = max(float(g.abs().max()) for g in expected.values())
    return {"partitioned": partitioned, "released": released, "max_err": max(errors.values()),
            "scale": scale, "errors": errors}


def worker() -> None:
    from fastpo.engine.train.runtime import skip_deepspeed_shm_op

    # The shared-memory all-reduce op is a JIT-compiled speed-up for large CPU tensors (~60 s to
    # build on first use); this model's tensors are tiny, so gloo alone does the collectives.
    skip_deepspeed_shm_op()
    results = {f"tied={tied},inside={inside},fwd_module={register}":
               run_case(tied, inside, register) for tied, inside, register in CASES}
    # one file per rank: the launcher merges the ranks' stdout, and two reports printed at the
    # same moment can land on one line
    rank = int(os.environ.get("RANK", -1))
    out = Path(os.environ[REPORT_DIR_ENV]) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "results": results}))


def test_gathered_lm_head_without_zero3_yields_the_parameters():
    from fastpo.kernels.zero3 import gathered_lm_head, resolve_lm_head

    untied, tied = TinyLM(tied=False, bias=True), TinyLM(tied=True, bias=False)
    with gathered_lm_head(untied) as (weight, bias):
        assert weight is untied.lm_head.weight and bias is untied.lm_head.bias
    with gathered_lm_head(tied.lm_head) as (weight, bias):
        assert weight is tied.embed.weight and bias is None
    assert resolve_lm_head(tied.embed.weight) == (tied.embed.weight, None)
    with pytest.raises(TypeError, match="expects a model, a module or a weight tensor"):
        resolve_lm_head(3)
    with pytest.raises(TypeError, match="has no output embeddings with a weight"):
        resolve_lm_head(nn.ReLU())


@pytest.mark.distributed
def test_zero3_gathered_lm_head_gradients_match_single_process(tmp_path):
    from trainer_helpers import launch_workers  # tests/ is not on a worker's path

    _, reports = launch_workers(__file__, tmp_path, world=WORLD, report_env=REPORT_DIR_ENV)
    for report in reports:
        for case, result in report["results"].items():
            assert result["partitioned"], f"rank {report['rank']} {case}: lm_head not partitioned"
            assert result["released"], f"rank {report['rank']} {case}: lm_head left gathered"
            assert result["max_err"] <= 1e-5 * max(1.0, result["scale"]), (report["rank"], case,
                                                                           result["errors"])


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()
