"""Fixtures of the trainer tests: a tiny model folder and a small real pairs file."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the SmolLM2 tokenizer, as a model folder."""
    from transformers import LlamaForCausalLM

    from fastpo.engine.assets import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_llama_config(len(tokenizer), initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, demo_pairs_path):
    """The first 16 real demo pairs (sharegpt style) as a JSON file."""
    rows = json.loads(demo_pairs_path.read_text())[:16]
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(rows))
    return path
