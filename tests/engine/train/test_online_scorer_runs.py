"""The model scorers inside whole online DPO runs on the tiny Llama: a reward model
(``scorer: {reward_model: folder}``) and a pairwise judge (``scorer: {judge: folder}``) score the
generated samples, the pairs they form train the policy, the logged scores are the scorer's,
the scorer model is never trained nor checkpointed, and a judge that cannot rank (position-only
answers asked both ways, or answers that are neither "1" nor "2") stops the run naming why; a
judge that decides by its probabilities of "1" and "2" (``decision: probability``) decides
every question.
The scorers alone are tested in ``tests/engine/online/test_online_scorers.py``; the loop with
a function scorer in ``test_online_training.py`` (whose job and prompts this file reuses)."""

from __future__ import annotations

import math

import pytest
import torch
from test_online_training import online_job, prompts_file  # noqa: F401 (prompts_file: fixture)
from trainer_helpers import run, save_position_judge

from fastpo.engine.online.judge import JudgeScorer, judge_question, parse_judge_answer
from fastpo.engine.online.prompts import PromptRecord
from fastpo.engine.online.reward_model import RewardModelScorer
from fastpo.engine.train import Callback
from fastpo.engine.train.metrics_log import read_jsonl
from fastpo.engine.train.online_metrics import round_metrics, scorer_counts, scorer_metrics


def lora_b_moved(module: torch.nn.Module) -> bool:
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    return bool(lora_b) and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def assert_trained(records: list[dict], steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert math.isfinite(record["loss"]) and not record["skipped"]
        assert record["grad_norm"] > 0 and record["online/pairs"] > 0


def train_completed(data: dict, out, steps: int) -> tuple[Grab, list[dict]]:
    """Run ``data`` to completion (``steps`` steps); every step trained and moved LoRA B."""
    grab = Grab()
    result = run(data, callbacks=[grab])
    assert result.steps == steps and result.stopped == "completed"
    records = read_jsonl(out / "metrics.jsonl", "train")
    assert_trained(records, steps)
    assert lora_b_moved(grab.trainer.backend.module)
    return grab, records


def with_scorer(data: dict, **scorer) -> dict:
    """``data`` scored by ``scorer`` instead of the job's function (``merge`` would keep both
    kinds, which the config refuses)."""
    data["online"]["scorer"] = scorer
    return data


class Grab(Callback):
    """Per step: the pairs of the round in training, the indices this step trained on, the
    trainer (its source, scorer, policy, optimizer)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.trainer = None

    def on_before_optimizer_step(self, trainer) -> None:
        source = trainer.source
        self.trainer = trainer
        self.steps.append({"items": list(source.round["items"]),
                           "chosen": list(source.round["chosen"]),
                           "rejected": list(source.round["rejected"]),
                           "members": [i for g in source._step_groups for i in g]})


# ------------------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny random ``LlamaForSequenceClassification`` with one output (a reward model)."""
    from transformers import LlamaForSequenceClassification

    from fastpo.engine.data.assets import tiny_llama_config

    path = tmp_path_factory.mktemp("reward-model")
    config = tiny_llama_config(len(tokenizer), num_labels=1, initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def reward_of(model, tokenizer, prompt: PromptRecord, completion_ids: list[int]) -> float:
    """The reward model's scalar for one completion, computed here alone (no batch, no pad)."""
    completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
    if isinstance(prompt.prompt, str):
        ids = tokenizer(prompt.prompt + completion)["input_ids"]
    else:
        text = tokenizer.apply_chat_template(
            [*prompt.prompt, {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_a_reward_model_scores_the_pairs_of_a_training_run_and_is_never_trained(
        tiny_dir, prompts_file, reward_model_dir, tokenizer, tmp_path):  # noqa: F811
    from safetensors import safe_open
    from transformers import LlamaForSequenceClassification

    # pair rows (kway_rows off), so that each item is a (chosen, rejected) pair to re-score
    data = with_scorer(online_job(tiny_dir, prompts_file, tmp_path,
                                  checkpoint={"every_steps": 3}, online={"kway_rows": False}),
                       reward_model=str(reward_model_dir))
    grab, records = train_completed(data, tmp_path, 3)
    trainer = grab.trainer

    # the logged scores are the reward model's, recomputed here from the saved folder
    saved = LlamaForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    source = trainer.source
    by_ids = {tuple(source.prompt_ids(r)): source.prompts[r] for r in range(len(source.prompts))}
    for step, record in zip(grab.steps, records):
        rewards = [(reward_of(saved, tokenizer, by_ids[tuple(p.prompt_ids)], p.chosen_ids),
                    reward_of(saved, tokenizer, by_ids[tuple(p.prompt_ids)], p.rejected_ids))
                   for p in step["items"]]
        assert [c for c, _ in rewards] == pytest.approx(step["chosen"], abs=1e-5)
        assert [r for _, r in rewards] == pytest.approx(step["rejected"], abs=1e-5)
        chosen = [rewards[i][0] for i in step["members"]]
        rejected = [rewards[i][1] for i in step["members"]]
        assert record["online/chosen_score_mean"] == pytest.approx(
            sum(chosen) / len(chosen), abs=1e-5)
        assert record["online/rejected_score_mean"] == pytest.approx(
            sum(rejected) / len(rejected), abs=1e-5)
        assert record["online/score_margin"] == pytest.approx(
            sum(chosen) / len(chosen) - sum(rejected) / len(rejected), abs=1e-5)
        assert record["online/score_margin"] > 0  # best vs worst of the reward model
        assert not any(k.startswith("online/scorer_") for k in record)  # it keeps no counters

    # the reward model: frozen, unchanged by training, in no optimizer and no checkpoint
    scorer = source.scorer
    assert isinstance(scorer, RewardModelScorer) and not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    after = scorer.model.state_dict()
    for name, value in saved.state_dict().items():
        assert torch.equal(after[name], value), name
    optimized = {id(p) for group in trainer.backend.optimizer.param_groups
                 for p in group["params"]}
    lora = {id(p) for n, p in trainer.backend.module.named_parameters() if "lora_" in n}
    assert optimized == lora
    assert not optimized & {id(p) for p in scorer.model.parameters()}
    checkpoint = tmp_path / "checkpoints" / "step-00000003"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys) and not any("score" in k for k in keys)
    assert len(keys) == len(lora)


# -------------------------------------------------------------------------------- judge
@pytest.fixture(scope="module")
def always_one_judge_dir(tmp_path_factory, tokenizer):
    """A tiny Llama that answers "1" to every chat question, greedily: its logit of "1" after
    the chat template's generation prompt is large and positive whatever the question, every
    other logit 0 (``save_position_judge``)."""
    return save_position_judge(tmp_path_factory.mktemp("judge-always-1"), tokenizer,
                               {"1": 100.0})


def judge_job(tiny_dir, prompts_file, out, judge, **scorer) -> dict:  # noqa: F811
    """2 steps on one generation round of 4 prompts × 3 samples, scored by ``judge``."""
    return with_scorer(online_job(tiny_dir, prompts_file, out, optimization={"max_steps": 2}),
                       judge=str(judge), batch_size=32, **scorer)


def test_the_always_one_judge_answers_1_whatever_it_is_asked(always_one_judge_dir):
    judge = JudgeScorer(always_one_judge_dir, max_new_tokens=1, both_orders=False)
    prompts = [PromptRecord("What is 2 plus 5?", "7", 0, "p.jsonl line 1"),
               PromptRecord([{"role": "user", "content": "Name a colour."}], None, 3,
                            "p.jsonl line 4")]
    questions = [judge_question(prompts[0], " 7", " seven is the answer"),
                 judge_question(prompts[1], "A long answer: blue, or maybe red.", "green")]
    assert [parse_judge_answer(a) for a in judge.answers(questions)] == [1, 1]
    scores = judge.score(prompts, [["a", "bb", "ccc"], ["x", "y", "z"]])
    assert scores.tolist() == [[1.0, 0.5, 0.0]] * 2  # position 1 always wins: strict order
    assert judge.last_stats == {"comparisons": 6, "no_decisions": 0}


def test_a_judge_scores_the_pairs_of_a_training_run(tiny_dir, prompts_file,  # noqa: F811
                                                    always_one_judge_dir, tmp_path):
    # asked once per pair (both_orders false), the judge prefers the first sample shown: each
    # prompt's 3 samples get win rates 1, 0.5, 0 (the first sample beats both others)
    data = judge_job(tiny_dir, prompts_file, tmp_path, always_one_judge_dir,
                     max_new_tokens=1, both_orders=False)
    grab, records = train_completed(data, tmp_path, 2)
    assert grab.steps[0]["chosen"] == [1.0] * 4 and grab.steps[0]["rejected"] == [0.0] * 4
    for record in records:
        assert record["online/chosen_score_mean"] == 1.0
        assert record["online/rejected_score_mean"] == 0.0
        assert record["online/score_margin"] == 1.0
        assert record["online/score_mean"] == pytest.approx(0.5)
        assert record["online/tie_fraction"] == 0.0 and record["online/round_pairs"] == 4
        # one scoring call: 4 prompts × 3 comparisons, each decided
        assert record["online/scorer_comparisons"] == 12
        assert record["online/scorer_no_decisions"] == 0
        assert record["online/scorer_no_decision_fraction"] == 0.0
    scorer = grab.trainer.source.scorer
    assert isinstance(scorer, JudgeScorer) and not scorer.both_orders
    assert not any(p.requires_grad for p in scorer.model.parameters())


def test_a_judge_asked_both_ways_ties_every_prompt_and_the_run_stops_naming_why(
        tiny_dir, prompts_file, always_one_judge_dir, tmp_path, capsys):  # noqa: F811
    # asked both ways, "1" each time gives every sample one win in two: all ties, no pair
    data = judge_job(tiny_dir, prompts_file, tmp_path, always_one_judge_dir,
                     max_new_tokens=1, both_orders=True)
    result = run(data)
    assert result.stopped == "exhausted" and result.steps == 0 and result.history == []
    assert read_jsonl(tmp_path / "metrics.jsonl", "train") == []  # no step, so no NaN step
    assert read_jsonl(tmp_path / "metrics.jsonl", "summary")[0]["stopped"] == "exhausted"
    err = capsys.readouterr().err
    # 4 generation calls of 4 prompts, 3 pairs × 2 orders each: 96 questions, all decided
    assert "online: 16 prompts of" in err and "gave no pair: every prompt's samples scored " \
        "the same" in err
    assert "96 comparisons, 0 no_decisions" in err and "not one comparison" not in err


def test_a_judge_that_answers_neither_is_counted_and_the_run_stops_naming_why(
        tiny_dir, prompts_file, tmp_path, capsys):  # noqa: F811
    # the random tiny Llama as the judge: its answers are neither "1" nor "2"
    data = judge_job(tiny_dir, prompts_file, tmp_path, tiny_dir, max_new_tokens=2)
    result = run(data)
    assert result.stopped == "exhausted" and result.steps == 0
    assert read_jsonl(tmp_path / "metrics.jsonl", "train") == []
    err = capsys.readouterr().err
    assert "gave no pair" in err and "96 comparisons, 96 no_decisions" in err
    assert "not one comparison was decided: check that the judge answers '1' or '2'" in err


def test_a_probability_judge_decides_every_question_and_its_pairs_train(
        tiny_dir, prompts_file, tmp_path):  # noqa: F811
    # the random tiny Llama as the judge again: its greedy answers decide nothing (above), its
    # probabilities of "1" and "2" decide every question and give continuous scores
    data = judge_job(tiny_dir, prompts_file, tmp_path, tiny_dir, decision="probability")
    grab, records = train_completed(data, tmp_path, 2)
    scorer = grab.trainer.source.scorer
    assert isinstance(scorer, JudgeScorer) and scorer.decision == "probability"
    step = grab.steps[0]
    assert len(step["chosen"]) == 4  # one pair per prompt: no tie
    for chosen, rejected in zip(step["chosen"], step["rejected"]):
        assert 0.0 < rejected < chosen < 1.0
    assert any(4 * c != round(4 * c) for c in step["chosen"])  # not win counts of 4 questions
    for record in records:
        assert record["online/tie_fraction"] == 0.0 and record["online/round_pairs"] == 4
        assert record["online/score_mean"] == pytest.approx(0.5, abs=1e-6)  # K / 2 per prompt
        # one scoring call: 4 prompts × 3 pairs × 2 orders, every one decided
        assert record["online/scorer_comparisons"] == 24
        assert record["online/scorer_no_decisions"] == 0
        assert record["online/scorer_no_decision_fraction"] == 0.0


def test_round_metrics_sum_the_scorer_counters_over_the_round():
    from fastpo.engine.online.pairs import form_pairs

    selection = form_pairs(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 1.0]]))
    stats = [{"comparisons": 12, "no_decisions": 12}, {"comparisons": 12, "no_decisions": 3}]
    metrics = round_metrics([selection], [[1, 2], [3]] * 3, [0.0] * 6, eos_token_id=2,
                            generate_seconds=1.0, pairs=1, unused=0, scorer_stats=stats)
    assert metrics["online/scorer_comparisons"] == 24
    assert metrics["online/scorer_no_decisions"] == 15
    assert metrics["online/scorer_no_decision_fraction"] == pytest.approx(15 / 24)
    assert scorer_metrics(scorer_counts(stats[:1]))["online/scorer_no_decision_fraction"] == 1.0
    assert scorer_metrics(scorer_counts([{}, {}])) == {}  # a scorer without counters adds none
    assert scorer_metrics({"calls": 2}) == {"online/scorer_calls": 2.0}
    plain = round_metrics([selection], [[1, 2], [3]] * 3, [0.0] * 6, eos_token_id=2,
                          generate_seconds=1.0, pairs=1, unused=0)
    assert not any(k.startswith("online/scorer_") for k in plain)
