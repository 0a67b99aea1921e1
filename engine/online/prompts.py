"""The prompts of online training: read once from a file, rendered to token ids on demand.

Contract::

    records = load_prompts("prompts.jsonl")            # list[PromptRecord], never empty
    ids = render_prompt_ids(records[0], tokenizer, max_prompt_length=256)

A prompts file is JSON Lines, a JSON array, Parquet or a ``save_to_disk`` folder (read by
:mod:`fastpo.engine.data.files`), one object per prompt with

- ``prompt``: a string (plain prompt) or a list of ``{"role", "content"}`` messages
  (conversational prompt, checked by :mod:`fastpo.engine.data.formats`; its last message must
  not be the assistant's: the policy writes that turn);
- ``answer`` (optional): the reference answer verifiable rewards compare against (a string; a
  JSON number is kept as its text). Other fields (``chosen``, ``rejected``, ...) are ignored, so
  an offline preference file also serves as a prompts file.

:class:`PromptRecord` keeps ``row`` (the 0-based position of the prompt in the file: the
prompt stream's index, saved on resume) and ``source`` (``"prompts.jsonl line 7"``), which
error messages name. Errors are :class:`~fastpo.engine.data.formats.DataFormatError` naming the
file, the line or row, and the field; a file with no prompts is an error.

Rendering follows the offline path exactly (:mod:`fastpo.engine.data.dataset`): a plain prompt
is tokenized with the tokenizer's special tokens (BOS where it adds one), a conversational prompt
is rendered with the chat template and the generation prompt and tokenized without adding
special tokens; a prompt longer than ``max_prompt_length`` keeps its last tokens (``keep_end``,
the question just before the answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.encoding import encode_texts, render_chat
from ..data.files import UnreadableRow, _source_rows
from ..data.formats import DataFormatError, Messages, _messages

__all__ = ["PromptRecord", "load_prompts", "prompt_text", "render_prompt_ids"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its text or messages, its reference answer, its row and where it came from."""

    prompt: str | Messages
    answer: str | None
    row: int
    source: str

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def _answer(row: dict[str, Any], where: str) -> str | None:
    value = row.get("answer")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataFormatError(f"{where}: field 'answer' must be a string or a number, "
                              f"got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _prompt(row: Any, where: str) -> str | Messages:
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: a prompt record must be an object with a 'prompt' "
                              f"field, got {type(row).__name__}")
    if row.get("prompt") is None:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise DataFormatError(f"{where}: missing field 'prompt' (fields: {fields})")
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{where}: field 'prompt' is empty")
        return value
    messages = _messages(value, where, "prompt")
    if not messages:
        raise DataFormatError(f"{where}: field 'prompt' is an empty message list")
    if messages[-1]["role"] == "assistant":
        raise DataFormatError(f"{where}: field 'prompt' ends with an assistant message; the "
                              "policy writes the assistant's turn, so end with a user message")
    if not any(m["content"].strip() for m in messages):
        raise DataFormatError(f"{where}: field 'prompt' holds no text")
    return messages


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read and check a prompts file; raise ``DataFormatError`` naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path}: no such file or folder")
    records: list[PromptRecord] = []
    for where, row in _source_rows(path, None):
        if isinstance(row, UnreadableRow):  # malformed JSON: its own error, file and line
            raise row.error
        records.append(PromptRecord(_prompt(row, where), _answer(row, where), len(records),
                                    where))
    if not records:
        raise DataFormatError(f"prompts file {path} holds no prompts")
    return records


def prompt_text(record: PromptRecord, tokenizer: Any,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt as the model sees it: the string, or the chat template's rendering of the
    messages with the generation prompt (and ``data.chat_template_kwargs``)."""
    if isinstance(record.prompt, str):
        return record.prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{record.source}: a conversational prompt needs a tokenizer with a "
                         "chat template")
    return render_chat(tokenizer, record.prompt, generation_prompt=True,
                       template_kwargs=chat_template_kwargs or {})


def render_prompt_ids(record: PromptRecord, tokenizer: Any, max_prompt_length: int | None,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of the prompt, as the offline path makes them, cut to its last
    ``max_prompt_length`` tokens (None: no limit)."""
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int)
                                          or isinstance(max_prompt_length, bool)
                                          or max_prompt_length < 1):
        raise ValueError(f"max_prompt_length must be a positive int or None, "
                         f"got {max_prompt_length!r}")
    text = prompt_text(record, tokenizer, chat_template_kwargs)
    (ids,) = encode_texts(tokenizer, [text], special=isinstance(record.prompt, str),
                          labels=[f"{record.source}: field 'prompt'"])
    if not ids:
        raise DataFormatError(f"{record.source}: field 'prompt' gives no tokens")
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return ids
