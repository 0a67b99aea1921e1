"""fastpo.engine.online: the pieces of online DPO — sample, score, pair, train as offline pairs.

    prompts.py          PromptRecord, load_prompts, render_prompt_ids (the offline rendering)
    generation.py       SamplingOptions, generate (K samples per prompt, reproducible), decode,
                        gathered_for_generation (ZeRO-3)
    scoring.py          the Scorer contract, ScoringError, the score checks
    reward_model.py     RewardModelScorer (AutoModelForSequenceClassification, one scalar)
    judge.py            JudgeScorer (a causal LM choosing between two completions)
    function_scorer.py  FunctionScorer ("module:function" verifiable rewards)
    scorers.py          ScorerSpec, build_scorer
    rewards.py          built-in rewards: exact_match, format_match, length_penalty
    pairs.py            form_pairs (best/worst, margin, ties), pairs_to_items, pairs_dataset

One generation batch::

    prompt_ids = [render_prompt_ids(r, tokenizer, max_prompt_length) for r in records]
    completion_ids = generate(policy, tokenizer, prompt_ids, options=options, generator=g)
    scores = scorer.score(records, decode(tokenizer, completion_ids))
    selection = form_pairs(scores, rule="best_worst", margin=0.0,
                           completion_ids=completion_ids)
    data = pairs_dataset(pairs_to_items(selection, prompt_ids, completion_ids),
                         tokenizer=tokenizer)  # -> collate_batch(..., share_prompt=True)

It imports the data and model layers (and the kernels, losses, errors below them), never the
training job.
"""

from .function_scorer import FunctionScorer
from .generation import SamplingOptions, decode, ended, gathered_for_generation, generate
from .judge import JUDGE_TEMPLATE, JudgeScorer, parse_judge_answer
from .pairs import PAIR_RULES, PairSelection, form_pairs, pairs_dataset, pairs_to_items
from .prompts import PromptRecord, load_prompts, render_prompt_ids
from .reward_model import RewardModelScorer
from .scorers import SCORER_KINDS, ScorerSpec, build_scorer
from .scoring import Scorer, ScoringError

__all__ = [
    "JUDGE_TEMPLATE",
    "PAIR_RULES",
    "SCORER_KINDS",
    "FunctionScorer",
    "JudgeScorer",
    "PairSelection",
    "PromptRecord",
    "RewardModelScorer",
    "SamplingOptions",
    "Scorer",
    "ScorerSpec",
    "ScoringError",
    "build_scorer",
    "decode",
    "ended",
    "form_pairs",
    "gathered_for_generation",
    "generate",
    "load_prompts",
    "pairs_dataset",
    "pairs_to_items",
    "parse_judge_answer",
    "render_prompt_ids",
]
