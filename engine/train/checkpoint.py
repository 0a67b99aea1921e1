"""Atomic training checkpoints: a checkpoint is either complete or never taken.

Layout under the checkpoint root::

    step-00000040/          one checkpoint (model, optimizer, scheduler, trainer state, RNG)
        manifest.json       written last inside the folder: every file, size and sha256
    step-00000050/
    latest                  "step-00000050", replaced atomically after the folder is in place
    .tmp-step-00000060/     a checkpoint being written (never read)

Writing (:meth:`CheckpointManager.begin` / :meth:`commit`): every rank writes its files into a
temporary folder; after a barrier rank 0 fsyncs them, writes the manifest (every file with its
size and sha256), renames the folder into place with ``os.replace`` (atomic on one filesystem),
fsyncs the root and only then points ``latest`` at it (temporary file + ``os.replace``), and
prunes to the last ``keep_last``. Files written through :func:`write_hashed` (DeepSpeed's files,
the optimizer and RNG states) are hashed while they are written and leave a hidden
``.<name>.sha256`` note that :meth:`commit` consumes; any other file is read back once there.
Reading (:meth:`latest_valid`): ``latest`` is followed only when its target's files match the
manifest, size and sha256 (a truncated, half-copied or overwritten checkpoint fails this); otherwise
the newest valid checkpoint wins, with a warning naming the bad file. Multi-node runs need the
root on a filesystem shared by all ranks (rank 0 renames what every rank wrote).

The hashes catch corruption, not forgery (whoever edits a file can edit the manifest): a file
from elsewhere is made harmless by loading it safely (JSON, safetensors, ``torch.load`` with
``weights_only=True``: :mod:`.safe_load`), never by trusting its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .integrity import CheckpointError, hashed_files, sha256_file, write_hashed  # noqa: F401
from .rng_state import (  # noqa: F401  (the trainer's imports)
    load_rng,
    rng_state,
    save_rng,
    seed_everything,
    set_rng_state,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "fastpo-checkpoint-v1"
STATE_FILE = "trainer_state.json"  # the loop position and counters, written by the trainer
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, f"{MANIFEST} is not a {FORMAT} manifest"
    files, hashes = manifest.get("files"), manifest.get("sha256")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in files.items()):
        return None, f"{MANIFEST} has no valid 'files' table (path: size)"
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
            return None, f"{MANIFEST} lists {rel!r}, which is not a file inside the checkpoint"
    if hashes is not None and (not isinstance(hashes, dict) or set(hashes) != set(files)):
        return None, f"{MANIFEST}: its 'sha256' table does not list the same files as 'files'"
    return manifest, None


def validate_checkpoint(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint whose every file has the size and sha256
    its manifest recorded (and no file is missing or added), else the reason it is not."""
    if not folder.is_dir():
        return "not a folder"
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST} (never completed)"
    manifest, reason = _read_manifest(folder)
    if manifest is None:
        return reason
    files, hashes = manifest["files"], manifest.get("sha256")
    added = sorted({str(p.relative_to(folder)) for p in _files(folder)} - {MANIFEST} - set(files))
    if added:
        return f"file {added[0]} is not listed in {MANIFEST} (added after it was written)"
    for rel, size in files.items():  # sizes first: cheap
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != size:
            return f"file {rel} has {path.stat().st_size} bytes, the manifest says {size}"
    if hashes is None:
        logger.warning("checkpoint %s has no content hashes (written by an older fastpo): only "
                       "its file sizes are checked", folder)
        return None
    for rel in files:
        if sha256_file(folder / rel) != hashes[rel]:
            return (f"file {rel} does not match its sha256 in {MANIFEST} (corrupted or modified "
                    "after it was written)")
    return None


class CheckpointManager:
    """Checkpoints of one run under ``root`` (see the module docstring).

    ``barrier`` synchronizes the ranks (a no-op in a single process); every rank calls
    :meth:`begin` and :meth:`commit` in the same order.
    """

    def __init__(self, root: str | Path, *, keep_last: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    # ---------------------------------------------------------------------------- reading
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Every completed-looking ``step-*`` folder, oldest first (not validated)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest_valid(self) -> Path | None:
        """The checkpoint to resume from: ``latest`` if valid, else the newest valid one (each
        one skipped is warned about, with its reason); None when there is none."""
        return self._scan()[0]

    def _scan(self) -> tuple[Path | None, list[str]]:
        """(checkpoint to resume from or None, "name: reason" of each one rejected)."""
        rejected: list[str] = []
        target = None
        pointer = self.root / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                name = f"<unreadable: {exc}>"
            target = self.root / name if _NAME.match(name) else None
            reason = ("not a checkpoint name" if target is None
                      else validate_checkpoint(target))
            if reason is None:
                return target, rejected
            logger.warning("checkpoint %s named by %s is not usable (%s); looking for an older "
                           "one", target or repr(name[:80]), pointer, reason)
            if target is not None:
                rejected.append(f"{target.name}: {reason}")
        for _, path in reversed(self.checkpoints()):
            if path == target:
                continue  # named by ``latest``, already rejected
            reason = validate_checkpoint(path)
            if reason is None:
                return path, rejected
            logger.warning("skipping checkpoint %s: %s", path, reason)
            rejected.append(f"{path.name}: {reason}")
        return None, rejected

    # ---------------------------------------------------------------------------- writing
    def begin(self, step: int) -> Path:
        """Create (rank 0) the temporary folder of the checkpoint of ``step``; all ranks wait."""
        tmp = self.root / f".tmp-{checkpoint_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed while writing
            tmp.mkdir()
        self.barrier()
        return tmp

    def commit(self, tmp: Path, step: int, *, meta: dict[str, Any] | None = None) -> Path:
        """Seal the checkpoint written into ``tmp`` and make it the latest (see module doc)."""
        final = self.root / checkpoint_name(step)
        self.barrier()  # every rank has written its files
        if self.rank == 0:
            files, hashes = {}, {}
            for path, digest in hashed_files(tmp):
                _fsync_path(path)
                rel = str(path.relative_to(tmp))
                files[rel], hashes[rel] = path.stat().st_size, digest
            manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": files,
                        "sha256": hashes, **(meta or {})}
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            for folder in {p.parent for p in _files(tmp)}:
                _fsync_path(folder)
            if final.exists():  # the same step saved again (e.g. after a resume)
                trash = self.root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_path(self.root)
            write_text_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
        self.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        existing = [p for _, p in self.checkpoints()]
        stale = [p for p in existing if p != keep][: max(0, len(existing) - self.keep_last)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".old-*"):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------- resume
def resume_point(manager: CheckpointManager, resume: bool | str | Path, *,
                 world_size: int) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its trainer state (None: start fresh).

    ``resume`` True takes the newest valid checkpoint under the manager's root (none yet: start
    fresh; some, none valid: :class:`CheckpointError` with each one's reason); a path must be a
    valid checkpoint. Either must have been written by ``world_size`` ranks, since the data
    order depends on it, and hold a readable ``trainer_state.json``.
    """
    if resume is False:
        return None
    if resume is True:
        folder, rejected = manager._scan()
        if folder is None and rejected:
            raise CheckpointError(f"checkpoint.resume: no usable checkpoint under {manager.root}: "
                                  + "; ".join(rejected))
        if folder is None:
            logger.info("checkpoint.resume: no checkpoint under %s yet; starting fresh",
                        manager.root)
            return None
    else:
        folder = Path(resume)
        reason = validate_checkpoint(folder)
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume {folder}: not a usable checkpoint "
                                  f"({reason})")
    state = read_trainer_state(folder)
    if state["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {folder} was written by {state['world_size']} ranks; "
                              f"this run has {world_size} (the data order would change)")
    return folder, state


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, its position fields checked (the error names the
    file)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the trainer state is not a JSON object")
    for key in ("step", "epoch", "step_in_epoch", "world_size"):
        value, least = state.get(key), 1 if key == "world_size" else 0
        if type(value) is not int or value < least:
            raise CheckpointError(f"{path}: trainer state field {key!r} is {value!r}, expected "
                                  f"an integer >= {least}")
    return state
