"""Scorers: a function, a reward model, a judge; every error class names the scorer and the
place (NaN, inf, wrong count, non-number, bad module path, a head that is not one scalar, a
causal LM given as a reward model), and a judge that answers neither is a counted no-decision."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import save_position_judge

from fastpo.engine.online.judge import JudgeScorer, judge_question, parse_judge_answer
from fastpo.engine.online.pairs import form_pairs
from fastpo.engine.online.prompts import PromptRecord
from fastpo.engine.online.reward_model import RewardModelScorer
from fastpo.engine.online.scorers import ScorerSpec, build_scorer
from fastpo.engine.online.scoring import ScoringError

PROMPTS = [PromptRecord("2 + 2 =", "4", 0, "p.jsonl line 1"),
           PromptRecord([{"role": "user", "content": "Say hi."}], None, 7, "p.jsonl line 9")]
COMPLETIONS = [[" 4", " 5", " four"], ["hi", "Hello there!", "no"]]


def lengths(prompts, completions):
    return [float(len(c)) for c in completions]


def returns(values):
    def function(prompts, completions):
        return values
    return function


# ---------------------------------------------------------------------------- function
def test_function_scorer_gets_flat_prompt_major_lists():
    seen = {}

    def spy(prompts, completions, *, bonus):
        seen["prompts"], seen["completions"] = prompts, completions
        return [len(c) + bonus for c in completions]

    scorer = build_scorer({"function": f"{__name__}:lengths"})
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (2, 3)
    assert scores.tolist() == [[2.0, 2.0, 5.0], [2.0, 12.0, 2.0]]
    from fastpo.engine.online.function_scorer import FunctionScorer

    assert FunctionScorer(spy, kwargs={"bonus": 1}).score(PROMPTS, COMPLETIONS)[1, 1] == 13.0
    assert seen["prompts"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert seen["completions"] == COMPLETIONS[0] + COMPLETIONS[1]


def test_function_scorer_accepts_bools_numpy_and_tensors():
    import numpy as np

    from fastpo.engine.online.function_scorer import FunctionScorer

    values = [True, np.float64(0.5), torch.tensor(2.0), 1, 0.25, False]
    assert FunctionScorer(returns(values)).score(PROMPTS, COMPLETIONS).tolist() == [
        [1.0, 0.5, 2.0], [1.0, 0.25, 0.0]]
    tensor = torch.arange(6.0)
    assert FunctionScorer(returns(tensor)).score(PROMPTS, COMPLETIONS).reshape(-1).tolist() \
        == tensor.tolist()


@pytest.mark.parametrize("values, message", [
    ([0.0, math.nan, 0, 0, 0, 0], r"returned nan for prompt row 0 \(p.jsonl line 1\), sample 1"),
    ([0.0, 0, 0, 0, 0, math.inf], r"returned inf for prompt row 7 \(p.jsonl line 9\), sample 2"),
    ([0.0] * 5, r"returned 5 values for 2 prompts × 3 samples; it must return 6"),
    ([[0.0] * 3] * 2, r"returned 2 values .* it must return 6"),
    ([0.0, 0, 0, "1", 0, 0], r"returned str '1' for prompt row 7 .*sample 0; a score is a number"),
    ([0.0, 0, 0, None, 0, 0], r"returned NoneType None for prompt row 7"),
    ({"a": 1}, r"returned dict; it must return a list of 6 numbers"),
    (3.0, r"returned float; it must return a list of 6 numbers"),
    (torch.zeros(2, 3), r"returned \(2, 3\) values"),
])
def test_function_scorer_bad_returns_name_the_function(values, message):
    from fastpo.engine.online.function_scorer import FunctionScorer

    scorer = FunctionScorer(returns(values), name="function my.rewards:f")
    with pytest.raises(ScoringError, match=message) as info:
        scorer.score(PROMPTS, COMPLETIONS)
    assert "my.rewards:f" in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_for_fastpo:f", r"cannot import module 'no_such_module_for_fastpo'"),
    ("fastpo.engine.online.rewards:nope", r"module 'fastpo.engine.online.rewards' has no "
                                          r"attribute 'nope'"),
    ("fastpo.engine.online.rewards:BUILTIN_REWARDS", r"is a tuple, not a function"),
    ("a:b:c", r"expected 'module:function'"),
    (":f", r"expected 'module:function'"),
])
def test_function_scorer_bad_module_paths(spec, message):
    with pytest.raises(ScoringError, match=message):
        build_scorer({"kind": "function", "function": spec})


def test_build_scorer_specs():
    builtin = build_scorer({"function": "exact_match"})
    assert builtin.name == "function fastpo.engine.online.rewards:exact_match"
    assert builtin.score(PROMPTS[:1], COMPLETIONS[:1]).tolist() == [[1.0, 0.0, 0.0]]
    pattern = build_scorer({"function": "format_match", "kwargs": {"pattern": r"\S+"}})
    assert pattern.score(PROMPTS[1:], COMPLETIONS[1:]).tolist() == [[1.0, 0.0, 1.0]]
    with pytest.raises(ScoringError, match="not a built-in reward"):
        build_scorer({"function": "exactly"})
    with pytest.raises(ScoringError, match=r"unknown key.*colour"):
        build_scorer({"function": "exact_match", "colour": "red"})
    with pytest.raises(ScoringError, match="give 'kind'"):
        build_scorer({"device": "cpu"})
    with pytest.raises(ScoringError, match="scorer kind must be one of"):
        ScorerSpec(kind="oracle")
    with pytest.raises(ScoringError, match="a reward_model scorer needs 'path'"):
        ScorerSpec(kind="reward_model")
    with pytest.raises(TypeError, match="ScorerSpec or a mapping"):
        build_scorer(["function"])


def test_score_checks_its_inputs():
    from fastpo.engine.online.function_scorer import FunctionScorer

    scorer = FunctionScorer(lengths)
    with pytest.raises(ValueError, match="2 prompts but 1 completion lists"):
        scorer.score(PROMPTS, COMPLETIONS[:1])
    with pytest.raises(ValueError, match="prompt 1 has 2 completions"):
        scorer.score(PROMPTS, [COMPLETIONS[0], COMPLETIONS[1][:2]])
    with pytest.raises(TypeError, match="completion 0 of prompt 0 must be a string"):
        scorer.score(PROMPTS[:1], [[[1, 2], "x"]])


# ------------------------------------------------------------------------- reward model
def save_reward_model(path, tokenizer, num_labels):
    from transformers import LlamaForSequenceClassification

    from fastpo.engine.data.assets import tiny_llama_config

    config = tiny_llama_config(len(tokenizer), num_labels=num_labels, initializer_range=0.1,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_reward_model_scores_each_sequence_like_alone(tmp_path, tokenizer):
    path = save_reward_model(tmp_path / "rm", tokenizer, num_labels=1)
    scorer = build_scorer({"reward_model": str(path), "batch_size": 4})
    assert isinstance(scorer, RewardModelScorer)
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    assert len(set(scores.reshape(-1).tolist())) == 6  # the text matters
    # each score equals the model's output on that text alone (padding does not leak)
    model = scorer.model
    for p, prompt in enumerate(PROMPTS):
        for k, completion in enumerate(COMPLETIONS[p]):
            if isinstance(prompt.prompt, str):
                ids = tokenizer(prompt.prompt + completion)["input_ids"]
            else:
                text = tokenizer.apply_chat_template(
                    [*prompt.prompt, {"role": "assistant", "content": completion}],
                    tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
            assert scores[p, k].item() == pytest.approx(alone.item(), abs=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_reward_model_head_must_be_one_scalar(tmp_path, tokenizer):
    path = save_reward_model(tmp_path / "classifier", tokenizer, num_labels=2)
    with pytest.raises(ScoringError, match=r"reward model .*classifier: its head gives 2 values "
                                           r"per sequence \(num_labels=2\)"):
        RewardModelScorer(path)


def test_reward_model_refuses_a_causal_lm_and_missing_folders(tmp_path, tiny_dir):
    with pytest.raises(ScoringError, match="no weights for the scoring head"):
        RewardModelScorer(tiny_dir)
    with pytest.raises(ScoringError, match="no such folder"):
        RewardModelScorer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="cannot load it"):
        RewardModelScorer(tmp_path / "empty")


# -------------------------------------------------------------------------------- judge
@pytest.mark.parametrize("text, choice", [
    ("1", 1), ("2", 2), (" 2.", 2), ("**Response 1** is better", 1), ("response2", 2),
    ("\n1\n", 1), ("12", None), ("Neither", None), ("", None), ("3", None), ("Both 1 and 2", None),
])
def test_parse_judge_answer(text, choice):
    assert parse_judge_answer(text) == choice


class ScriptedJudge(JudgeScorer):
    """A judge whose answers come from a rule on the question (no model run)."""

    def __init__(self, rule, **kwargs):
        self.rule = rule
        self.questions = []
        super().__init__(model=torch.nn.Linear(1, 1), tokenizer=object(), **kwargs)

    def answers(self, questions):
        self.questions.extend(questions)
        return [self.rule(q) for q in questions]


def _responses(question):
    first = question.split("## Response 1\n")[1].split("\n\n## Response 2")[0]
    second = question.split("## Response 2\n")[1].split("\n\nWhich response")[0]
    return first, second


def test_judge_round_robin_win_rates():
    longer = ScriptedJudge(lambda q: "1" if len(_responses(q)[0]) > len(_responses(q)[1])
                           else "2")
    scores = longer.score(PROMPTS, COMPLETIONS)
    # K = 3: 3 pairs × 2 orders per prompt; each sample is in 4 questions
    assert longer.last_stats == {"comparisons": 12, "no_decisions": 0}
    # equal lengths (" 4" / " 5", "hi" / "no"): "2" both ways, one win each
    assert scores.tolist() == [[0.25, 0.25, 1.0], [0.25, 1.0, 0.25]]
    assert form_pairs(scores).pairs == [(0, 2, 0), (1, 1, 0)]
    assert "Say hi." in longer.questions[6] and "user: Say hi." in longer.questions[6]


def test_judge_position_bias_cancels_with_both_orders():
    biased = ScriptedJudge(lambda q: "1")
    scores = biased.score(PROMPTS, COMPLETIONS)
    assert scores.tolist() == [[0.5] * 3] * 2
    assert form_pairs(scores).tied == 2
    one_order = ScriptedJudge(lambda q: "1", both_orders=False)
    assert one_order.score(PROMPTS, COMPLETIONS).tolist() == [[1.0, 0.5, 0.0]] * 2


def test_judge_that_answers_neither_is_a_counted_no_decision(tiny_dir):
    judge = build_scorer({"judge": str(tiny_dir), "max_new_tokens": 3, "batch_size": 5})
    scores = judge.score(PROMPTS, COMPLETIONS)
    answers = judge.answers([judge_question(PROMPTS[0], " 4", " 5")])
    assert parse_judge_answer(answers[0]) is None  # a random model answers neither
    assert judge.last_stats == {"comparisons": 12, "no_decisions": 12}
    assert scores.tolist() == [[0.0] * 3] * 2
    selection = form_pairs(scores)
    assert selection.pairs == [] and selection.tied == 2


def test_judge_template_and_loading_errors(tmp_path):
    with pytest.raises(ScoringError, match=r"lacks the field \{response_2\}"):
        ScriptedJudge(lambda q: "1", template="{prompt} {response_1}")
    with pytest.raises(ScoringError, match=r"judge .*missing: no such folder"):
        JudgeScorer(tmp_path / "missing")
    with pytest.raises(ScoringError, match="max_new_tokens must be a positive int"):
        ScriptedJudge(lambda q: "1", max_new_tokens=0)


# ------------------------------------------------------------- judge, decision "probability"
def two_token_preference(model, tokenizer, question):
    """P("1") / (P("1") + P("2")) of the judge's next token after ``question`` alone (one
    sequence, no padding), from a plain forward."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    (one,) = tokenizer("1", add_special_tokens=False)["input_ids"]
    (two,) = tokenizer("2", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return 1.0 / (1.0 + math.exp(logits[two].item() - logits[one].item()))


def test_judge_probability_is_the_two_token_softmax_of_each_question_alone(tiny_dir, tokenizer):
    # 2 prompts × 2 samples, one order: 2 questions of different lengths in one padded forward
    judge = build_scorer({"judge": str(tiny_dir), "decision": "probability",
                          "both_orders": False, "batch_size": 2})
    assert isinstance(judge, JudgeScorer) and judge.decision == "probability"
    completions = [[" 4", " five, or maybe 4"], ["hi", "Hello there!"]]
    scores = judge.score(PROMPTS, completions).double()
    assert judge.last_stats == {"comparisons": 2, "no_decisions": 0}
    for p, prompt in enumerate(PROMPTS):
        expected = two_token_preference(judge.model, tokenizer,
                                        judge_question(prompt, *completions[p]))
        assert abs(expected - 0.5) > 1e-4  # the random judge has a preference
        assert scores[p, 0].item() == pytest.approx(expected, abs=1e-5)
        assert scores[p, 1].item() == pytest.approx(1.0 - expected, abs=1e-5)
    assert not judge.model.training
    assert not any(p.requires_grad for p in judge.model.parameters())


def test_judge_probability_both_orders_averages_every_question(tiny_dir, tokenizer):
    judge = JudgeScorer(tiny_dir, decision="probability", batch_size=5)
    scores = judge.score(PROMPTS, COMPLETIONS).double()
    assert judge.last_stats == {"comparisons": 12, "no_decisions": 0}
    for p, prompt in enumerate(PROMPTS):
        preferred = [[] for _ in COMPLETIONS[p]]
        for a in range(3):
            for b in range(3):
                if a != b:  # question (a, b): a shown first
                    first = two_token_preference(judge.model, tokenizer, judge_question(
                        prompt, COMPLETIONS[p][a], COMPLETIONS[p][b]))
                    preferred[a].append(first)
                    preferred[b].append(1.0 - first)
        expected = [sum(v) / len(v) for v in preferred]  # 4 questions each
        assert scores[p].tolist() == pytest.approx(expected, abs=1e-5)
        assert scores[p].sum().item() == pytest.approx(1.5, abs=1e-6)  # K / 2
    assert len(set(scores.reshape(-1).tolist())) == 6  # continuous: the random judge ranks


def test_judge_probability_position_only_judge_ties_exactly_both_ways(tmp_path, tokenizer):
    # a mild position bias: P("1") ≈ 0.6 whatever the question (not 0 or 1, so the exact
    # ties come from averaging both orders, not from rounding)
    path = save_position_judge(tmp_path / "judge", tokenizer, {"1": 0.1, "2": 0.03})
    judge = JudgeScorer(path, decision="probability", batch_size=4)
    first = judge.preferences([judge_question(PROMPTS[0], " 4", " 5"),
                               judge_question(PROMPTS[1], "a much longer response", "no")])
    assert first[0] == first[1] and 0.52 < first[0] < 0.9
    scores = judge.score(PROMPTS, COMPLETIONS)
    assert scores.tolist() == [[0.5] * 3] * 2
    selection = form_pairs(scores)
    assert selection.pairs == [] and selection.tied == 2
    one_order = JudgeScorer(path, decision="probability", both_orders=False)
    p = first[0]
    expected = [p, (1 - p + p) / 2, 1 - p]  # sample 0 is always shown first, 2 always second
    assert one_order.score(PROMPTS, COMPLETIONS).tolist() == [
        pytest.approx(expected, abs=1e-6)] * 2


class DigitsTokenizer:
    """A tokenizer that encodes "1" as ``one`` and "2" as ``two`` (token-id lists)."""

    name_or_path = "fake/split-digits"

    def __init__(self, one, two):
        self.encoded = {"1": one, "2": two}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.encoded[text]}


def test_judge_decision_errors():
    with pytest.raises(ScoringError, match=r"decision must be one of 'generate', 'probability', "
                                           r"got 'logits'"):
        ScriptedJudge(lambda q: "1", decision="logits")
    with pytest.raises(ScoringError, match=r"scorer spec: decision must be one of 'generate', "
                                           r"'probability', got 'vote'"):
        build_scorer({"judge": "lm/", "decision": "vote"})
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ScoringError, match=r"'1' and '2', each one token, but the tokenizer "
                                           r"DigitsTokenizer \(fake/split-digits\) encodes '2' "
                                           r"as the token ids \[29871, 29906\]"):
        JudgeScorer(model=model, tokenizer=DigitsTokenizer([5], [29871, 29906]),
                    decision="probability")
    with pytest.raises(ScoringError, match="encodes '1' and '2' as the same token id 5"):
        JudgeScorer(model=model, tokenizer=DigitsTokenizer([5], [5]), decision="probability")
    # the generate decision never asks for the digits' tokens
    assert JudgeScorer(model=model, tokenizer=DigitsTokenizer([], []),
                       decision="generate").answer_ids is None


def test_judge_decision_in_the_online_config():
    from fastpo.engine.online.config import ScorerConfig

    config = ScorerConfig(judge="lm/", decision="probability")
    assert config.spec()["decision"] == "probability"
    assert "decision" not in ScorerConfig(judge="lm/").spec()  # the scorer's default: generate
    with pytest.raises(ValueError, match=r"decision\n.*decision must be one of 'generate', "
                                         r"'probability', got 'sample'"):
        ScorerConfig(judge="lm/", decision="sample")
    with pytest.raises(ValueError, match="decision applies to a judge scorer, not to this "
                                         "function scorer"):
        ScorerConfig(function="exact_match", decision="generate")
    with pytest.raises(ValueError, match="max_new_tokens applies to a judge's decision "
                                         "'generate'"):
        ScorerConfig(judge="lm/", decision="probability", max_new_tokens=4)
