"""The user-error type: a file, path, row or value the user gave that cannot be used.

``fastpo-train`` answers an :class:`InputError` (and its subclasses ``ConfigError`` and
``DataFormatError``) with its one-line message and exit status 2, without a traceback
(``FASTPO_TRACEBACK=1`` shows it). The message names what is wrong (file, line, row, field, key)
and what was expected. A :class:`JobFault` is the environment failing a sound job (a full or
read-only disk, an output folder held by another job, a lost rank): one line naming the folder,
the holder or the rank, exit status 3; the job's complete checkpoints are kept and ``--resume``
continues it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a path, a file's content, a config value); the message names it."""


class JobFault(RuntimeError):
    """The environment failed the job (storage, output lock, lost rank); the message names what
    and what to do. Complete checkpoints are kept: ``--resume`` continues."""


def decode_utf8(raw: bytes, what: str, error: type[Exception] = InputError) -> str:
    """``raw`` as UTF-8 text, or ``error`` naming ``what``, the byte offset and the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{what} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
                    f"{exc.start} (line {line}); save it as UTF-8") from None
