"""Ranked data through the engine: the pair rules on K-way rows equal the same pairs expanded
into pair rows (loss and every gradient), the precomputed reference stores per-completion
values, and the trainer runs ranked files (pair rules, Plackett–Luce, every layout) end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_helpers import job, losses, run
from transformers import LlamaConfig, LlamaForCausalLM

from fastpo.engine.data.batch import collate_pairs, collate_ranked
from fastpo.engine.data.dataset import DataStats, TokenizedDataset, TokenizedPair
from fastpo.engine.data.ranked import TokenizedRanked, expand_pairs
from fastpo.engine.model.forward import forward_logps
from fastpo.engine.model.reference import FrozenReference
from fastpo.engine.model.reference_cache import precompute_reference_logps
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train.loss_config import LossConfig
from fastpo.engine.train.objective import Objective
from fastpo.engine.train.ranked_config import RankedConfig

VOCAB = 83
# K = 4 (a tie), 3, 2 and 5; ragged prompts and completions
SHAPES = [(4, [3, 5, 1, 2], [0.9, 0.2, 0.5, 0.5]), (1, [2, 1, 4], [1.0, 3.0, 2.0]),
          (6, [1, 3], [0.0, 1.0]), (2, [2, 2, 3, 1, 4], [5.0, 1.0, 4.0, 2.0, 3.0])]


def tiny(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def items() -> list[TokenizedRanked]:
    g = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [TokenizedRanked(ids(p), [ids(n) for n in sizes], scores)
            for p, sizes, scores in SHAPES]


def step(objective, policy, reference, batch):
    policy.zero_grad()
    with torch.no_grad():
        ref = reference.reference_logps(batch)
    out = objective(forward_logps(policy, batch), ref, batch)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("rule, margin, loss_type", [
    ("all", 0.0, "sigmoid"), ("best_worst", 0.0, "ipo"), ("adjacent", 0.5, "hinge")])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["kway-rows", "completion-rows"])
def test_pair_rules_equal_expanded_pairs(rule, margin, loss_type, share_prompt):
    policy, reference = tiny(0), FrozenReference(tiny(1), use_fused_linear=True)
    objective = Objective(LossConfig(loss_type=[loss_type], beta=0.2), vocab_size=VOCAB,
                          ranked=RankedConfig(pairs=rule, margin=margin))
    ranked = items()
    batch = collate_ranked(ranked, pad_token_id=0, pairs=rule, margin=margin,
                           share_prompt=share_prompt)
    out, grads = step(objective, policy, reference, batch)
    expanded = [TokenizedPair(*p) for p in expand_pairs(ranked, rule=rule, margin=margin)]
    pairs = collate_pairs(expanded, pad_token_id=0)
    assert batch.num_pairs == len(expanded) and pairs.num_sequences == 2 * len(expanded)
    ref_out, ref_grads = step(objective, policy, reference, pairs)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.eval_sums, ref_out.eval_sums, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # K-way rows run every completion once: ΣK sequences instead of 2·pairs
    assert batch.num_sequences == sum(len(s) for _, s, _ in SHAPES)
    assert 0.0 <= out.metrics["rewards/ranking_accuracy"].item() <= 1.0


def test_plackett_luce_objective_and_its_metrics():
    policy, reference = tiny(0), FrozenReference(tiny(1))
    objective = Objective(LossConfig(beta=0.2), vocab_size=VOCAB,
                          ranked=RankedConfig(loss="plackett_luce"))
    batch = collate_ranked(items(), pad_token_id=0, share_prompt=True)
    out, grads = step(objective, policy, reference, batch)
    with torch.no_grad():
        r = 0.2 * (forward_logps(policy, batch).sequence.logps.double()
                   - reference.reference_logps(batch).sequence.logps.double())
    expected = []
    for ranking in batch.ranked.order.tolist():
        ranking = [k for k in ranking if k >= 0]
        expected.append(-sum(r[ranking[k]] - torch.logsumexp(r[ranking[k:]], 0)
                             for k in range(len(ranking) - 1)))
    torch.testing.assert_close(out.loss.double(), torch.stack(expected).mean(), rtol=1e-5,
                               atol=1e-6)
    assert out.eval_sums[0].item() == len(SHAPES)  # evaluation counts items
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert set(out.metrics) >= {"rewards/ranking_accuracy", "rewards/pair_accuracy", "ref_kl"}


@pytest.mark.parametrize("share_prompt", [True, False])
def test_precomputed_reference_stores_each_completion_once(tmp_path, share_prompt):
    ranked = items()
    dataset = TokenizedDataset([], [], DataStats(rows=4, kept=4), {"ranked": True},
                               ranked).with_pair_rule("adjacent")
    reference = FrozenReference(tiny(1))
    cache = precompute_reference_logps(reference, dataset, tmp_path / "ref.safetensors",
                                       pad_token_id=0, key="k", pairs_per_batch=2,
                                       share_prompt=share_prompt)
    assert cache.tensors["completion_logps"].shape == (sum(len(s) for _, s, _ in SHAPES),)
    batch = collate_ranked([ranked[3], ranked[1]], pad_token_id=0, indices=[3, 1],
                           share_prompt=True)
    got = cache.reference_logps(batch).sequence.logps
    torch.testing.assert_close(got, reference.reference_logps(batch).sequence.logps,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds ranked logps but the batch is not"):
        cache.reference_logps(collate_pairs([TokenizedPair([1], [2], [3])], pad_token_id=0,
                                            indices=[0]))


# ------------------------------------------------------------------------------ trainer
def ranked_rows(demo_pairs_path) -> list[dict]:
    """12 ranked items of 3-4 completions built from real demo pairs (their chosen and
    rejected answers, and cut-down copies), scores and ranks in every accepted form."""
    pairs = json.loads(demo_pairs_path.read_text())[:12]
    rows = []
    for i, pair in enumerate(pairs):
        prompt = [{"role": "user" if t["from"] == "human" else "assistant",
                   "content": t["value"]} for t in pair["conversations"]]
        texts = [pair["chosen"]["value"], pair["rejected"]["value"],
                 pair["chosen"]["value"][:40] + "...", pair["rejected"]["value"][:20]]
        texts = texts[: 3 + i % 2]
        messages = [[{"role": "assistant", "content": t}] for t in texts]
        if i % 3 == 0:
            rows.append({"prompt": prompt, "completions": messages,
                         "scores": [4.0, 1.0, 2.5, 2.5][: len(texts)]})
        elif i % 3 == 1:
            rows.append({"prompt": prompt, "completions": [m[0] for m in messages],
                         "ranks": [1, 3, 2, 4][: len(texts)]})
        else:
            rows.append({"messages": prompt, "completions": [
                {"messages": m, "score": s} for m, s in zip(messages, [3, 0, 1, 2])]})
    return rows


@pytest.fixture(scope="module")
def ranked_file(tmp_path_factory, demo_pairs_path):
    path = tmp_path_factory.mktemp("ranked") / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ranked_rows(demo_pairs_path)))
    return path


def test_trainer_runs_ranked_files_in_every_layout(tiny_dir, ranked_file, tmp_path):
    common = {"optimization": {"max_steps": 2}}
    shared = run(job(tiny_dir, ranked_file, tmp_path / "a", data={"layout": "shared",
                                                                   "group_by_length": False},
                     **common))
    padded = run(job(tiny_dir, ranked_file, tmp_path / "b", data={"layout": "padded",
                                                                   "group_by_length": False},
                     **common))
    assert losses(shared.history) == pytest.approx(losses(padded.history), rel=2e-5, abs=2e-6)
    assert "rewards/ranking_accuracy" in shared.history[0]
    listwise = run(job(tiny_dir, ranked_file, tmp_path / "c", ranked={"loss": "plackett_luce"},
                       reference={"mode": "precomputed"}, **common))
    assert all(math.isfinite(x) for x in losses(listwise.history))
    auto = run(job(tiny_dir, ranked_file, tmp_path / "d", ranked={"pairs": "best_worst",
                                                                  "margin": 0.5}, **common))
    assert len(auto.history) == 2


def test_ranked_config_refuses_what_cannot_work(tiny_dir, ranked_file, tmp_path):
    with pytest.raises(ValueError, match="plackett_luce' is DPO's ranking loss"):
        config_from_dict(job(tiny_dir, ranked_file, tmp_path, ranked={"loss": "plackett_luce"},
                             loss={"method": "orpo"}))
    with pytest.raises(ValueError, match=r"ranked: .*ld_alpha"):
        run(job(tiny_dir, ranked_file, tmp_path, loss={"ld_alpha": 0.5}))
    with pytest.raises(ValueError, match="Input should be 'best_worst', 'all' or 'adjacent'"):
        config_from_dict(job(tiny_dir, ranked_file, tmp_path, ranked={"pairs": "every"}))


def test_layout_estimate_costs_ranked_items_as_kway_rows():
    """data.layout auto on ranked items: the padded / packed layouts hold one sequence per
    completion (never the expanded pairs), the shared ones one K-way row per item."""
    from fastpo.engine.data import attention_cost as C
    from fastpo.engine.train import layout as Lay

    # 2 items: prompt 300, K = 4 completions of 40 tokens (long prompts: K-way rows pay)
    ranked = [TokenizedRanked([1] * 300, [[2] * 40] * 4, [3.0, 2.0, 1.0, 0.0])] * 2
    data = TokenizedDataset([], [], DataStats(), {"ranked": True}, ranked)
    cpu = C.device_costs("cpu")
    padded = Lay.batch_cost(data, [0, 1], "padded", with_kl=False, attention="segments",
                            device=cpu)
    shared = Lay.batch_cost(data, [0, 1], "shared", with_kl=False, attention="segments",
                            device=cpu)
    packed = Lay.batch_cost(data, [0, 1], "shared_packed", with_kl=False,
                            attention="segments", device=cpu)
    assert padded.tokens == 8 * 340  # one row per completion, 8 rows
    assert shared.tokens == 2 * 460 and packed.tokens == 920  # one K-way row per item
    choice, costs = Lay.choose_layout(data, ["padded", "packed", "shared", "shared_packed"],
                                      dims=C.ModelDims(), pairs_per_batch=2,
                                      max_tokens_per_batch=None, with_kl=False,
                                      attention="segments")
    assert choice in ("shared", "shared_packed")
    by_name = {c.layout: c for c in costs}
    assert by_name[choice].cost < 0.5 * by_name["padded"].cost
