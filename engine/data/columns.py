"""Column mapping: a user's column names onto the record fields fastpo reads.

    row = map_columns({"question": "2+2?", "good": "4", "bad": "5"},
                      {"prompt": "question", "chosen": "good", "rejected": "bad"},
                      where="pairs.csv row 3", setting="data.columns")
    # {"prompt": "2+2?", "chosen": "4", "rejected": "5"}

The mapping goes field → the user's column (``{prompt: question}``), as in TRL's
``prompt_key``/``chosen_key`` and LLaMA-Factory's ``columns``. A mapped column replaces any
column that already has the field's name; the row's other columns are kept. A mapped column that
is missing raises a :class:`DataFormatError` naming the row, the column and the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .formats import DataFormatError

# the fields a mapping may name (formats.py reads them; images: later)
COLUMN_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "messages",
                 "conversations", "system", "tools")


def check_column_mapping(columns: Mapping[str, str], setting: str) -> None:
    """Raise a DataFormatError naming ``setting`` for an unknown field or a non-string column."""
    for field, column in columns.items():
        if field not in COLUMN_FIELDS:
            raise DataFormatError(f"{setting}: unknown field {field!r}; the fields are "
                                  f"{', '.join(COLUMN_FIELDS)} (mapped to your column names, "
                                  "e.g. prompt: question)")
        if not isinstance(column, str) or not column:
            raise DataFormatError(f"{setting}.{field}: the column name must be a non-empty "
                                  f"string, got {column!r}")
    seen: dict[str, str] = {}
    for field, column in columns.items():
        if column in seen:
            raise DataFormatError(f"{setting}: column {column!r} is mapped to both "
                                  f"{seen[column]!r} and {field!r}")
        seen[column] = field


def map_columns(row: Any, columns: Mapping[str, str], *, where: str, setting: str) -> Any:
    """``row`` with its mapped columns renamed to fastpo's fields (a non-mapping row or an
    empty mapping is returned as is, for the format check to name)."""
    if not columns or not isinstance(row, Mapping):
        return row
    missing = [(field, column) for field, column in columns.items() if column not in row]
    if missing:
        field, column = missing[0]
        have = ", ".join(sorted(map(str, row))[:12]) or "none"
        raise DataFormatError(f"{where}: column {column!r} (mapped to {field!r} by "
                              f"{setting}) is missing; the row's columns: {have}")
    renamed = set(columns.values())
    out = {key: value for key, value in row.items()
           if key not in renamed and key not in columns}
    out.update({field: row[column] for field, column in columns.items()})
    return out


def mapping_note(message: str, columns: Mapping[str, str], setting: str) -> str:
    """`` (field 'chosen' is your column 'good', data.columns)`` for the mapped fields a row
    error names (empty when it names none), so the user finds the column in their file."""
    named = [f"field '{field}' is your column '{column}'" for field, column in columns.items()
             if f"field '{field}" in message]
    return f" ({', '.join(named)}: {setting})" if named else ""
