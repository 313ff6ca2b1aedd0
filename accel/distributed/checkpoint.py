"""Checkpoint files that a crash cannot corrupt: atomic writes, a checksum, the last few kept.

A checkpoint is one file ``<directory>/checkpoint-e<epoch>-s<step>.pt``: a header line with the
SHA-256 of the payload, then the payload as :func:`torch.save` writes it. :func:`save` writes to a
temporary file in the same directory, flushes it to disk and renames it into place, so a process
killed mid-write leaves at worst a stray ``.tmp`` file, never a damaged checkpoint under a real
name. :func:`load_latest` walks the checkpoints newest first and skips any whose checksum or
contents do not verify (a truncated copy, a disk error), saying which and why; :func:`recover` does the
same for a run about to resume, and also tidies the directory: stray ``.tmp`` files go, and a checkpoint
that does not verify is moved aside as ``<name>.corrupt``.

A valid checkpoint is never deleted in favour of one that does not verify: :func:`save` keeps the newest
``keep`` checkpoints *that verify* among those up to the one it wrote (a file this process wrote or checked
is not read again), moves the ones that fail aside, and leaves checkpoints newer than its own alone.

Payloads are loaded with ``weights_only=True``: plain containers, numbers, strings and tensors.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["CheckpointError", "save", "load", "load_latest", "recover", "list_checkpoints", "remove_all"]

_MAGIC = b"accel-checkpoint v1 sha256="
_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")
_CORRUPT_SUFFIX = ".corrupt"
# files this process wrote or verified, with the (size, mtime) they had then: not read again while unchanged
_verified: dict[str, tuple[int, int]] = {}


class CheckpointError(ValueError):
    """A checkpoint file that does not verify (the message names the file and the fault)."""


def _name(epoch: int, step: int) -> str:
    return f"checkpoint-e{epoch:05d}-s{step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint files in ``directory``, oldest first (by epoch, then step); ``[]`` if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), int(m.group(2)), path) for path in directory.iterdir()
             if (m := _NAME.match(path.name))]
    return [path for _, _, path in sorted(found)]


_log = logging.getLogger(__name__)


def _default_say(line: str) -> None:
    _log.warning(line)


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    return int(match.group(1)), int(match.group(2))


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _signature(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def save(directory: str | Path, state: dict[str, Any], *, epoch: int, step: int, keep: int = 3,
         say: Callable[[str], None] | None = None) -> Path:
    """Write ``state`` atomically as the checkpoint for (``epoch``, ``step``); keep the newest ``keep`` valid ones.

    Args:
        directory: where checkpoints live (created if missing).
        state: what :func:`torch.save` can write with ``weights_only`` loading (containers, numbers, tensors).
        epoch, step: the position the state resumes at; they order the checkpoints.
        keep: how many checkpoints to keep: this one and the newest ``keep - 1`` older ones that verify.
            Older ones beyond those are deleted; one that does not verify is moved aside as
            ``<name>.corrupt`` (never counted as kept); checkpoints newer than this one are left alone.
        say: where messages go (a checkpoint moved aside); default: a WARNING on the ``accel.distributed.checkpoint`` logger.

    Returns:
        The checkpoint's path.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    final = directory / _name(epoch, step)
    descriptor, temporary = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide it from the group
            handle.write(header)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)  # atomic on POSIX: readers see the old name set or the new one
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    _verified[_key(final)] = _signature(final)
    _prune(directory, final, keep, say or _default_say)
    return final


def _prune(directory: Path, newest: Path, keep: int, say: Callable[[str], None]) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest older checkpoints that verify; the rest go."""
    older = [path for path in list_checkpoints(directory) if _order(path) < _order(newest)]
    kept = 1
    for path in reversed(older):
        if kept >= keep:
            path.unlink(missing_ok=True)
            _verified.pop(_key(path), None)
            continue
        try:
            _verify(path)
        except (CheckpointError, OSError) as error:
            _move_aside(path, error, say)
            continue
        kept += 1


def _verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` loads; skipped for files known good and unchanged."""
    if _verified.get(_key(path)) == _signature(path):
        return
    load(path)  # records it


def _move_aside(path: Path, error: Exception, say: Callable[[str], None]) -> Path | None:
    """Rename a checkpoint that does not verify to ``<name>.corrupt`` (``.corrupt.<n>`` if taken)."""
    target, number = path.with_name(path.name + _CORRUPT_SUFFIX), 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{_CORRUPT_SUFFIX}.{number}")
    _verified.pop(_key(path), None)
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    say(f"checkpoint {path.name} does not verify ({error}); moved aside to {target.name}")
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash of the machine right after must not undo it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load(path: str | Path) -> dict[str, Any]:
    """Read and verify one checkpoint.

    Raises:
        CheckpointError: the file is truncated, altered, or not a checkpoint.
    """
    path = Path(path)
    data = path.read_bytes()
    header, newline, payload = data.partition(b"\n")
    if not newline or not header.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not an accel checkpoint (bad header)")
    expected = header[len(_MAGIC):].decode(errors="replace")
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"{path}: checksum mismatch ({len(payload):,} payload bytes): truncated or corrupt")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # a checksum that matches a payload torch cannot read: still unusable
        raise CheckpointError(f"{path}: unreadable payload ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: payload is a {type(state).__name__}, not a dict")
    if _NAME.match(path.name):
        _verified[_key(path)] = (len(data), path.stat().st_mtime_ns)
    return state


def load_latest(directory: str | Path, *, say: Callable[[str], None] | None = None
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies, as ``(path, state)``; ``None`` if none does.

    Each checkpoint skipped is reported through ``say`` (default: a WARNING on the ``accel.distributed.checkpoint`` logger) with the reason.
    """
    say = say or _default_say
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except (CheckpointError, OSError) as error:
            say(f"skipping checkpoint {path.name}: {error}; trying the one before it")
    return None


def recover(directory: str | Path, *, say: Callable[[str], None] | None = None
            ) -> tuple[Path, dict[str, Any]] | None:
    """Prepare ``directory`` for a run that resumes; the newest checkpoint that verifies, as ``(path, state)``.

    Stray temporary files of a write that was killed are removed; every checkpoint newer than the one
    returned does not verify and is moved aside as ``<name>.corrupt``, each with a message through ``say``
    (default: a WARNING on the ``accel.distributed.checkpoint`` logger). ``None`` if no checkpoint verifies. Call it from one process at a time:
    a temporary file being written by another process would be removed.
    """
    say = say or _default_say
    directory = Path(directory)
    if directory.is_dir():
        for stray in sorted(directory.glob("checkpoint-*.tmp")):
            stray.unlink(missing_ok=True)
            say(f"removed {stray.name}, left by a write that did not finish")
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except (CheckpointError, OSError) as error:
            _move_aside(path, error, say)
    return None


def remove_all(directory: str | Path) -> int:
    """Delete every checkpoint (with stray temporary and moved-aside files) in ``directory``.

    Returns:
        The number of checkpoints (``checkpoint-*.pt``) removed.
    """
    directory = Path(directory)
    removed = list_checkpoints(directory)
    for path in removed:
        path.unlink(missing_ok=True)
        _verified.pop(_key(path), None)
    if directory.is_dir():
        for stray in [*directory.glob("checkpoint-*.tmp"), *directory.glob(f"checkpoint-*.pt{_CORRUPT_SUFFIX}*")]:
            stray.unlink(missing_ok=True)
    return len(removed)
