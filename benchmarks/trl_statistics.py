"""What TRL's logged statistics cost a patched ``DPOTrainer`` step, three ways, side by side:

    none         the patched head returns zeros for them (what a step costs without them)
    same pass    from the fused op's own pass over the vocabulary (``linear_logprobs_stats``)
    second pass  a second chunked V×H pass after the op (what the patch did before)

    python -m benchmarks.trl_statistics [--layers 6] [--rounds 7] [--length 192]

The policy is SmolLM2-135M's shape (hidden 576, the 49152-token vocabulary, tied head) with
``--layers`` decoder layers and random weights, so that the head is a large share of the step
(the statistics' worst case). One fixed batch of 2 pairs goes through ``compute_loss`` and
``backward``, the variants interleaved for ``--rounds`` rounds after a warm-up; the median of
each is printed with its ratio to "none".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch


def _variants() -> dict[str, Callable]:
    from fastpo.engine.integrations import trl_head
    from fastpo.engine.integrations.head_statistics import head_statistics
    from fastpo.kernels import linear_token_logps

    same_pass = trl_head.linear_path

    def no_stats(head, hidden, labels, mask, settings):
        plain = copy.copy(settings)
        plain.outputs = frozenset({"log_probs"})
        log_probs, _ = same_pass(head, hidden, labels, mask, plain)
        wanted = settings.outputs - {"log_probs"}
        return log_probs, {k: torch.zeros(mask.shape, dtype=torch.bool if k == "is_top1" else
                                          torch.float32) for k in wanted}

    def second_pass(head, hidden, labels, mask, settings):
        w = head.weight
        log_probs = linear_token_logps(hidden, w, labels, ignore_index=-100,
                                       temperature=settings.temperature)
        h = hidden.detach()[mask]
        wanted = settings.outputs & {"entropy", "mean_logits", "is_top1", "log_sum_sq_probs"}
        scored = head_statistics(lambda s, e: torch.nn.functional.linear(h[s:e], w.detach()),
                                 labels[mask], vocab_size=w.shape[0], which=wanted,
                                 transform=lambda z: z / settings.temperature)
        stats = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in scored.items()}
        return log_probs.float(), stats

    return {"none": no_stats, "same pass": same_pass, "second pass": second_pass}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--length", type=int, default=192)
    args = parser.parse_args(argv)

    import datasets
    import trl
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fastpo.engine.data.assets import default_tokenizer_dir
    from fastpo.engine.integrations import trl as fastpo_trl

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=args.layers, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    words = "the quick brown fox jumps over the lazy dog and keeps running far away ".split()
    rows = [{"prompt": " ".join(words[i % 5:] * 3), "chosen": " ".join(words * 4),
             "rejected": " ".join(reversed(words * 3))} for i in range(2)]
    dpo_args = trl.DPOConfig(output_dir="/tmp/fastpo-trl-statistics", report_to="none",
                             per_device_train_batch_size=2, max_length=args.length,
                             use_cpu=True, bf16=False, save_strategy="no")
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=dpo_args,
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    fastpo_trl.patch_trainer(trainer)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tokens = int(inputs["attention_mask"].sum())
    variants = _variants()
    times: dict[str, list[float]] = {name: [] for name in variants}
    original = fastpo_trl.linear_path  # the patched forward's fused-linear path
    try:
        for round_ in range(args.rounds + 1):  # round 0: warm-up
            for name, path in variants.items():
                fastpo_trl.linear_path = path
                trainer.model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = trainer.compute_loss(trainer.model, inputs)
                loss.backward()
                if round_:
                    times[name].append(time.perf_counter() - t0)
    finally:
        fastpo_trl.linear_path = original
    base = statistics.median(times["none"])
    print(f"patched DPOTrainer step (compute_loss + backward), {args.layers} layers, hidden 576, "
          f"vocab {len(tokenizer)}, {tokens} tokens, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} interleaved rounds")
    print("| TRL statistics | step s | vs none |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.3f}x |")


if __name__ == "__main__":
    main()
