"""Reading DCP checkpoint folders without running code, and checking their bytes before use.

Design note: ``torch.distributed.checkpoint`` reads a folder's ``.metadata`` with plain
``pickle.load`` and its non-tensor items with ``torch.load(weights_only=False)``, so a crafted
folder runs code when it is loaded. Here the metadata is read by an unpickler that builds only
DCP's own metadata classes, torch dtypes, sizes and layouts, and paths (anything else is refused,
named, before it is built), and non-tensor items go through ``torch.load(weights_only=True)``.
A reader and a planner with those two changes replace DCP's defaults on every load.

DCP records no checksums, so a flipped bit in a shard loads silently. After a save, every item
(a tensor shard or a non-tensor value) gets a CRC-32 of its bytes as they lie in the file, and
the ``.metadata`` file a CRC of its own; a load checks them all before anything is loaded. The
records are kept in ``manifest.pt`` (a :func:`mixprec.checkpoint.save_checkpoint` file, itself
checksummed), with the world size and the files the version must hold.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from mixprec.checkpoint import CheckpointError

__all__ = [
    "LOCK",
    "MANIFEST",
    "METADATA",
    "SafeLoadPlanner",
    "SafeReader",
    "check_extents",
    "check_files",
    "describe",
    "file_crc",
    "item_checksums",
    "read_metadata",
    "release_lock",
    "take_lock",
    "translated",
    "verify_items",
]

METADATA = ".metadata"
MANIFEST = "manifest.pt"
LOCK = ".lock"
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: a refused global raises before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds an object of type {module}.{name}, refused")


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of a checkpoint version, read without running code.

    Raises:
        CheckpointError: the file is missing, damaged, or holds objects other than DCP's
            metadata (the refused type is named).
    """
    path = folder / METADATA
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} cannot be read ({_cause(err)}); the checkpoint is "
            "incomplete: restore it from a backup or an earlier checkpoint"
        ) from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        if "refused" in str(err):
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not DCP metadata: {err} (loading it could "
                "run code). Nothing was loaded; load only checkpoints from a trusted source"
            ) from None
        raise _damaged(path, err) from None
    except Exception as err:  # a damaged pickle stream raises many types
        raise _damaged(path, err) from None
    if not isinstance(metadata, Metadata) or not isinstance(
        getattr(metadata, "state_dict_metadata", None), Mapping
    ):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} holds a {type(metadata).__name__}, not DCP "
            "metadata; restore it from a backup or an earlier checkpoint"
        )
    return metadata


def _damaged(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {str(path)!r} is corrupt or truncated ({_cause(err)}); restore it "
        "from a backup or an earlier checkpoint"
    )


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else 'no detail'}"


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: mixprec writes none
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no per-rank metadata")
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = StorageMeta()  # as FileSystemReader.read_metadata does
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint item {read_item.storage_index.fqn!r} holds Python objects that "
                f"torch.load(weights_only=True) refuses ({_cause(err)}); nothing was loaded"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


# -- checksums of the items as they lie in the files ----------------------------------------------


def _entries(metadata: Metadata) -> list[tuple[str, str, int, int]]:
    """(item name, file, byte offset, length) of every stored item, in a fixed order."""
    rows = []
    for index, info in (metadata.storage_data or {}).items():
        offset = "" if index.offset is None else ",".join(map(str, index.offset))
        rows.append((f"{index.fqn}@{offset}", info.relative_path, info.offset, info.length))
    return sorted(rows)


def item_checksums(folder: Path, metadata: Metadata, files: Iterable[str]) -> list[list[Any]]:
    """``[name, file, offset, length, crc]`` of every item stored in one of ``files``."""
    wanted = set(files)
    rows = []
    for name, file, offset, length in _entries(metadata):
        if file in wanted:
            rows.append([name, file, offset, length, _crc_range(folder / file, offset, length)])
    return rows


def verify_items(folder: Path, rows: Iterable[list[Any]]) -> str | None:
    """The first problem with the recorded items' bytes (a missing file, a changed item)."""
    for name, file, offset, length, crc in rows:
        path = folder / file
        try:
            found = _crc_range(path, offset, length)
        except OSError as err:
            return f"checkpoint file {str(path)!r} cannot be read ({_cause(err)})"
        if found != crc:
            return (
                f"checkpoint file {str(path)!r} is corrupt: item {name!r} ({length} bytes at "
                f"{offset}) does not match the checksum recorded when it was saved (flipped bits, "
                "a truncated file or a damaged disk)"
            )
    return None


def _crc_range(path: Path, offset: int, length: int) -> int:
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(left, 1 << 22))
            if not chunk:
                raise OSError(f"the file ends {left} bytes early (truncated)")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc


def file_crc(path: Path) -> int:
    """CRC-32 of a whole file."""
    return _crc_range(path, 0, path.stat().st_size)


def check_files(folder: Path, names: Iterable[str]) -> str | None:
    """The first file of ``names`` missing from ``folder``, as a problem, or None."""
    for name in names:
        if not (folder / name).is_file():
            return f"checkpoint file {str(folder / name)!r} is missing"
    return None


def check_extents(folder: Path, metadata: Metadata) -> str | None:
    """The first item that ends past the end of its file (a truncated file), or None: a check
    that needs no recorded checksums, so folders written before them get it too."""
    sizes: dict[str, int] = {}
    for name, file, offset, length in _entries(metadata):
        path = folder / file
        if file not in sizes:
            try:
                sizes[file] = path.stat().st_size
            except OSError as err:
                return f"checkpoint file {str(path)!r} cannot be read ({_cause(err)})"
        if offset + length > sizes[file]:
            return (
                f"checkpoint file {str(path)!r} is truncated: item {name!r} ends at byte "
                f"{offset + length}, the file has {sizes[file]}"
            )
    return None


# -- one writer per folder ------------------------------------------------------------------------


def take_lock(root: Path) -> int | None:
    """Hold ``<root>/.lock`` (an advisory ``flock``, freed when the process ends, even by a kill).

    Returns:
        The lock's file descriptor (for :func:`release_lock`), or None where ``fcntl`` is missing.

    Raises:
        CheckpointError: another process holds it: it is saving into this folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one writer per folder is on the user
        return None
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(
            f"another process is saving into checkpoint folder {str(root)!r} (it holds "
            f"{str(root / LOCK)!r}); two writers would delete each other's versions. Nothing "
            "was written: give each run its own folder, or save after the other save ends"
        ) from None
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor frees the flock


# -- errors ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def translated(where: Path, action: str) -> Iterator[None]:
    """Turn DCP's ``CheckpointException`` (a ``BaseException``, with remote tracebacks) and other
    failures into a short :class:`CheckpointError` naming ``where`` and the first cause."""
    try:
        yield
    except CheckpointError:
        raise
    except CheckpointException as err:
        rank, (cause, _) = next(iter(err.failures.items()))
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(
            f"{action} checkpoint {str(where)!r} failed on rank {rank}: {describe(cause)}"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{action} checkpoint {str(where)!r} failed: {describe(err)}"
        ) from None


def describe(err: BaseException) -> str:
    """A short cause: "no space left on device" for a full disk, else the error's first line."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on device"
    if "unexpected pos" in str(err) or "file write failed" in str(err):
        return f"a write failed, most likely no space left on device ({_cause(err)})"
    return _cause(err)
