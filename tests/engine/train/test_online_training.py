"""Online DPO as a mode of the trainer, end to end on a tiny random Llama with a function scorer:
generation rounds feed the loss, the metrics reach ``metrics.jsonl``, the generated pairs give
the same log-probs as the offline forward of the same pairs, a killed run resumes exactly, and
settings online training cannot use are refused naming their keys. The components (prompts,
sampling, scorers, pair formation) are tested in ``tests/engine/online/``."""

from __future__ import annotations

import json
import math
import os
import signal
import textwrap

import pytest
import torch
from trainer_helpers import importable_module, losses, merge, run, run_killed

from fastpo.engine.train import Callback
from fastpo.engine.train.config import ConfigError
from fastpo.engine.train.config_loading import config_from_dict
from fastpo.engine.train.metrics_log import read_jsonl
from fastpo.engine.train.online_prompts import PromptStream

REWARDS = textwrap.dedent("""
    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    def constant(prompts, completions):
        return [1.0] * len(completions)
""")


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory):
    """A reward module on ``sys.path`` (and ``PYTHONPATH`` for child processes)."""
    with importable_module(tmp_path_factory.mktemp("rewards"), "o2_rewards", REWARDS) as folder:
        yield folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} plus {i + 3}?", "answer": str(2 * i + 3)} for i in range(16)]
    rows[3] = {"prompt": [{"role": "user", "content": "Name a colour."}]}  # conversational
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_job(tiny_dir, prompts_file, out, **sections) -> dict:
    """3 steps of online DPO (LoRA, 2 steps per generation round of 4 prompts × 3 samples)."""
    base = {
        "model": {"name_or_path": str(tiny_dir),
                  "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"max_prompt_length": 24},
        "optimization": {"learning_rate": 1e-3, "max_steps": 3, "micro_batch_size": 2},
        "logging": {"output_dir": str(out), "progress": "none", "tensorboard": False,
                    "eval_before": False},
        "checkpoint": {"export": "none"},
        "online": {"prompts": str(prompts_file), "samples_per_prompt": 3, "max_new_tokens": 6,
                   "prompts_per_generation": 4, "steps_per_generation": 2,
                   "scorer": {"function": "o2_rewards:length"}},
    }
    return merge(base, sections)


# --------------------------------------------------------------------- the loop, the metrics
def test_online_steps_train_on_generated_pairs_and_log_their_metrics(
        tiny_dir, prompts_file, rewards_module, tmp_path):
    data = online_job(tiny_dir, prompts_file, tmp_path, logging={"eval_before": True},
                      online={"eval_prompts": str(prompts_file)})
    seen = {}

    class Grab(Callback):
        def on_step_end(self, trainer, step, record):
            seen[step] = (trainer.source.step_in_round, trainer.source.round is not None)
            seen["module"] = trainer.backend.module

    result = run(data, callbacks=[Grab()])
    assert result.steps == 3
    # round 1 trains steps 1-2, step 3 generates round 2 (and keeps it for step 4)
    assert seen[1] == (1, True) and seen[2] == (0, False) and seen[3] == (1, True)
    records = read_jsonl(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and not record["skipped"]
        assert record["grad_norm"] > 0 and record["tokens"] > 0
        assert record["online/pairs"] == 2  # 4 pairs of a round over 2 micro-batches of 2
        assert record["online/score_margin"] > 0  # best vs worst: chosen scored higher
        assert record["online/chosen_score_mean"] - record["online/rejected_score_mean"] == \
            pytest.approx(record["online/score_margin"])
        assert record["online/prompts"] == 4 and record["online/round_pairs"] == 4
        assert 0 <= record["online/tie_fraction"] <= record["online/skipped_fraction"] <= 1
        assert 1 <= record["online/completion_length_min"] <= \
            record["online/completion_length_max"] <= 6
        assert record["online/generation_tokens_per_s"] > 0 and record["tokens_per_s"] > 0
    # only the steps that generated carry the generation time (kept out of tokens_per_s)
    assert ["online/generation_seconds" in r for r in records] == [True, False, True]
    assert records[0]["online/chosen_score_mean"] != records[2]["online/chosen_score_mean"]
    evals = read_jsonl(tmp_path / "metrics.jsonl", "eval")
    assert [e["when"] for e in evals] == ["before", "after"]
    for e in evals:
        assert e["online/eval_samples"] == 16 * 2 and e["items"] == 16
        assert e["online/eval_score_min"] <= e["online/eval_score_mean"] <= \
            e["online/eval_score_max"]
    summary = read_jsonl(tmp_path / "metrics.jsonl", "summary")[0]
    assert summary["score_before"] == pytest.approx(evals[0]["online/eval_score_mean"])
    assert summary["score_after"] == pytest.approx(evals[1]["online/eval_score_mean"])
    lora_b = [p for n, p in seen["module"].named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the pairs reached the update


@pytest.mark.parametrize("kway", [False, True], ids=["pair-rows", "kway-rows"])
def test_generated_pairs_feed_the_same_forward_as_offline_pairs(tiny_dir, prompts_file,
                                                                rewards_module, tmp_path, kway):
    """The logps of step 1 (LoRA B = 0: the policy is the base model) are those of the base
    model's plain forward over the same generated pairs, collated in another layout; with
    K-way rows (3 samples per prompt in one row) the pairs are picked from them by index."""
    from transformers import AutoModelForCausalLM

    from fastpo.engine.data.batch import collate_batch
    from fastpo.engine.model.forward import forward_logps, pair_logps
    from fastpo.engine.online.kway import ranked_round_dataset
    from fastpo.engine.online.pairs import pairs_dataset

    data = online_job(tiny_dir, prompts_file, tmp_path,
                      optimization={"max_steps": 1, "micro_batch_size": 4},
                      online={"steps_per_generation": 1, "kway_rows": kway})
    captured = {}

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer):
            captured["items"] = list(trainer.source.round["items"])
            captured["layout"] = trainer.cfg.data.layout

    result = run(data, callbacks=[Capture()])
    items = captured["items"]
    assert captured["layout"] == "shared" and len(items) == 4  # one pair (row) per prompt
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    if kway:
        assert all(len(it.completions) == 3 for it in items)
        dataset = ranked_round_dataset(items, rule="best_worst", margin=0.0)
    else:
        assert all(p.chosen_ids != p.rejected_ids for p in items)
        dataset = pairs_dataset(items)
    batch = collate_batch(dataset, list(range(len(items))), pad_token_id=0, share_prompt=False)
    with torch.no_grad():
        chosen, rejected = pair_logps(
            forward_logps(base, batch, use_fused_linear=False).sequence, batch)
    record = result.history[0]
    assert record["logps/chosen"] == pytest.approx(chosen.logps.mean().item(), rel=1e-4)
    assert record["logps/rejected"] == pytest.approx(rejected.logps.mean().item(), rel=1e-4)
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference


# ------------------------------------------------------------------------- kill and resume


def test_a_killed_online_run_resumes_exactly(tiny_dir, prompts_file, rewards_module, tmp_path):
    # 2 steps per round, checkpoint at step 3 (mid round 2: its pairs are in the checkpoint),
    # killed after step 4; the resumed run redoes step 4 from the saved pairs, then generates
    # round 3 from the restored sampling generator and prompt position; dropout makes the
    # global RNG matter
    sections = dict(model={"lora": {"dropout": 0.2}},
                    optimization={"max_steps": 6, "warmup_steps": 1},
                    checkpoint={"every_steps": 3, "keep_last": 2})
    killed = online_job(tiny_dir, prompts_file, tmp_path / "killed", **sections)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(rewards_module), os.environ.get("PYTHONPATH", "")])}
    proc = run_killed(killed, 4, env=env, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000003"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["online"]["step_in_round"] == 1 and state["online"]["prompt_index"] == 8
    saved = json.loads((checkpoint / "source" / "rank00000.json").read_text())
    assert len(saved["round"]["items"]) == 4
    first = read_jsonl(tmp_path / "killed" / "metrics.jsonl", "train")

    resumed = run(merge(killed, {"checkpoint": {"resume": True}}))
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    straight = run(online_job(tiny_dir, prompts_file, tmp_path / "straight", **sections))
    expected = losses(straight.history)
    assert losses(first) == pytest.approx(expected[:4], rel=1e-6, abs=1e-7)
    assert losses(resumed.history) == pytest.approx(expected[3:], rel=1e-6, abs=1e-7)
    for key in ("online/chosen_score_mean", "online/rejected_score_mean", "grad_norm"):
        assert [r[key] for r in resumed.history] == pytest.approx(
            [r[key] for r in straight.history[3:]], rel=1e-6)
    assert [r["epoch"] for r in straight.history] == [0, 0, 0, 0, 0, 0]
    # an offline run cannot continue from an online checkpoint (nor the reverse)
    from fastpo.engine.train.integrity import CheckpointError

    offline = merge(killed, {"checkpoint": {"resume": str(checkpoint)}})
    offline.pop("online")
    with pytest.raises(CheckpointError, match="written by an online run"):
        run(offline)


# --------------------------------------------------------------------------- refused input
@pytest.mark.parametrize("sections, match", [
    ({"reference": {"mode": "precomputed"}}, r"reference.mode 'precomputed' caches"),
    ({"loss": {"method": "kto"}}, r"loss.method 'kto' \(unpaired"),
    ({"optimization": {"max_tokens_per_batch": 512}}, r"optimization.max_tokens_per_batch"),
    ({"online": {"eval_prompts": "/no/such/held_out.jsonl"}},
     r"online.eval_prompts: prompts file /no/such/held_out.jsonl does not exist"),
])
def test_settings_online_training_cannot_use_are_refused(tiny_dir, prompts_file, tmp_path,
                                                         sections, match):
    data = online_job(tiny_dir, prompts_file, tmp_path, **sections)
    with pytest.raises(ConfigError, match=match):
        run(data)


@pytest.mark.parametrize("online, match", [
    ({"samples_per_prompt": 1}, r"online.samples_per_prompt: Input should be greater"),
    ({"scorer": {"function": "m:f", "judge": "x"}}, r"exactly one of .*got judge, function"),
    ({"scorer": {}}, r"online.scorer: give exactly one"),
    ({"scorer": {"function": "not a name"}}, r"'not a name' is neither"),
    ({"top_p": 1.5}, r"online.top_p"),
    ({"max_pairs_per_prompt": 2}, r"applies to pair_rule 'all_above_margin'"),
    ({"sampels_per_prompt": 2}, r"did you mean 'samples_per_prompt'"),
])
def test_online_config_errors_name_the_key(online, match):
    data = {"online": merge({"prompts": "p.jsonl", "scorer": {"function": "m:f"}}, online)}
    if "scorer" in online:
        data["online"]["scorer"] = online["scorer"]
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_a_scorer_that_ties_every_prompt_stops_the_run_with_the_reason(
        tiny_dir, prompts_file, rewards_module, tmp_path):
    data = online_job(tiny_dir, prompts_file, tmp_path,
                      online={"scorer": {"function": "o2_rewards:constant"}})
    result = run(data)
    assert result.stopped == "exhausted" and result.steps == 0
    summary = read_jsonl(tmp_path / "metrics.jsonl", "summary")[0]
    assert summary["stopped"] == "exhausted"


def test_fewer_pairs_than_micro_batches_are_repeated_in_turn(tiny_dir, prompts_file,
                                                             rewards_module, tmp_path):
    """One prompt per generation call, at most 4 calls per round (one pair each at most), and 3
    steps × 2 micro-batches per round: the pairs found fill the 6 micro-batches in turn."""
    data = online_job(tiny_dir, prompts_file, tmp_path,
                      optimization={"max_steps": 3, "gradient_accumulation_steps": 2},
                      online={"prompts_per_generation": 1, "steps_per_generation": 3})
    groups = []

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer):
            groups.append((len(trainer.source.round["items"]), trainer.source._step_groups))

    result = run(data, callbacks=[Grab()])
    assert result.steps == 3 and all(math.isfinite(r["loss"]) for r in result.history)
    pairs = groups[0][0]
    assert 1 <= pairs <= 4
    assert [g for _, step in groups for g in step] == [[i % pairs] for i in range(6)]
    assert result.history[0]["online/prompts"] == 4  # it sampled more prompts first


def test_too_few_prompts_for_a_round_is_named(tiny_dir, prompts_file, rewards_module,
                                              tmp_path):
    data = online_job(tiny_dir, prompts_file, tmp_path, online={"prompts_per_generation": 17})
    with pytest.raises(ValueError, match=r"16 prompts make no generation round of "
                                         r"online.prompts_per_generation 17"):
        run(data)


# ---------------------------------------------------------------------------- the stream
def test_the_prompt_stream_is_seeded_sharded_and_passes_over_every_prompt():
    ranks = [PromptStream(10, seed=3, per_rank=2, rank=k, world_size=2) for k in range(2)]
    rounds = [[s.next_rows() for s in ranks] for _ in range(3)]
    first_pass = [row for r in rounds[:2] for rows in r for row in rows]
    assert len(set(first_pass)) == 8  # disjoint shares, no repeat within a pass
    assert ranks[0].epoch == 1 and ranks[0].rounds_per_pass == 2  # 2 left over: a new pass
    again = PromptStream(10, seed=3, per_rank=2, rank=0, world_size=2)
    assert [again.next_rows() for _ in range(3)] == [r[0] for r in rounds]
    other = PromptStream(10, seed=4, per_rank=2, rank=0, world_size=2)
    assert [other.next_rows() for _ in range(2)] != [r[0] for r in rounds[:2]]
    resumed = PromptStream(10, seed=3, per_rank=2, rank=1, world_size=2)
    resumed.epoch, resumed.index = ranks[1].epoch, ranks[1].index  # what a checkpoint keeps
    assert [resumed.next_rows() for _ in range(3)] == [ranks[1].next_rows() for _ in range(3)]
