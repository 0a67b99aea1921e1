"""Helpers shared by the trainer tests (plain process and 2-rank): job dicts and a tiny model."""

from __future__ import annotations

import copy
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

    from fastpo.engine.assets import tiny_llama_config

    config = tiny_llama_config(len(tokenizer), initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id, **config)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
