"""The ``trl`` extra (``pip install 'fastpo[trl]'``), checked in its own venv: ``patch_trainer``
makes a TRL ``DPOTrainer`` compute its log-probs with fastpo, with TRL's own numbers.

Run by ``install_paths.py`` (``make test-install``) with the fresh venv's python, from a scratch
folder outside the checkout; not collected by pytest. Argument: the SmolLM2 tokenizer folder.
Two trainers on copies of one tiny random Llama train 2 steps each, one as TRL ships it, one
patched; TRL's own chunked log-prob function is made to fail in the patched run, so its losses
(equal to the stock run's) were computed by fastpo's fused linear op on every step.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from pathlib import Path

from check_kernels_only import fail

STEPS = 2
PAIRS = [
    ("What is the capital of France?", " Paris.", " Rome, I think."),
    ("Name a prime number.", " Seven.", " Nine is prime."),
    ("2 + 2 =", " 4", " 5, obviously"),
    ("Which planet is red?", " Mars.", " Venus is the red one."),
]


def main() -> None:
    import datasets
    import torch
    import trl
    import trl.trainer.utils as trl_utils
    from transformers import AutoTokenizer, LlamaForCausalLM

    import fastpo
    from fastpo.engine.data.assets import tiny_llama_config
    from fastpo.engine.integrations.trl import path_counts

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    with torch.no_grad():
        base.lm_head.weight.mul_(5.0)  # logps that vary per token
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    out = Path(tempfile.mkdtemp(dir=Path.cwd()))

    def trainer(name: str):
        args = trl.DPOConfig(output_dir=str(out / name), max_steps=STEPS, logging_steps=1,
                             bf16=False, report_to="none", save_strategy="no", use_cpu=True,
                             optim="sgd", learning_rate=1.0, seed=0, max_length=32,
                             disable_tqdm=True, dataloader_num_workers=0,
                             per_device_train_batch_size=2, lr_scheduler_type="constant")
        return trl.DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                              args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)

    def losses(t) -> list[float]:
        t.train()
        return [e["loss"] for e in t.state.log_history if "loss" in e]

    stock = losses(trainer("stock"))
    patched = fastpo.patch_trainer(trainer("fastpo"))

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's chunked log-prob function ran in a fastpo-patched trainer")

    trl_utils._ChunkedLogProbFunction = type("Refused", (), {"apply": staticmethod(refuse)})
    fast = losses(patched)
    if len(stock) != STEPS or len(fast) != STEPS:
        fail(f"expected {STEPS} logged steps, got TRL {stock} and patched {fast}")
    if not all(math.isclose(a, b, rel_tol=2e-4, abs_tol=2e-5) for a, b in zip(stock, fast)):
        fail(f"patched losses {fast} differ from TRL's {stock}")
    counts = path_counts(patched)
    if counts["policy"].get("linear", 0) != STEPS:
        fail(f"fastpo's fused linear op did not compute the policy's log-probs: {counts}")
    import transformers

    print(f"trl install: ok (TRL {trl.__version__}, transformers {transformers.__version__}: "
          f"patched DPOTrainer losses {fast} = TRL's {stock}; fastpo paths {counts})")


if __name__ == "__main__":
    main()
