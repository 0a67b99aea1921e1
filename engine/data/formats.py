"""Preference record formats: recognise, validate and normalise one row of user data.

Every accepted row becomes one of two canonical forms:

    paired:    {"prompt": P, "chosen": C, "rejected": R}           (DPO, IPO, SimPO, ORPO, ...)
    unpaired:  {"prompt": P, "completion": C, "label": bool}       (KTO)
    ranked:    {"prompt": P, "completions": [C₁, …, C_K], "scores": [s₁, …, s_K]}
               (K ≥ 2 completions of one prompt, higher score better; :mod:`.ranked`)

where ``P``, ``C``, ``R`` are all strings ("standard") or all lists of ``{"role", "content"}``
messages ("conversational", rendered later with the tokenizer's chat template). Accepted inputs:

    prompt / chosen / rejected            strings or message lists
    chosen / rejected                     implicit prompt: the longest common prefix of the two
    conversations / chosen / rejected     sharegpt style, ``{"from", "value"}`` turns
    prompt / completion / label           KTO's unpaired form
    messages / label                      unpaired conversation: the last turn is the completion
    messages / chosen / rejected          the conversation so far is the prompt
    prompt / completions / scores|ranks   ranked: strings, message lists or one assistant message
                                          each; ranks 1 = best (a score of −rank)
    prompt|messages / completions         ranked, each completion an object with its text
                                          (``text``/``content``/``completion``/``messages``) and
                                          its ``score`` or ``rank``

Two optional fields go with any of them: ``system`` (a system prompt, put first in the prompt's
messages) and ``tools`` (a list of tool schemas, or that list as a JSON string, handed to the
chat template). Either makes a row conversational: string prompts and completions become one
user turn and one assistant turn, and the canonical record keeps ``"tools"``.

Errors are :class:`DataFormatError` (a ``ValueError``) naming the row and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
FORMATS = (
    "prompt/chosen/rejected",
    "chosen/rejected (implicit prompt)",
    "conversations/chosen/rejected (sharegpt)",
    "prompt/completion/label (unpaired)",
    "messages/label (unpaired)",
    "messages/chosen/rejected",
    "prompt/completions/scores or ranks (ranked)",
)
RANK_KEYS = ("score", "rank")
TEXT_KEYS = ("text", "content", "completion", "messages")

Messages = list[dict[str, str]]


class DataFormatError(InputError):
    """A row of preference data that cannot be used; the message names the row and the field."""


def _present(row: Mapping[str, Any], key: str) -> bool:
    return key in row and row[key] is not None


def _messages(value: Any, where: str, field: str, *, sharegpt: bool = False) -> Messages:
    """Validate a message list (or one sharegpt turn) and return plain role/content dicts."""
    if isinstance(value, Mapping) and sharegpt:
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        kind = "{from, value} turns" if sharegpt else "{role, content} messages"
        raise DataFormatError(f"{where}: field '{field}' must be a list of {kind}, "
                              f"got {type(value).__name__}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out: Messages = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise DataFormatError(f"{where}: field '{name}' must be an object with "
                                  f"'{role_key}' and '{content_key}', got {type(message).__name__}")
        for key in (role_key, content_key):
            if not _present(message, key):
                raise DataFormatError(f"{where}: field '{name}' has no '{key}'")
            if not isinstance(message[key], str):
                raise DataFormatError(f"{where}: field '{name}.{key}' must be a string, "
                                      f"got {type(message[key]).__name__}")
        role = message[role_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise DataFormatError(f"{where}: field '{name}.from' has unknown role {role!r}; "
                                      f"valid: {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise DataFormatError(f"{where}: field '{name}.role' has unknown role {role!r}; "
                                  f"valid: {', '.join(ROLES)}")
        out.append({"role": role, "content": message[content_key]})
    return out


def _text_or_messages(row: Mapping[str, Any], key: str, where: str) -> str | Messages:
    if not _present(row, key):
        raise DataFormatError(f"{where}: missing field '{key}'")
    value = row[key]
    return value if isinstance(value, str) else _messages(value, where, key)


def _check_completion(messages: Messages, where: str, field: str) -> None:
    if messages and messages[0]["role"] != "assistant":
        raise DataFormatError(f"{where}: field '{field}' must start with an assistant message, "
                              f"got role {messages[0]['role']!r}")


def _same_kind(values: dict[str, str | Messages], where: str) -> None:
    kinds = {key: isinstance(value, str) for key, value in values.items()}
    if len(set(kinds.values())) > 1:
        strings = [k for k, v in kinds.items() if v]
        lists = [k for k, v in kinds.items() if not v]
        raise DataFormatError(f"{where}: fields {', '.join(strings)} are strings but "
                              f"{', '.join(lists)} are message lists; use one form for all")


def _common_text_prefix(a: str, b: str) -> int:
    """Length of the prompt shared by two implicit-prompt strings, at a word boundary.

    The raw common prefix is shortened so that it does not end inside a word ("The ca|t" vs
    "The ca|r" → "The") and so that the whitespace before the first differing word belongs to the
    completions (" cat", " car"), which is how BPE tokenizers see a word after a space.
    """
    n = _common_prefix(a, b)
    if 0 < n < min(len(a), len(b)) and a[n - 1].isalnum() and (a[n].isalnum() or b[n].isalnum()):
        while n > 0 and a[n - 1].isalnum():
            n -= 1
    while n > 0 and a[n - 1].isspace():
        n -= 1
    return n


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, messages) ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _paired(prompt: str | Messages, chosen: str | Messages, rejected: str | Messages,
            where: str) -> dict[str, Any]:
    _same_kind({"prompt": prompt, "chosen": chosen, "rejected": rejected}, where)
    if not isinstance(chosen, str):
        _check_completion(chosen, where, "chosen")
        _check_completion(rejected, where, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _tools(value: Any, where: str) -> list[dict[str, Any]]:
    """A row's tool schemas: a list of objects, or that list (or one object) as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where}: field 'tools' is a string but not JSON "
                                  f"({exc.msg} at character {exc.pos})") from None
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) \
            or not all(isinstance(tool, Mapping) for tool in value):
        raise DataFormatError(f"{where}: field 'tools' must be a list of tool schemas "
                              f"(objects), got {type(value).__name__}")
    return [dict(tool) for tool in value]


def _as_conversation(record: dict[str, Any], system: str | None) -> dict[str, Any]:
    """``record`` with string fields turned into turns and ``system`` first in the prompt."""
    out = dict(record)
    for key in ("prompt", "chosen", "rejected", "completion"):
        if isinstance(out.get(key), str):
            out[key] = [{"role": "user" if key == "prompt" else "assistant",
                         "content": out[key]}]
    if "completions" in out:  # ranked: each string completion one assistant turn
        out["completions"] = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c
                              for c in out["completions"]]
    if system and not (out["prompt"] and out["prompt"][0]["role"] == "system"):
        out["prompt"] = [{"role": "system", "content": system}, *out["prompt"]]
    return out


def normalize_record(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Recognise the format of one row and return its canonical paired or unpaired form (with
    ``system`` folded into the prompt and ``tools`` kept, see the module docstring)."""
    if not isinstance(row, Mapping):
        raise DataFormatError(f"{where}: a record must be an object, got {type(row).__name__}")
    record = _normalize_fields(row, where)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(f"{where}: field 'system' must be a string, "
                              f"got {type(system).__name__}")
    tools = _tools(row["tools"], where) if _present(row, "tools") else None
    if system or tools:
        record = _as_conversation(record, system)
    if tools:
        record["tools"] = tools
    return record


def _normalize_fields(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The canonical form of the prompt / completion / label fields of one row."""

    if _present(row, "completions"):
        return _ranked(row, where)

    if _present(row, "conversations"):
        prompt = _messages(row["conversations"], where, "conversations", sharegpt=True)
        for key in ("chosen", "rejected"):
            if not _present(row, key):
                raise DataFormatError(f"{where}: missing field '{key}' (sharegpt format)")
        chosen = _messages(row["chosen"], where, "chosen", sharegpt=True)
        rejected = _messages(row["rejected"], where, "rejected", sharegpt=True)
        return _paired(prompt, chosen, rejected, where)

    if _present(row, "chosen") or _present(row, "rejected"):
        chosen = _text_or_messages(row, "chosen", where)
        rejected = _text_or_messages(row, "rejected", where)
        if _present(row, "prompt"):
            return _paired(_text_or_messages(row, "prompt", where), chosen, rejected, where)
        if _present(row, "messages"):
            return _paired(_messages(row["messages"], where, "messages"), chosen, rejected, where)
        _same_kind({"chosen": chosen, "rejected": rejected}, where)
        if isinstance(chosen, str):
            n = _common_text_prefix(chosen, rejected)
        else:
            n = _common_prefix(chosen, rejected)
        return _paired(chosen[:n], chosen[n:], rejected[n:], where)

    if _present(row, "label") or _present(row, "completion"):
        if not _present(row, "label"):
            raise DataFormatError(f"{where}: missing field 'label' (unpaired format)")
        label = row["label"]
        if not isinstance(label, bool):
            raise DataFormatError(f"{where}: field 'label' must be true or false, "
                                  f"got {type(label).__name__} {label!r}")
        if _present(row, "messages"):
            messages = _messages(row["messages"], where, "messages")
            if not messages or messages[-1]["role"] != "assistant":
                raise DataFormatError(f"{where}: field 'messages' must end with an assistant "
                                      "message (the completion)")
            return {"prompt": messages[:-1], "completion": messages[-1:], "label": label}
        prompt = _text_or_messages(row, "prompt", where)
        completion = _text_or_messages(row, "completion", where)
        _same_kind({"prompt": prompt, "completion": completion}, where)
        if not isinstance(completion, str):
            _check_completion(completion, where, "completion")
        return {"prompt": prompt, "completion": completion, "label": label}

    fields = ", ".join(sorted(map(str, row))) or "none"
    raise DataFormatError(f"{where}: unrecognised record (fields: {fields}); expected one of: "
                          f"{'; '.join(FORMATS)}")


def _score(value: Any, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise DataFormatError(f"{where}: field '{field}' must be a finite number, got "
                              f"{type(value).__name__} {value!r}")
    return float(value)


def _ranked_completion(value: Any, where: str, field: str) -> str | Messages:
    """One ranked completion: a string, a message list, or one assistant message object."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "role" in value:
        value = [value]
    messages = _messages(value, where, field)
    _check_completion(messages, where, field)
    return messages


def _ranked(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``prompt`` (or ``messages``: the conversation before the completions) with a list of
    ``completions`` and their ``scores`` or ``ranks`` (beside them, or inside each completion
    object): the canonical ranked record, scores higher-better (a rank r gives −r)."""
    completions = row["completions"]
    if isinstance(completions, (str, bytes, Mapping)) or not isinstance(completions, Sequence):
        raise DataFormatError(f"{where}: field 'completions' must be a list, got "
                              f"{type(completions).__name__}")
    if len(completions) < 2:
        raise DataFormatError(f"{where}: field 'completions' needs at least 2 completions, got "
                              f"{len(completions)}")
    if _present(row, "prompt"):
        prompt = _text_or_messages(row, "prompt", where)
    elif _present(row, "messages"):
        prompt = _messages(row["messages"], where, "messages")
    else:
        raise DataFormatError(f"{where}: missing field 'prompt' (or 'messages') of a ranked row")
    given = [key for key in ("scores", "ranks") if _present(row, key)]
    if len(given) > 1:
        raise DataFormatError(f"{where}: give 'scores' or 'ranks', not both")
    texts: list[str | Messages] = []
    scores: list[float] = []
    for k, item in enumerate(completions):
        name = f"completions[{k}]"
        if isinstance(item, Mapping) and "role" not in item:
            text_key = next((key for key in TEXT_KEYS if _present(item, key)), None)
            if text_key is None:
                raise DataFormatError(f"{where}: field '{name}' has none of "
                                      f"{', '.join(TEXT_KEYS)}")
            texts.append(_ranked_completion(item[text_key], where, f"{name}.{text_key}"))
            keys = [key for key in RANK_KEYS if _present(item, key)]
            if given or len(keys) != 1:
                raise DataFormatError(f"{where}: field '{name}' needs exactly one of 'score' or "
                                      "'rank' (and then no 'scores'/'ranks' list beside it)")
            value = _score(item[keys[0]], where, f"{name}.{keys[0]}")
            scores.append(-value if keys[0] == "rank" else value)
        else:
            texts.append(_ranked_completion(item, where, name))
    if len(scores) != len(texts):
        if scores or not given:
            raise DataFormatError(f"{where}: every completion needs a score or a rank: give a "
                                  "'scores' or 'ranks' list, or 'score'/'rank' in each completion")
        values = row[given[0]]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) \
                or len(values) != len(texts):
            raise DataFormatError(f"{where}: field '{given[0]}' must be a list of "
                                  f"{len(texts)} numbers (one per completion)")
        sign = -1.0 if given[0] == "ranks" else 1.0
        scores = [sign * _score(v, where, f"{given[0]}[{k}]") for k, v in enumerate(values)]
    _same_kind({"prompt": prompt, **{f"completions[{k}]": t for k, t in enumerate(texts)}},
               where)
    return {"prompt": prompt, "completions": texts, "scores": scores}


def record_kind(record: Mapping[str, Any]) -> str:
    """``paired``, ``unpaired`` or ``ranked``: the kind of a canonical record."""
    return "ranked" if "completions" in record else "paired" if "chosen" in record \
        else "unpaired"


def is_paired(record: Mapping[str, Any]) -> bool:
    """Whether a canonical record is a preference pair (else an unpaired KTO example or a
    ranked item)."""
    return "chosen" in record


def pairs_to_unpaired(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """KTO form of paired data: each pair gives a desirable and an undesirable example."""
    out: list[dict[str, Any]] = []
    for record in records:
        if record_kind(record) == "ranked":
            raise DataFormatError("ranked records (completions with scores) cannot become KTO "
                                  "examples: KTO needs desirable/undesirable labels")
        if not is_paired(record):
            out.append(dict(record))
            continue
        extra = {"tools": record["tools"]} if "tools" in record else {}
        out.append({"prompt": record["prompt"], "completion": record["chosen"], "label": True,
                    **extra})
        out.append({"prompt": record["prompt"], "completion": record["rejected"],
                    "label": False, **extra})
    return out


def is_empty_completion(completion: str | Messages) -> bool:
    """A completion with no text (whitespace only, or assistant turns without content)."""
    if isinstance(completion, str):
        return not completion.strip()
    return not any(message["content"].strip() for message in completion)
