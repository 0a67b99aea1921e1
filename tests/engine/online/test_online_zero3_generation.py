"""Generation under a real 2-rank DeepSpeed ZeRO-3 run on CPU.

The test launches this file under the deepspeed launcher (``--num_gpus 2`` picks the CPU
accelerator, two processes). Each rank holds a tiny Llama whose every parameter is partitioned,
generates greedily for its own prompts inside ``gathered_for_generation(engine)`` — the ranks
ask for different numbers of new tokens, so a per-layer gather would leave one rank waiting on
the other — and must get exactly the completions of the same model unsharded. Afterwards the
parameters are partitioned again and a training step goes through.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORLD = 2
REPORT_DIR_ENV = "FASTPO_TEST_REPORT_DIR"
TOKENIZER = SimpleNamespace(eos_token_id=1, pad_token_id=0)
PROMPTS = {0: [[5, 9, 14], [7, 3, 22, 31, 8]], 1: [[40, 41], [11, 12, 13, 14, 15, 16]]}
NEW_TOKENS = {0: 3, 1: 9}


def worker() -> None:
    import deepspeed
    from transformers import LlamaForCausalLM

    from fastpo.engine.data.assets import tiny_llama_config
    from fastpo.engine.online.generation import (
        SamplingOptions,
        gathered_for_generation,
        generate,
    )
    from fastpo.engine.train.runtime import skip_deepspeed_shm_op

    skip_deepspeed_shm_op()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(97, initializer_range=0.2, pad_token_id=0,
                                               eos_token_id=1, bos_token_id=2))
    rank = int(os.environ.get("RANK", -1))
    options = SamplingOptions(max_new_tokens=NEW_TOKENS[rank], samples_per_prompt=2, top_k=1)
    expected = generate(copy.deepcopy(model), TOKENIZER, PROMPTS[rank], options=options,
                        generator=torch.Generator().manual_seed(0))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    weight = model.model.embed_tokens.weight
    partitioned_before = weight.numel() == 0
    with gathered_for_generation(engine) as module:
        gathered = tuple(module.model.embed_tokens.weight.shape)
        got = generate(module, TOKENIZER, PROMPTS[rank], options=options,
                       generator=torch.Generator().manual_seed(0))
    partitioned_after = weight.numel() == 0
    ids = torch.tensor([PROMPTS[rank][0] + [4, 6]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    out = Path(os.environ[REPORT_DIR_ENV]) / f"rank{rank}.json"
    out.write_text(json.dumps({
        "rank": rank, "expected": expected, "got": got, "gathered": gathered,
        "partitioned_before": partitioned_before, "partitioned_after": partitioned_after,
        "loss": float(loss)}))


@pytest.mark.distributed
def test_zero3_generation_matches_the_unsharded_model(tmp_path):
    from trainer_helpers import launch_workers  # tests/ is not on a worker's path

    _, reports = launch_workers(__file__, tmp_path, world=WORLD, report_env=REPORT_DIR_ENV)
    for report in reports:
        rank = report["rank"]
        assert report["partitioned_before"] and report["partitioned_after"], report
        assert report["gathered"] == [97, 64], report
        assert report["got"] == report["expected"], report
        assert all(len(ids) == NEW_TOKENS[rank] or ids[-1] == TOKENIZER.eos_token_id
                   for samples in report["got"] for ids in samples)
        assert report["loss"] == report["loss"]  # finite step after generation


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()
