"""Content hashes of state files, computed while they are written.

:func:`write_hashed` opens a file whose sha256 is computed on the way out (``torch.save`` and
DeepSpeed's checkpoint engine write into it) and leaves a hidden ``.<name>.sha256`` note next
to it; :func:`hashed_files` gives every file of a folder with its sha256, taken from those notes
(consumed) when the size still matches, else read back once. :func:`sha256_file` verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError

_NOTE = re.compile(r"^\.(.+)\.sha256$")
_CHUNK = 1 << 22


class CheckpointError(InputError):
    """A checkpoint (or one of its files) that cannot be resumed; the message names the file."""


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter:
    """A binary file that hashes what goes through it (``torch.save`` writes to it directly)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


@contextlib.contextmanager
def write_hashed(path: str | Path) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing; its sha256 is computed on the way and noted next to it
    (``.<name>.sha256``) for :func:`hashed_files`, which then need not read it back."""
    path = Path(path)
    with open(path, "wb") as raw:
        writer = _HashingWriter(raw)
        yield writer  # type: ignore[misc]
        raw.flush()
    note = {"sha256": writer.digest.hexdigest(), "size": writer.size}
    path.with_name(f".{path.name}.sha256").write_text(json.dumps(note), encoding="utf-8")


def hashed_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, sha256) of every file under ``folder``: from the notes :func:`write_hashed` left
    (removed) when the size still matches, else read back once."""
    notes, out = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        match = _NOTE.match(path.name)
        if match:
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
                notes[path.with_name(match.group(1))] = json.loads(path.read_text("utf-8"))
            path.unlink()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        note = notes.get(path)
        if isinstance(note, dict) and note.get("size") == path.stat().st_size \
                and isinstance(note.get("sha256"), str):
            out.append((path, note["sha256"]))
        else:
            out.append((path, sha256_file(path)))
    return out
