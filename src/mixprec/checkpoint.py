"""Checkpoints that survive crashes and load without executing code.

Design note: a checkpoint is written to a temporary file in the target's folder, flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
folder is fsynced so the rename itself is durable. A process killed at any instant therefore leaves
either the previous checkpoint or the new one, never a torn file. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python values only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "mixprec-checkpoint"
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, foreign, or of another model."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        path: the checkpoint file; its folder is created if needed.
        payload: tensors, numbers, strings and containers of them.

    Returns:
        The path written.

    Raises:
        ValueError: ``path`` is an existing folder.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> p = save_checkpoint(os.path.join(folder, "ckpt.pt"), {"step": 3})
        >>> load_checkpoint(p)["step"]
        3
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"checkpoint path {str(target)!r} is a folder; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": CHECKPOINT_FORMAT, "version": _VERSION, **payload}
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, corrupt or truncated, or not a mixprec checkpoint.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist or is not a file")
    try:
        record = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt or truncated and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(source)!r} is not a mixprec checkpoint (no 'format': {CHECKPOINT_FORMAT!r})"
        )
    if record.get("version") != _VERSION:
        raise CheckpointError(
            f"checkpoint {str(source)!r} has format version {record.get('version')!r}; this "
            f"mixprec reads version {_VERSION}"
        )
    return record
