"""A reward model as the scorer: any ``AutoModelForSequenceClassification`` with one output.

Contract::

    scorer = RewardModelScorer("path/to/reward-model", device="cuda:1", batch_size=16)
    scores = scorer.score(prompts, completions)      # [P, K]: the head's scalar per sequence

- Loaded from a local folder (``local_files_only``: nothing is downloaded) with
  ``trust_remote_code`` off unless the caller turns it on; weights from safetensors or
  ``weights_only`` checkpoints as transformers loads them. Run in eval mode without gradient,
  on ``device`` (default: CPU), in ``dtype`` (default: as saved).
- Refused with a :class:`ScoringError`: a folder that is missing or holds no model, a head that
  gives more than one value per sequence (``num_labels`` ≠ 1: a classifier, not a reward model),
  and a checkpoint without the head's weights (a plain causal LM, whose head would be random).
- Text scored: a plain prompt followed by the completion; a conversational prompt with the
  completion as the assistant's turn, rendered by the reward model's own chat template.
  ``max_length`` cuts longer texts (their ends); None keeps them whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .prompts import PromptRecord
from .scoring import Scorer, ScoringError, torch_dtype

__all__ = ["RewardModelScorer", "reward_texts"]


def reward_texts(tokenizer: Any, prompt: PromptRecord, completions: list[str],
                 name: str) -> list[str]:
    """The texts a sequence-classification scorer reads for ``completions`` of ``prompt``."""
    if isinstance(prompt.prompt, str):
        return [prompt.prompt + completion for completion in completions]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ScoringError(f"{name}: {prompt.source} is a conversational prompt but the "
                           "scorer's tokenizer has no chat template")
    return [tokenizer.apply_chat_template(
        [*prompt.prompt, {"role": "assistant", "content": completion}], tokenize=False)
        for completion in completions]


class RewardModelScorer(Scorer):
    """Scores with a sequence-classification reward model (one scalar per sequence)."""

    def __init__(self, path: str | Path | None = None, *, model: Any | None = None,
                 tokenizer: Any | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 8,
                 max_length: int | None = None, trust_remote_code: bool = False) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ScoringError(f"reward model batch_size must be a positive int, "
                               f"got {batch_size!r}")
        self.name = f"reward model {path}" if path is not None else "reward model"
        if model is None:
            if path is None:
                raise ScoringError("a reward model scorer needs a model folder (path)")
            model, tokenizer = self._load(Path(path), torch_dtype(dtype), trust_remote_code,
                                          tokenizer)
        elif tokenizer is None:
            raise ScoringError(f"{self.name}: pass the tokenizer with the model")
        self._check_head(model)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.model.eval()
        if torch_dtype(dtype) is not None:
            self.model = self.model.to(torch_dtype(dtype))
        self.model.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def _load(self, path: Path, dtype: torch.dtype | None, trust_remote_code: bool,
              tokenizer: Any | None) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path.is_dir():
            raise ScoringError(f"{self.name}: no such folder (a reward model is loaded from a "
                               "local folder saved with save_pretrained)")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=trust_remote_code,
                dtype=dtype, output_loading_info=True)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ScoringError(f"{self.name}: cannot load it as a sequence-classification "
                               f"model with its tokenizer ({exc})") from None
        base = f"{getattr(model, 'base_model_prefix', 'model')}."
        head = [k for k in info.get("missing_keys", ()) if not k.startswith(base)]
        if head:
            raise ScoringError(f"{self.name}: the checkpoint has no weights for the scoring "
                               f"head ({', '.join(sorted(head)[:4])}): it is not a reward model "
                               "(a causal LM's head would be random)")
        return model, tokenizer

    def _check_head(self, model: Any) -> None:
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ScoringError(f"{self.name}: its head gives {labels} values per sequence "
                               f"(num_labels={labels}); a reward model gives one scalar "
                               "(num_labels=1)")

    def _batches(self, prompts: list[PromptRecord], completions: list[list[str]]
                 ) -> Iterator[tuple[list[str], bool]]:
        """Batches of texts, each of one kind: plain texts get the tokenizer's special tokens,
        chat renderings hold them already (as in the offline path)."""
        batch: list[str] = []
        kind = True
        for prompt, row in zip(prompts, completions):
            plain = isinstance(prompt.prompt, str)
            for text in reward_texts(self.tokenizer, prompt, row, self.name):
                if batch and (plain != kind or len(batch) == self.batch_size):
                    yield batch, kind
                    batch = []
                batch.append(text)
                kind = plain
        if batch:
            yield batch, kind

    @torch.no_grad()
    def compute(self, prompts: list[PromptRecord], completions: list[list[str]]) -> Tensor:
        values = []
        for texts, plain in self._batches(prompts, completions):
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True,
                                     truncation=self.max_length is not None,
                                     max_length=self.max_length, add_special_tokens=plain)
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()
                                   if k in ("input_ids", "attention_mask")}).logits
            if logits.dim() != 2 or logits.shape[-1] != 1:
                raise ScoringError(f"{self.name}: its head gave logits of shape "
                                   f"{tuple(logits.shape)}; a reward model gives [batch, 1]")
            values.append(logits[:, 0].float().cpu())
        return torch.cat(values).reshape(len(prompts), len(completions[0]))
