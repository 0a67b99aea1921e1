"""Ranked-data suite: one DPO step on items of K completions, K-way rows against expanded pairs.

Synthetic ranked items (random token ids, a random score per completion) with prompt and completion
lengths drawn around realistic chat means (prompts 128 ± 60 %, completions 96 ± 67 % tokens); K =
2, 4, 8 (3, 2 and 1 items per step); every ordered pair with a score gap (``pairs: all``, C(K, 2)
per item) trained with sigmoid DPO, β = 0.1, AdamW. Every implementation computes the same loss
(the ``check`` column) on the same items:

    pairs_padded   the pairs expanded into a pair dataset, padded rows (2 sequences per pair)
    pairs_shared   the expanded pairs as [prompt | chosen | rejected] rows (prompt once per pair)
    kway_padded    one padded row per completion (K per item): each completion computed once
    kway_rows      one K-way row [prompt | c1 | … | cK] per item: the prompt once per item
    kway_packed    the K-way rows packed into one row

Beside time and peak memory, each row carries the FLOPs its layout needs (attention pairs and a
forward's FLOPs, padding included, from the lengths) next to ``pairs_padded``'s, and its model-FLOP
utilization: the step's model FLOPs (policy forward + backward and reference forward over its
real tokens) per second over a GEMM rate measured in the same process (:mod:`benchmarks.mfu`).
:func:`summary` prints the FLOP ratios beside the measured speed-ups.

The last group is an online round (``round=online``): 4 prompts of ~64 tokens, 4 sampled
completions of ~48 tokens each, every pair above the margin — today's online path trains it as
``pairs_shared`` rows, with ``online.kway_rows`` as ``kway_rows``.

Model: SmolLM2-135M's shape (hidden 576, 9 / 3 heads, vocab 49152, tied embeddings) with 2
layers in full runs (the layers scale every layout alike; the head and the attention are whole);
a tiny Llama in ``--smoke``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from benchmarks.harness import CaseSpec, SkipCase, Workload
from benchmarks.mfu import batch_mfu_figures, mfu
from benchmarks.suites.e2e import BETA, _optimizer, layout_figures, make_models

IMPLS = ("pairs_padded", "pairs_shared", "kway_padded", "kway_rows", "kway_packed")
NOTES = {"pairs_padded": "expanded pairs, padded rows",
         "pairs_shared": "expanded pairs, [prompt | chosen | rejected] rows",
         "kway_padded": "one padded row per completion",
         "kway_rows": "K-way rows [prompt | c1 | … | cK]",
         "kway_packed": "K-way rows packed into one row"}
ITEMS = {2: 3, 4: 2, 8: 1}  # items per step: C(K, 2) · items pairs = 3, 12, 28


def cases(device: str, size: str) -> list[CaseSpec]:
    """The ranked-step cases at ``size`` on ``device``."""
    if size == "smoke":
        grid = [{"model": "tiny", "V": 512, "K": 3, "I": 2, "Lp": 12, "Lc": 8}]
        reps, warmup = 2, 1
    else:
        layers = 1 if size == "quick" else 2
        lengths = {"Lp": 128, "Lc": 96}
        ks = (4,) if size == "quick" else (2, 4, 8)
        grid = [{"model": "smollm2-135m", "layers": layers, "V": 49152, "K": k, "I": ITEMS[k],
                 **lengths} for k in ks]
        if size != "quick":  # an online round: 4 prompts × 4 samples, all_above_margin
            grid.append({"model": "smollm2-135m", "layers": layers, "V": 49152, "K": 4, "I": 4,
                         "Lp": 64, "Lc": 48, "round": "online"})
        reps, warmup = 2, 1
    dtype = "bf16" if device == "cuda" else "fp32"
    return [CaseSpec(suite="ranked", family="ranked_step", impl=impl,
                     params={**params, "dtype": dtype}, device=device, warmup=warmup, reps=reps)
            for params in grid for impl in IMPLS]


def make_items(params: dict[str, Any], *, seed: int = 0):
    """``I`` ranked items of ``K`` completions: lengths around ``Lp`` / ``Lc`` (± 60 % / 67 %,
    at least 8 / 4 tokens), EOS last, distinct random scores."""
    from fastpo.engine.data.ranked import TokenizedRanked

    rng = random.Random(seed)
    vocab, eos = params["V"], 1

    def ids(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    def around(mean: int, spread: float, low: int) -> int:
        return max(low, round(mean + rng.uniform(-spread, spread) * mean))

    items = []
    for _ in range(params["I"]):
        prompt = ids(around(params["Lp"], 0.6, 8))
        completions = [[*ids(around(params["Lc"], 0.67, 4) - 1), eos]
                       for _ in range(params["K"])]
        items.append(TokenizedRanked(prompt, completions, rng.sample(range(100), params["K"])))
    return items


def build(spec: CaseSpec) -> Workload:
    """The workload of one case (called in the measuring process)."""
    from fastpo.engine.data.batch import collate_pairs, collate_ranked
    from fastpo.engine.data.dataset import TokenizedPair
    from fastpo.engine.data.ranked import expand_pairs
    from fastpo.engine.losses import preference_loss
    from fastpo.engine.model.forward import forward_logps, pair_logps
    from fastpo.engine.model.reference import FrozenReference

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipCase("no CUDA device")
    if spec.impl not in IMPLS:
        raise SkipCase(f"unknown implementation {spec.impl!r}")
    params, device = spec.params, spec.device
    policy, ref_model = make_models(params, device)
    reference = FrozenReference(ref_model)
    items = make_items(params)
    pairs = [TokenizedPair(*p) for p in expand_pairs(items, rule="all")]
    if spec.impl.startswith("pairs_"):
        batch = collate_pairs(pairs, pad_token_id=0, share_prompt=spec.impl == "pairs_shared")
    else:
        batch = collate_ranked(items, pad_token_id=0, pairs="all",
                               share_prompt=spec.impl != "kway_padded",
                               padding_free=spec.impl == "kway_packed")
    batch = batch.to(device)
    optimizer = _optimizer(policy)

    def step() -> torch.Tensor:
        policy.train()
        out = forward_logps(policy, batch).sequence
        ref = reference.sequence_logps(batch)
        chosen, rejected = pair_logps(out, batch)
        ref_chosen, ref_rejected = pair_logps(ref, batch)
        result = preference_loss(chosen.logps, rejected.logps, ref_chosen.logps,
                                 ref_rejected.logps, loss_type="sigmoid", beta=BETA)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.loss.detach()

    padded = collate_pairs(pairs, pad_token_id=0)
    scored = int(batch.target_index.numel())
    figures = layout_figures([(batch.attention_plan, *batch.input_ids.shape)],
                             [tuple(padded.input_ids.shape)], config=policy.config,
                             scored=scored, device=device)
    # the padded pairs score every completion once per pair: their head FLOPs are their own
    figures["padded_forward_flops"] = step_flops(padded, policy.config, device)
    figures.update(batch_mfu_figures(batch, config=policy.config, device=device,
                                     dtype=next(policy.parameters()).dtype))
    figures.update(
        sequences=batch.num_sequences, tokens_computed=int(batch.input_ids.numel()),
        real_tokens=batch.num_tokens, pairs=len(pairs))
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return Workload(step, tokens=tokens, extra=figures, notes=NOTES[spec.impl])


def step_flops(batch: Any, config: Any, device: str) -> float:
    """Forward FLOPs of decoder and head of ``batch`` as laid out (padding included), with its
    own scored tokens."""
    return layout_figures([(batch.attention_plan, *batch.input_ids.shape)],
                          [tuple(batch.input_ids.shape)], config=config,
                          scored=int(batch.target_index.numel()), device=device)["forward_flops"]


def summary(group: list[dict[str, Any]]) -> list[str]:
    """Per row: what it computes, the attention- and step-FLOP ratios of ``pairs_padded`` over
    it, the measured speed-ups over ``pairs_padded`` and ``pairs_shared``, memory against both,
    and its model-FLOP utilization."""
    ok = {r["impl"]: r for r in group if r["status"] == "ok"}
    base, shared = ok.get("pairs_padded"), ok.get("pairs_shared")
    if base is None:
        return []
    lines = ["FLOP ratios = `pairs_padded` FLOPs / the row's (attention: query-key pairs the "
             "rows need; step: forward FLOPs of decoder and head, padding included); speed-up = "
             "median time of `pairs_padded` (or `pairs_shared`) / the row's; MFU = model FLOPs "
             "(policy fwd + bwd, reference fwd, real tokens) per second / the GEMM rate measured "
             "in the same process:", "",
             "| impl | sequences | tokens computed | attention-FLOP ratio | step-FLOP ratio "
             "| speed-up vs padded pairs | ≥ 0.8 × step ratio | speed-up vs shared pairs "
             "| memory vs padded / shared pairs | MFU |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for impl, row in ok.items():
        x = row["extra"]
        attn = x["padded_attention_pairs"] / x["attention_pairs"]
        step = x["padded_forward_flops"] / x["forward_flops"]
        speed = base["median_s"] / row["median_s"]
        vs_shared = shared["median_s"] / row["median_s"] if shared else float("nan")
        mem = (f"{row['peak_mem_bytes'] / base['peak_mem_bytes']:.2f} / "
               f"{row['peak_mem_bytes'] / shared['peak_mem_bytes']:.2f}"
               if shared and base["peak_mem_bytes"] and shared["peak_mem_bytes"]
               and row["peak_mem_bytes"] is not None else "–")
        util = mfu(row)
        lines.append(f"| {impl} | {x['sequences']} | {x['tokens_computed']} | {attn:.2f} "
                     f"| {step:.2f} | {speed:.2f} | {'yes' if speed >= 0.8 * step else 'no'} "
                     f"| {vs_shared:.2f} | {mem} | "
                     f"{'–' if util is None else f'{100 * util:.1f} %'} |")
    return [*lines, ""]
