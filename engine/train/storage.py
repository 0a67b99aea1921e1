"""Storage faults: room checked before a write, a failed write turned into one clear line.

- :func:`check_room`: before training, before each checkpoint, the export and the reference cache,
  the free space of the target folder (``statvfs``) is compared with what the write needs (the
  last checkpoint's size, or :func:`estimate_checkpoint_bytes` before the first); too little stops
  the job with a :class:`StorageError` naming the folder, the bytes needed and free, and what to
  change. :func:`checkpoint_room` also warns at start when ``keep_last`` + 1 checkpoints (the kept
  ones plus the one being written) do not fit.
- :func:`storage_failure`: an exception of a write (``ENOSPC``, ``EIO``, ``EDQUOT``, a read-only
  or vanished folder; also the ``RuntimeError`` that ``torch.save``'s zip writer raises after a
  short write) as a :class:`StorageError` naming the folder and the error, or None for any other
  exception. The caller removes its partial ``.tmp-*`` folder; complete checkpoints are never
  touched, so ``--resume`` continues exactly.
- :func:`atomic_folder`: a folder written as ``.tmp-<name>-<pid>`` and renamed into place (the
  export), removed when the write fails.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..errors import JobFault

logger = logging.getLogger(__name__)

_STORAGE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.ENOENT,
                   errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ESTALE}
# what torch.save's zip writer raises once the file under it failed (its OSError is lost)
_TORCH_WRITER = ("PytorchStreamWriter failed", "inline_container.cc", "unexpected pos",
                 "file write failed")
_MARGIN = 1 << 20  # RNG states, trainer state, manifest: well under a MiB


class StorageError(JobFault):
    """A write that does not fit or failed; the message names the folder and what to do."""


def human(n: int | float) -> str:
    """Bytes in the binary unit that keeps 3 significant digits (``1.50 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _statvfs(folder: str | Path) -> os.statvfs_result:
    """The filesystem of ``folder``, or of its nearest existing parent when it does not exist
    yet."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.statvfs(path)


def free_bytes(folder: str | Path) -> int:
    """Free bytes (for this user) on the filesystem of ``folder`` (see :func:`_statvfs`)."""
    st = _statvfs(folder)
    return st.f_bavail * st.f_frsize


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder`` (0 when it is missing)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def check_room(folder: str | Path, needed: int, *, what: str, hint: str) -> None:
    """:class:`StorageError` when ``folder``'s filesystem has less than ``needed`` bytes free."""
    free = free_bytes(folder)
    if free < needed:
        raise StorageError(f"{what}: {folder} has {human(free)} free, the write needs about "
                           f"{human(needed)}; {hint}")


def estimate_checkpoint_bytes(module: nn.Module, *, include_frozen: bool,
                              fp32_master: bool) -> int:
    """What a checkpoint of ``module`` writes, before the first one gives the real size: the
    saved weights (trainable ones, all with ``include_frozen``), AdamW's two fp32 moments per
    trainable value and an fp32 master copy under mixed precision."""
    weights = optimizer = 0
    for p in module.parameters():
        if p.requires_grad:
            weights += p.numel() * p.element_size()
            optimizer += p.numel() * 4 * (3 if fp32_master else 2)
        elif include_frozen:
            weights += p.numel() * p.element_size()
    return weights + optimizer + _MARGIN


def checkpoint_room(root: Path, size: int, *, step: int, existing: int, keep_last: int,
                    first_check: bool) -> None:
    """Before the checkpoint of ``step`` (``size`` bytes) under ``root`` (``existing`` complete
    ones there): a :class:`StorageError` when it cannot fit; at the first check, a warning when
    the ``keep_last`` + 1 checkpoints the run holds at once (while one is written) will not."""
    lower = ", lower checkpoint.keep_last" if keep_last > 1 else ""
    hint = (f"free space there{lower} or point checkpoint.dir at a larger disk; the complete "
            "checkpoints are kept: then run again with --resume")
    check_room(root, size, what=f"the checkpoint of step {step} (checkpoint.dir)", hint=hint)
    if first_check:
        more = max(0, keep_last + 1 - existing) * size
        free = free_bytes(root)
        if free < more:
            logger.warning("checkpoint.dir %s has %s free, but checkpoint.keep_last %d + 1 "
                           "checkpoints of about %s each need %s more: a later checkpoint "
                           "will not fit; free space or lower checkpoint.keep_last", root,
                           human(free), keep_last, human(size), human(more))


def _errno_of(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc`` (``exc`` itself, its cause or its context), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def storage_failure(exc: BaseException, *, folder: Path, what: str) -> StorageError | None:
    """``exc`` of a write into ``folder`` as a one-line :class:`StorageError`, or None when it
    is not a storage failure."""
    if isinstance(exc, StorageError):
        return exc
    os_error = _errno_of(exc)
    if os_error is not None and os_error.errno in _STORAGE_ERRNOS:
        reason = f"[Errno {os_error.errno}] {os.strerror(os_error.errno)}"
        if os_error.filename is not None:
            reason += f": {os_error.filename}"
    elif isinstance(exc, RuntimeError) and any(t in str(exc) for t in _TORCH_WRITER):
        reason = "a file write failed"
        with contextlib.suppress(OSError):
            if free_bytes(folder) < _MARGIN:
                reason += f" ({os.strerror(errno.ENOSPC)})"
    elif isinstance(exc, OSError):  # safetensors and others: an OSError without an errno
        reason = str(exc) or type(exc).__name__
    else:
        return None
    with contextlib.suppress(OSError):
        reason += f"; {human(free_bytes(folder))} free there"
        if os_error is not None and os_error.errno == errno.ENOSPC \
                and _statvfs(folder).f_favail == 0:
            reason += ", but no free inode (too many files)"
    return StorageError(f"{what} could not be written to {folder}: {reason}")


def remove_partial(path: Path) -> None:
    """Remove a partial ``.tmp-*`` folder or file of a failed write (never raises)."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(final: Path, *, what: str) -> Iterator[Path]:
    """Yield a temporary sibling ``.tmp-<name>-<pid>`` to write into; on success it replaces
    ``final`` (an older ``final`` is removed), on failure it is removed and a storage failure is
    raised as a :class:`StorageError`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    remove_partial(tmp)
    try:
        tmp.mkdir()
        yield tmp
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            remove_partial(old)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        error = storage_failure(exc, folder=final.parent, what=what)
        remove_partial(tmp)
        if error is None:
            raise
        raise error from None
