"""Reading preference data files: JSON (an array), JSON Lines, Parquet, CSV, Arrow,
``save_to_disk`` folders, ``datasets`` objects or lists of dicts, into canonical records that
remember their row (a ``columns`` mapping renames the user's columns first: ``columns.py``).

    records = load_preference_records("pairs.jsonl")
    records.origins[3]     # "pairs.jsonl line 4": where the fourth record came from

Errors are :class:`DataFormatError` naming the file and the line, row or byte offset: malformed
JSON, text that is not UTF-8, a JSON object where a list of records was expected, an unreadable
Parquet file; a row's own problems name its field (:mod:`fastpo.engine.data.formats`). With a
:class:`~.bad_rows.BadRowPolicy` of ``skip``, a malformed JSON Lines line and an invalid row are
dropped and counted instead (:mod:`fastpo.engine.data.bad_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import decode_utf8
from .bad_rows import BadRowPolicy, BadRowTally
from .columns import map_columns, mapping_note
from .formats import DataFormatError, normalize_record, record_kind

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


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


class UnreadableRow:
    """A JSON Lines line that is not JSON (its error), yielded in the row's place."""

    def __init__(self, error: DataFormatError) -> None:
        self.error = error


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
    rows: list[tuple[str, Any]] = []
    whole_checked = False
    for lineno, line in enumerate(text.splitlines(), start=1):  # JSON Lines
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            if not whole_checked:  # one JSON object over several lines is not a bad row
                whole_checked = True
                not_a_list = _not_a_list(path, text)
                if not_a_list is not None:
                    raise not_a_list from None
            rows.append((f"{path} line {lineno}", UnreadableRow(DataFormatError(
                f"{path} line {lineno} column {exc.colno}: malformed JSON ({exc.msg})"))))
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


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"preference data {path}: not a readable CSV file ({exc})") from None
    for i, row in enumerate(table.to_pylist()):  # row i is line i + 2 (after the header)
        yield f"{path} row {i}", row


def _arrow_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """An Arrow file as ``datasets`` writes it (a stream), or the Arrow IPC file format."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        rows: Any = Dataset.from_file(str(path))
    except (pa.ArrowException, OSError, ValueError):
        try:
            with pa.OSFile(str(path), "rb") as handle:
                rows = pa.ipc.open_file(handle).read_all().to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"preference data {path}: not a readable Arrow file "
                                  f"({exc})") from None
    for i, row in enumerate(rows):
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
        elif path.suffix == ".csv":
            yield from _csv_rows(path)
        elif path.suffix == ".arrow":
            yield from _arrow_rows(path)
        else:
            raise DataFormatError(f"preference data {path}: unsupported file type {path.suffix!r}; "
                                  f"use {', '.join(FILE_TYPES)} or a save_to_disk folder")
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
                            split: str | None = None, columns: Mapping[str, str] | None = None,
                            columns_setting: str = "columns",
                            bad_rows: BadRowPolicy | None = None) -> PreferenceRecords:
    """Load and validate preference data; return canonical paired or unpaired records (a list
    that also knows the file and row each came from).

    ``source``: a ``.json`` (array or JSON Lines), ``.jsonl``, ``.parquet``, ``.csv`` or
    ``.arrow`` file, a folder saved with ``datasets``' ``save_to_disk``, a
    ``datasets.Dataset``/``DatasetDict`` (``split`` picks one, default ``train``) or a list of
    dicts. ``columns`` maps fields to the user's column names (``{"prompt": "question"}``;
    ``columns_setting`` is the config key errors name). Malformed JSON raises with file and line;
    missing or wrongly typed fields, missing mapped columns and unknown roles raise with the row
    and the field; under ``bad_rows`` ``skip`` such rows are dropped and counted
    (:mod:`.bad_rows`).
    """
    records = PreferenceRecords(source=str(source) if isinstance(source, (str, Path)) else None)
    tally = BadRowTally(bad_rows or BadRowPolicy(), records.source or "records")
    first_kind: tuple[str, str] | None = None
    total = 0
    for where, row in _source_rows(source, split):
        total += 1
        try:
            if isinstance(row, UnreadableRow):
                raise row.error
            mapped = map_columns(row, columns or {}, where=where, setting=columns_setting)
            try:
                record = normalize_record(mapped, where)
            except DataFormatError as exc:
                if not columns:
                    raise
                raise DataFormatError(f"{exc}{mapping_note(str(exc), columns, columns_setting)}"
                                      ) from None
            if first_kind is not None and record_kind(record) != first_kind[1]:
                raise DataFormatError(f"{where}: {record_kind(record)} record in data whose "
                                      f"first record ({first_kind[0]}) is {first_kind[1]}")
        except DataFormatError as exc:
            tally.bad(where, exc)
            continue
        if first_kind is None:
            first_kind = (where, record_kind(record))
        records.origins.append(where)
        records.append(record)
    tally.finish(total)
    if not records:
        name = f" {source}" if isinstance(source, (str, Path)) else ""
        raise DataFormatError(f"preference data{name} holds no records")
    return records
