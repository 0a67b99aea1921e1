"""Fixtures of the trainer tests: a tiny model folder and a small real pairs file."""

from __future__ import annotations

import json

import pytest
from trainer_helpers import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the SmolLM2 tokenizer, as a model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, demo_pairs_path):
    """The first 16 real demo pairs (sharegpt style) as a JSON file."""
    rows = json.loads(demo_pairs_path.read_text())[:16]
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(rows))
    return path
