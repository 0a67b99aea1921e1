"""Online DPO on K-way rows: a round's K samples per prompt in one row train on the same pairs
with the same loss as pair rows; a saturated scorer no longer stalls a round (the extra sampling
is capped, the round trains on what it has and says so), and the saturation is logged."""

from __future__ import annotations

import json
import textwrap

import pytest
from trainer_helpers import importable_module, losses, merge, run

REWARDS = textwrap.dedent("""
    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    def parity(prompts, completions):
        return [float(len(c) % 2) for c in completions]
""")


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory):
    with importable_module(tmp_path_factory.mktemp("rewards"), "kway_rewards", REWARDS) as folder:
        yield folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Count from {i} to {i + 4}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_job(tiny_dir, prompts_file, out, **sections) -> dict:
    base = {
        "model": {"name_or_path": str(tiny_dir),
                  "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"max_prompt_length": 24, "layout": "shared"},
        "optimization": {"learning_rate": 1e-3, "max_steps": 2, "micro_batch_size": 16},
        "logging": {"output_dir": str(out), "progress": "none", "tensorboard": False,
                    "eval_before": False},
        "checkpoint": {"export": "none"},
        "online": {"prompts": str(prompts_file), "samples_per_prompt": 4, "max_new_tokens": 6,
                   "prompts_per_generation": 4, "pair_rule": "all_above_margin",
                   "scorer": {"function": "kway_rewards:length"}},
    }
    return merge(base, sections)


def test_kway_rounds_train_the_same_pairs_and_loss_as_pair_rows(tiny_dir, prompts_file,
                                                                rewards_module, tmp_path):
    # one step (a later round samples from a policy that differs by float noise); the step's
    # gradient norm stands for its gradient; micro-batches large enough for every pair (pair
    # rows cap pairs per micro-batch, K-way rows cap items)
    one = {"optimization": {"max_steps": 1, "micro_batch_size": 32}}
    pairs = run(online_job(tiny_dir, prompts_file, tmp_path / "a", online={"kway_rows": False},
                           **one))
    kway = run(online_job(tiny_dir, prompts_file, tmp_path / "b", **one))  # default at K = 4
    assert losses(kway.history) == pytest.approx(losses(pairs.history), rel=1e-5, abs=1e-7)
    for key in ("online/pairs", "online/score_margin", "online/round_pairs",
                "logps/chosen", "logps/rejected", "grad_norm"):
        assert [r[key] for r in kway.history] == pytest.approx(
            [r[key] for r in pairs.history], rel=1e-5), key
    # K-way rows run each sample once: "tokens" counts the K prompt + sample sequences, pair rows
    # count 2 sequences per pair (4 prompts × 4 samples of 6 tokens; 23 pairs)
    assert kway.history[0]["tokens"] < pairs.history[0]["tokens"] / 2
    assert "rewards/ranking_accuracy" in kway.history[0]


def test_a_saturated_scorer_trains_on_what_the_round_has(tiny_dir, prompts_file,
                                                         rewards_module, tmp_path):
    # a binary reward ties many prompts; 4 micro-batches per step want 4 K-way items from 4
    # prompts, and one generation call is all a round may make
    data = online_job(tiny_dir, prompts_file, tmp_path, optimization={
        "max_steps": 3, "gradient_accumulation_steps": 4, "micro_batch_size": 1},
        online={"scorer": {"function": "kway_rewards:parity"}, "max_generation_attempts": 1,
                "pair_rule": "best_worst"})
    result = run(data)
    assert len(result.history) == 3
    for record in result.history:
        assert record["online/generation_attempts"] == 1.0
        assert 0.0 < record["online/saturated_fraction"] <= 1.0
        assert 0.0 <= record["online/tie_fraction"] <= 1.0
        short = record["online/prompts"] * (1 - record["online/skipped_fraction"]) < 4
        assert record["online/short_round"] == float(short)


def test_kway_rows_and_max_pairs_per_prompt_are_refused_together(tiny_dir, prompts_file,
                                                                 tmp_path):
    from fastpo.engine.train.config_loading import config_from_dict

    with pytest.raises(ValueError, match="max_pairs_per_prompt needs pair rows"):
        config_from_dict(online_job(tiny_dir, prompts_file, tmp_path, online={
            "kway_rows": True, "max_pairs_per_prompt": 2}))
    cfg = config_from_dict(online_job(tiny_dir, prompts_file, tmp_path, online={
        "max_pairs_per_prompt": 2}))
    assert not cfg.online.uses_kway_rows()  # the default steps aside
