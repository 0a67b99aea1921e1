"""Text to token ids through a tokenizer: the completion's text cut exactly out of a rendered
chat, and batched encoding that names the row and field of a text the tokenizer rejects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .formats import DataFormatError, Messages

TOKENIZE_CHUNK = 512  # texts per tokenizer call


def render_chat(tokenizer: Any, messages: Messages, *, generation_prompt: bool,
                template_kwargs: Mapping[str, Any]) -> str:
    """``messages`` rendered by the tokenizer's chat template, with ``template_kwargs`` (the
    row's ``tools`` and ``data.chat_template_kwargs``, e.g. ``enable_thinking``)."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt,
                                         **template_kwargs)


def render_completion(tokenizer: Any, prompt: Messages, completion: Messages, prompt_text: str,
                      eos: str, where: str, template_kwargs: Mapping[str, Any] | None = None
                      ) -> str:
    """The text of ``completion`` as the chat template renders it after ``prompt``:
    the whole conversation rendered, ``prompt_text`` (the prompt rendered alone with the
    generation prompt) cut off the front, and the rest cut after its last ``eos``."""
    full = render_chat(tokenizer, prompt + completion, generation_prompt=False,
                       template_kwargs=template_kwargs or {})
    if not full.startswith(prompt_text):
        raise DataFormatError(
            f"{where}: the chat template renders the prompt differently alone (with the "
            "generation prompt) than inside the whole conversation, so the completion cannot be "
            "cut at an exact boundary; use a template whose generation prompt is a prefix of the "
            "rendered assistant turn")
    text = full[len(prompt_text):]
    cut = text.rfind(eos)
    return text[: cut + len(eos)] if cut >= 0 else text


def _rejected_text(tokenizer: Any, text: str, label: str, *, special: bool) -> None:
    """Raise a DataFormatError naming ``label`` (row and field) if the tokenizer rejects
    ``text``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataFormatError(
            f"{label} holds a character that is not valid Unicode ({text[exc.start]!r} at "
            f"character {exc.start}, a lone surrogate); the tokenizer cannot encode it") from None
    try:
        tokenizer([text], add_special_tokens=special)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{label}: the tokenizer rejects this text ({exc})") from None


def encode_texts(tokenizer: Any, texts: list[str], *, special: bool,
                 labels: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each text, ``TOKENIZE_CHUNK`` texts per tokenizer call; ``special``: with
    the tokenizer's special tokens. When the tokenizer rejects a chunk, the text at fault is
    found and named by its entry of ``labels`` (row and field) in a DataFormatError."""
    out: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start: start + TOKENIZE_CHUNK]
        try:
            out.extend(tokenizer(chunk, add_special_tokens=special)["input_ids"])
        except (TypeError, ValueError):
            if labels is None:
                raise
            for offset, text in enumerate(chunk):  # find the text at fault, name its row
                _rejected_text(tokenizer, text, labels[start + offset], special=special)
            raise
    return [list(ids) for ids in out]
