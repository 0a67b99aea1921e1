"""Reading preference data files: JSON (an array), JSON Lines, Parquet, ``save_to_disk``
folders, ``datasets`` objects or lists of dicts, into canonical records that remember their row.

    records = load_preference_records("pairs.jsonl")
    records.origins[3]     # "pairs.jsonl line 4": where the fourth record came from

Errors are :class:`DataFormatError` naming the file and the line, row or byte offset: malformed
JSON, text that is not UTF-8, a JSON object where a list of records was expected, an unreadable
Parquet file; a row's own problems name its field (:mod:`fastpo.engine.data.formats`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import decode_utf8
from .formats import DataFormatError, normalize_record, record_kind


# ----------------------------------------------------------------------------------- loading
class PreferenceRecords(list):
    """The canonical records (a list), with where each came from (``origins[i]``, e.g.
    ``"pairs.jsonl line 7"``) and the source's name, for messages that name the row."""

    def __init__(self, records: Sequence[dict[str, Any]] = (), origins: Sequence[str] = (),
                 source: str | None = None) -> None:
        super().__init__(records)
        self.origins = list(origins)
        self.source = source


def _not_a_list(path: Path, text: str) -> DataFormatError | None:
    """The error for a JSON file holding one object (or a scalar) instead of a list of records,
    or None when the whole text is not one JSON value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))[:8]) or "none"
        got = f"one JSON object (keys: {keys})"
    else:
        got = f"a JSON {type(value).__name__}"
    return DataFormatError(f"{path}: expected a list of records (a JSON array of objects, or "
                           f"JSON Lines: one object per line), got {got}")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = decode_utf8(path.read_bytes(), f"preference data {path}", DataFormatError)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path} line {exc.lineno} column {exc.colno}: "
                                  f"malformed JSON ({exc.msg})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):  # JSON Lines
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise (_not_a_list(path, text) or DataFormatError(
                f"{path} line {lineno} column {exc.colno}: malformed JSON ({exc.msg})")) from None
    if len(rows) == 1 and not isinstance(rows[0][1], dict):
        raise _not_a_list(path, text) or DataFormatError(f"{path}: expected a list of records")
    yield from rows


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"preference data {path}: not a readable Parquet file "
                              f"({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _dataset_rows(dataset: Any, name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in dataset else None
        if split not in dataset:
            raise ValueError(f"{name} holds splits {sorted(dataset)}; choose one with split=")
        dataset, name = dataset[split], f"{name}[{split}]"
    for i, row in enumerate(dataset):
        yield f"{name} row {i}", row


def _source_rows(source: Any, split: str | None) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if not any((path / f).is_file() for f in
                       ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise DataFormatError(f"{path} is a folder but not a dataset saved with "
                                      "datasets' save_to_disk (dataset_info.json, state.json "
                                      "or dataset_dict.json)")
            import datasets

            yield from _dataset_rows(datasets.load_from_disk(str(path)), str(path), split)
        elif not path.is_file():
            raise FileNotFoundError(f"preference data {path}: no such file or folder")
        elif path.suffix in (".json", ".jsonl"):
            yield from _json_rows(path)
        elif path.suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            raise DataFormatError(f"preference data {path}: unsupported file type {path.suffix!r}; "
                             "use .json, .jsonl, .parquet or a save_to_disk folder")
        return
    try:
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            yield from _dataset_rows(source, "dataset", split)
            return
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        for i, row in enumerate(source):
            yield f"records[{i}]", row
        return
    raise TypeError("preference data must be a path, a list of dicts or a datasets.Dataset, "
                    f"got {type(source).__name__}")


def load_preference_records(source: str | Path | Sequence[Mapping[str, Any]] | Any, *,
                            split: str | None = None) -> PreferenceRecords:
    """Load and validate preference data; return canonical paired or unpaired records (a list
    that also knows the file and row each came from).

    ``source``: a ``.json`` (array or JSON Lines), ``.jsonl`` or ``.parquet`` file, a folder saved
    with ``datasets``' ``save_to_disk``, a ``datasets.Dataset``/``DatasetDict`` (``split``
    picks one, default ``train``) or a list of dicts. Malformed JSON raises with file and line;
    missing or wrongly typed fields and unknown roles raise with the row and the field.
    """
    records = PreferenceRecords(source=str(source) if isinstance(source, (str, Path)) else None)
    first_kind: tuple[str, str] | None = None
    for where, row in _source_rows(source, split):
        record = normalize_record(row, where)
        records.origins.append(where)
        if first_kind is None:
            first_kind = (where, record_kind(record))
        elif record_kind(record) != first_kind[1]:
            raise DataFormatError(f"{where}: {record_kind(record)} record in data whose first "
                                  f"record ({first_kind[0]}) is {first_kind[1]}")
        records.append(record)
    if not records:
        name = f" {source}" if isinstance(source, (str, Path)) else ""
        raise DataFormatError(f"preference data{name} holds no records")
    return records
