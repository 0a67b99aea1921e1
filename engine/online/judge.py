"""A pairwise judge as the scorer: a causal LM asked which of two completions is better.

Contract::

    scorer = JudgeScorer("path/to/judge-lm", device="cuda:1")         # decision="generate"
    scores = scorer.score(prompts, completions)   # [P, K]: each sample's score in [0, 1]
    scorer.last_stats                               # {"comparisons": n, "no_decisions": m}
    JudgeScorer("path/to/judge-lm", decision="probability")   # reads P("1") vs P("2")

Each prompt's ``K`` samples meet round-robin: every pair ``a < b`` is one comparison, asked
once as (``a``, ``b``) and, with ``both_orders`` (default), once more as (``b``, ``a``), so a
judge that prefers a position gives no preference. The question is :data:`JUDGE_TEMPLATE`
filled with the prompt and the two responses (a conversational prompt as ``role: content``
lines), sent as one user message through the judge's chat template (with the generation
prompt; a tokenizer without a template gets the raw text). The judge decides in one of two ways
(``decision``, :data:`JUDGE_DECISIONS`):

- ``"generate"`` (default): it answers greedily in at most ``max_new_tokens`` tokens, read by
  :func:`parse_judge_answer`: ``"1"`` or ``"2"``. Any other answer is a no-decision: counted in
  ``last_stats["no_decisions"]``, never an error. A sample's score is its wins divided by the
  questions it took part in, so a prompt whose questions all went undecided has equal scores
  (a tie, skipped by pair formation).
- ``"probability"``: nothing is generated. One batched forward (left padding, no grad) gives
  the next-token logits after each question; of those, only the tokens ``"1"`` and ``"2"`` (as
  the tokenizer encodes each digit alone; each must be one token, else :class:`ScoringError`)
  count: P(response 1 is better) is the softmax of those two logits (float64). A sample's score
  is the mean, over the questions it took part in, of its probability of being preferred, so a
  judge whose answer does not depend on the question, asked both ways, scores every sample
  exactly 0.5 (a tie). Every question is decided: ``no_decisions`` is 0; ``max_new_tokens`` is
  not used. The logits are the model's, in its dtype: a bfloat16 judge's come in coarse steps
  (0.125 near 20), so many probabilities coincide; load it in float32 (``dtype``) to rank finely.

Loading is as for the reward model (local folder, ``trust_remote_code`` off unless asked, clear
errors).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch

from .generation import pad_left
from .prompts import PromptRecord
from .scoring import Scorer, ScoringError, torch_dtype

__all__ = ["JUDGE_DECISIONS", "JUDGE_TEMPLATE", "JudgeScorer", "judge_question",
           "parse_judge_answer"]

JUDGE_DECISIONS = ("generate", "probability")

JUDGE_TEMPLATE = (
    "You compare two responses to the same prompt and decide which one is better: more "
    "helpful, correct and clear.\n\n"
    "## Prompt\n{prompt}\n\n"
    "## Response 1\n{response_1}\n\n"
    "## Response 2\n{response_2}\n\n"
    "Which response is better? Answer with one character: 1 or 2."
)

_ANSWER = re.compile(r"^[\s\W_]*(?:response\s*)?([12])(?![0-9])", re.IGNORECASE)


def parse_judge_answer(text: str) -> int | None:
    """1 or 2 when the answer starts with that digit (after spaces, punctuation or the word
    "Response": ``"2"``, ``" 1."``, ``"**Response 2**"``), else None (no decision)."""
    match = _ANSWER.match(text)
    return int(match.group(1)) if match else None


def _prompt_text(prompt: PromptRecord) -> str:
    if isinstance(prompt.prompt, str):
        return prompt.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt.prompt)


def judge_question(prompt: PromptRecord, first: str, second: str,
                   template: str = JUDGE_TEMPLATE) -> str:
    """The question put to the judge about ``first`` (response 1) and ``second``."""
    return template.format(prompt=_prompt_text(prompt), response_1=first, response_2=second)


class JudgeScorer(Scorer):
    """Scores by round-robin pairwise comparisons of a judge causal LM, decided by its greedy
    answer or by its probabilities of "1" and "2" (``decision``; module docstring)."""

    def __init__(self, path: str | Path | None = None, *, model: Any | None = None,
                 tokenizer: Any | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, template: str = JUDGE_TEMPLATE,
                 max_new_tokens: int = 8, both_orders: bool = True, batch_size: int = 8,
                 trust_remote_code: bool = False, decision: str = "generate") -> None:
        super().__init__()
        self.name = f"judge {path}" if path is not None else "judge"
        if decision not in JUDGE_DECISIONS:
            raise ScoringError(f"{self.name}: decision must be one of "
                               f"{', '.join(map(repr, JUDGE_DECISIONS))}, got {decision!r}")
        for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScoringError(f"{self.name}: {key} must be a positive int, got {value!r}")
        for key in ("{prompt}", "{response_1}", "{response_2}"):
            if key not in template:
                raise ScoringError(f"{self.name}: the judge template lacks the field {key}")
        if model is None:
            model, tokenizer = self._load(path, dtype, trust_remote_code, tokenizer)
        elif tokenizer is None:
            raise ScoringError(f"{self.name}: pass the tokenizer with the model")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.both_orders = bool(both_orders)
        self.batch_size = batch_size
        self.decision = decision
        self.answer_ids = self._answer_ids() if decision == "probability" else None
        self._keep_last = ({"logits_to_keep": 1} if "logits_to_keep" in
                           inspect.signature(self.model.forward).parameters else {})

    def _answer_ids(self) -> tuple[int, int]:
        """The token ids of "1" and "2" (each digit encoded alone, no special tokens)."""
        ids = []
        for digit in ("1", "2"):
            got = list(self.tokenizer(digit, add_special_tokens=False)["input_ids"])
            if len(got) != 1:
                tokenizer = (f"{type(self.tokenizer).__name__} "
                             f"({getattr(self.tokenizer, 'name_or_path', '?')})")
                raise ScoringError(f"{self.name}: decision 'probability' reads the judge's "
                                   "next-token probabilities of '1' and '2', each one token, but "
                                   f"the tokenizer {tokenizer} encodes {digit!r} as the token "
                                   f"ids {got}; use decision 'generate'")
            ids.append(got[0])
        if ids[0] == ids[1]:
            raise ScoringError(f"{self.name}: the tokenizer encodes '1' and '2' as the same "
                               f"token id {ids[0]}")
        return ids[0], ids[1]

    def _load(self, path: str | Path | None, dtype: Any, trust_remote_code: bool,
              tokenizer: Any | None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if path is None or not Path(path).is_dir():
            raise ScoringError(f"{self.name}: no such folder (a judge is a causal LM loaded "
                               "from a local folder saved with save_pretrained)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code,
                dtype=torch_dtype(dtype))
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ScoringError(f"{self.name}: cannot load it as a causal LM with its tokenizer "
                               f"({exc})") from None
        return model, tokenizer

    def _question_ids(self, question: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is not None:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False,
                add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(question)["input_ids"])

    @torch.no_grad()
    def answers(self, questions: list[str]) -> list[str]:
        """The judge's greedy answers to ``questions`` (decoded, special tokens skipped)."""
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else eos_id
        out: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            ids, mask = pad_left([self._question_ids(q) for q in
                                  questions[start: start + self.batch_size]], pad_id,
                                 self.device)
            generated = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                            max_new_tokens=self.max_new_tokens,
                                            eos_token_id=eos_id, pad_token_id=pad_id,
                                            temperature=None, top_p=None, top_k=None)
            out.extend(self.tokenizer.batch_decode(generated[:, ids.shape[1]:],
                                                   skip_special_tokens=True))
        return out

    @torch.no_grad()
    def preferences(self, questions: list[str]) -> list[float]:
        """P(response 1 is better) for each question: the softmax of the judge's next-token
        logits of "1" and "2" after it (float64; decision "probability")."""
        if self.answer_ids is None:
            self.answer_ids = self._answer_ids()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        columns = torch.tensor(self.answer_ids, device=self.device)
        out: list[float] = []
        for start in range(0, len(questions), self.batch_size):
            ids, mask = pad_left([self._question_ids(q) for q in
                                  questions[start: start + self.batch_size]], pad_id,
                                 self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **self._keep_last).logits[:, -1]
            two = logits.index_select(-1, columns).double()
            out.extend(torch.softmax(two, dim=-1)[:, 0].tolist())
        return out

    def _probability_scores(self, asked: list[tuple[int, int, int]], questions: list[str],
                            prompts: int, samples: int) -> list[list[float]]:
        """Each sample's mean probability of being preferred. Asked both ways, a pair's two
        questions are averaged first (P(a) = (P1(a, b) + 1 - P1(b, a)) / 2, exactly 0.5 when
        the two are equal), so a position-only judge ties every sample exactly."""
        first = self.preferences(questions)
        share = [[0.0] * samples for _ in range(prompts)]
        pairs = [[0] * samples for _ in range(prompts)]
        step = 2 if self.both_orders else 1
        for i in range(0, len(asked), step):
            p, a, b = asked[i]
            prefer_a = first[i] if step == 1 else (first[i] + (1.0 - first[i + 1])) / 2
            share[p][a] += prefer_a
            share[p][b] += 1.0 - prefer_a
            pairs[p][a] += 1
            pairs[p][b] += 1
        self.last_stats = {"comparisons": len(asked), "no_decisions": 0}
        return [[s / n for s, n in zip(sr, nr)] for sr, nr in zip(share, pairs)]

    def compute(self, prompts: list[PromptRecord], completions: list[list[str]]
                ) -> list[list[float]]:
        samples = len(completions[0])
        asked: list[tuple[int, int, int]] = []  # (prompt, sample shown first, shown second)
        for p in range(len(prompts)):
            for a in range(samples):
                for b in range(a + 1, samples):
                    asked.append((p, a, b))
                    if self.both_orders:
                        asked.append((p, b, a))
        questions = [judge_question(prompts[p], completions[p][a], completions[p][b],
                                    self.template) for p, a, b in asked]
        if self.decision == "probability":
            return self._probability_scores(asked, questions, len(prompts), samples)
        answers = self.answers(questions)
        wins = [[0] * samples for _ in prompts]
        taken = [[0] * samples for _ in prompts]
        undecided = 0
        for (p, a, b), answer in zip(asked, answers):
            taken[p][a] += 1
            taken[p][b] += 1
            choice = parse_judge_answer(answer)
            if choice is None:
                undecided += 1
            else:
                wins[p][a if choice == 1 else b] += 1
        self.last_stats = {"comparisons": len(asked), "no_decisions": undecided}
        return [[w / t for w, t in zip(wr, tr)] for wr, tr in zip(wins, taken)]
