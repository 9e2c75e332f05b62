"""Checkpoints that survive crashes, load without executing code, and notice damage.

Design note: a checkpoint is written to a temporary file in the target's folder, flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
folder is fsynced so the rename itself is durable. A process killed at any instant therefore leaves
either the previous checkpoint or the new one, never a torn file. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python values only.

Three checks keep a save from losing the last good checkpoint and a load from returning silently
wrong data:

* Before anything is written, the payload's skeleton (every value but its plain tensors, which
  torch always loads) is saved and loaded back in memory with ``weights_only=True``: a value that
  loader refuses (a numpy scalar, a ``Path``, an ``argparse.Namespace``) is named and refused, so
  the previous file stays as it was. Torch's own loader is the rule, so ``add_safe_globals`` counts.
* Every tensor gets a CRC-32 of its bytes (format version 2), verified on load: a flipped bit names
  the tensor. It costs one pass over the bytes each way: on one CPU core about 0.5 ms per MB, or
  +25% on a save and +40% on a load of a 10M-parameter AdamW checkpoint
  (``benchmarks/bench_checkpoint.py``). CUDA tensors are copied to the host for it.
* The plain values beside them — keys, numbers, strings, flags, dtypes, each tensor's dtype and
  shape — get one CRC-32 of a canonical text form of the whole record (format version 3), so a
  flipped bit in a learning rate, a loss scale, a step count or a key name is refused as well
  (torch's zip reader checks no CRC). Files of versions 1 and 2 load without it.
* A writer names its temporary file ``.<name>.<host>.<pid>.<token>.tmp``. A kill leaves it behind;
  the next save or load of the same checkpoint removes those whose process is gone, and any that
  nobody has written for ten minutes (another host's, an older naming's). A live writer's is kept.

The temporary file is created with mode 0666 filtered by the umask, as ``open`` would, so the
checkpoint gets the permissions of the run's other files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import enum
import errno
import hashlib
import io
import os
import re
import secrets
import socket
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "check_loadable",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "mixprec-checkpoint"
_VERSION = 3  # 2 added "checksums", 3 "meta_checksum"; files of versions 1 and 2 still load
_READABLE_VERSIONS = (1, 2, 3)
_RESERVED_KEYS = ("format", "version", "checksums", "meta_checksum")
_STALE_AFTER_S = 600.0  # a temporary file nobody wrote for this long belongs to no live save


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, foreign, or of another model."""


# -- saving ---------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename).

    The payload is checked first: every value must load back with
    ``torch.load(weights_only=True)``. A refused save writes nothing and leaves a previous file at
    ``path`` byte for byte as it was.

    Args:
        path: the checkpoint file; its folder is created if needed.
        payload: tensors, numbers, strings, ``torch.dtype``/``torch.device`` and lists, tuples and
            dicts of them; the keys ``"format"``, ``"version"`` and ``"checksums"`` are reserved.

    Returns:
        The path written.

    Raises:
        ValueError: ``path`` is an existing folder, or ``payload`` uses a reserved key.
        TypeError: ``payload`` is not a mapping, or holds a value ``weights_only`` loading
            refuses (the message names it and says how to store it instead).

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
    if not isinstance(payload, Mapping):
        raise TypeError(
            f"a checkpoint payload is a dict of named values, got {type(payload).__name__} "
            f"{_short(payload)}"
        )
    reserved = [key for key in _RESERVED_KEYS if key in payload]
    if reserved:
        raise ValueError(
            f"payload keys {reserved!r} are reserved for the checkpoint's own record "
            f"({', '.join(map(repr, _RESERVED_KEYS))}); rename them"
        )
    check_loadable(payload)
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": _VERSION,
        **payload,
        "checksums": [[name, _crc(tensor)] for name, tensor in _named_tensors(payload)],
    }
    record["meta_checksum"] = _meta_crc(record)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    temporary, fd = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if _disk_full(err):
            raise OSError(
                errno.ENOSPC,
                f"no space left on device: checkpoint {str(target)!r} was not written (the "
                "previous file there, if any, is kept). Free space on that disk or save "
                f"elsewhere ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
                str(target),
            ) from None
        raise
    _fsync_folder(target.parent)
    return target


def _disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or torch's zip writer's report of a
    short write (``unexpected pos``, ``file write failed``), which carries no errno."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "unexpected pos" in text or "file write failed" in text
    )


def check_loadable(payload: Mapping[str, Any]) -> None:
    """Check that ``torch.load(weights_only=True)`` reads back every value of ``payload``.

    Plain tensors are left out (torch loads every dtype), so the check costs little whatever the
    model size; what is checked is torch's own loader, including its ``add_safe_globals``.

    Raises:
        TypeError: a value that does not load back, named by its place in the payload, with the
            way to store it instead.
    """
    if _round_trips(_skeleton(payload)):
        return
    where, value = _first_refused(payload, "")
    raise TypeError(
        f"checkpoint value {where or 'payload'} is a {_type_name(value)} ({_short(value)}), which "
        f"torch.load(weights_only=True) cannot read back; {_plain_hint(value)}. Nothing was "
        "written: a previous checkpoint at this path is unchanged"
    )


def _skeleton(value: Any) -> Any:
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        return None  # torch loads plain tensors of every dtype; writing each would be slow
    if type(value) in (dict, OrderedDict):
        return type(value)((key, _skeleton(item)) for key, item in value.items())
    if type(value) in (list, tuple):
        return type(value)(_skeleton(item) for item in value)
    return value  # a leaf, or a container of a type the round trip must judge as it is


def _round_trips(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception:  # torch raises pickling, unpickling and attribute errors alike
        return False
    return True


def _first_refused(value: Any, where: str) -> tuple[str, Any]:
    """The innermost value (and its place) that does not round-trip, given that ``value`` fails."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not _round_trips(key):
                return f"{where or 'payload'} key {key!r}", key
            if not _round_trips(_skeleton(item)):
                place = str(key) if not where and isinstance(key, str) else f"{where}[{key!r}]"
                return _first_refused(item, place)
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            if not _round_trips(_skeleton(item)):
                return _first_refused(item, f"{where}[{index}]")
    return where, value


def _plain_hint(value: Any) -> str:
    kind = type(value)
    if kind.__module__.split(".")[0] == "numpy":
        if kind.__name__ == "ndarray":
            return "store torch.from_numpy(value) instead"
        return "store value.item() (a Python number) instead"
    if isinstance(value, os.PathLike):
        return "store str(value) instead"
    if isinstance(value, argparse.Namespace):
        return "store vars(value) (a dict) instead"
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        return "store a string or a number instead, e.g. value.isoformat()"
    if isinstance(value, enum.Enum):
        return "store value.value or value.name instead"
    return (
        "store tensors, numbers, strings, bools, None, torch dtypes/devices and lists, tuples "
        "and dicts of them"
    )


def _create_temporary(target: Path) -> tuple[Path, int]:
    """A new temporary file beside ``target``, created 0666 filtered by the umask, as ``open``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = f".{target.name}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        temporary = target.parent / name
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:  # a token collision: draw another
            continue


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


# -- temporary files left by a kill ---------------------------------------------------------------


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of ``target`` that no running save is writing."""
    prefix, suffix = f".{target.name}.", ".tmp"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    now = time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        candidate = target.parent / name
        if _is_stale(name[len(prefix) : -len(suffix)], candidate, now):
            with contextlib.suppress(OSError):  # another process may have removed it already
                os.unlink(candidate)


def _is_stale(middle: str, candidate: Path, now: float) -> bool:
    parts = middle.split(".")
    # ours: host.pid.token; anything else (an older naming, or the temporary of a checkpoint
    # whose name extends this one, such as "ckpt.pt.bak") goes only once nobody wrote it for long
    if len(parts) == 3 and parts[0] == _host_tag() and parts[1].isdigit():
        if not _process_alive(int(parts[1])):
            return True
    try:
        return now - candidate.stat().st_mtime > _STALE_AFTER_S
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":
        # another thread of this process may be saving; on Windows signal 0 is CTRL_C_EVENT, so
        # there the age rule alone decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # it exists (another user's), or we cannot tell: keep the file
    return True


# -- checksums ------------------------------------------------------------------------------------


def _named_tensors(value: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a payload, depth first in insertion order, named by its path."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_tensors(item, f"{name}/{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _named_tensors(item, f"{name}/{index}" if name else str(index))


def _crc(tensor: torch.Tensor) -> int | None:
    """CRC-32 of a tensor's bytes in row-major order; None for layouts without plain bytes."""
    if (
        type(tensor) not in (torch.Tensor, torch.nn.Parameter)
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.device.type == "meta"
    ):
        return None
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).cpu()
    return zlib.crc32(flat.view(torch.uint8).numpy().data)


def _verify_checksums(record: Mapping[str, Any], source: Path) -> None:
    payload = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    recorded = record.get("checksums")
    found = list(_named_tensors(payload))
    if not isinstance(recorded, list) or len(recorded) != len(found):
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt: it holds {len(found)} tensors but its "
            f"checksum list covers {len(recorded) if isinstance(recorded, list) else 'none'}; "
            "restore it from a backup or an earlier checkpoint"
        )
    for entry, (name, tensor) in zip(recorded, found, strict=True):
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == name):
            raise CheckpointError(
                f"checkpoint {str(source)!r} is corrupt: tensor {name!r} is not where its "
                f"checksum list says ({_short(entry)}); restore it from a backup or an earlier "
                "checkpoint"
            )
        if entry[1] is not None and _crc(tensor) != entry[1]:
            raise CheckpointError(
                f"checkpoint {str(source)!r} is corrupt: tensor {name!r} "
                f"({tuple(tensor.shape)} {tensor.dtype}) does not match the checksum recorded "
                "when it was saved (flipped bits or a damaged disk); restore it from a backup "
                "or an earlier checkpoint"
            )


def _canonical(value: Any, out: list[str]) -> None:
    """Append a text form of ``value`` that is the same after a save and load: every key, number,
    string, flag, dtype and device, and each tensor's dtype and shape (its bytes have their own
    CRC). Leaves of other types (``add_safe_globals`` classes) count by their type only."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        out.append(f"T{value.dtype}{tuple(value.shape)}")
    elif isinstance(value, Mapping):
        out.append("{")
        for key, item in value.items():
            _canonical(key, out)
            out.append(":")
            _canonical(item, out)
            out.append(",")
        out.append("}")
    elif kind in (list, tuple, torch.Size):
        out.append(f"{kind.__name__}[")
        for item in value:
            _canonical(item, out)
            out.append(",")
        out.append("]")
    elif kind in (set, frozenset):
        parts = []
        for item in value:
            part: list[str] = []
            _canonical(item, part)
            parts.append("".join(part))
        out.append(f"{kind.__name__}[{','.join(sorted(parts))}]")
    elif value is None or kind in (bool, int, float, complex, str, bytes, torch.dtype):
        out.append(f"{kind.__name__}:{value!r}")
    elif kind in (torch.device, torch.layout, torch.memory_format):
        out.append(f"{kind.__name__}:{value}")
    else:
        out.append(f"<{kind.__module__}.{kind.__qualname__}>")


def _meta_crc(record: Mapping[str, Any]) -> int:
    """CRC-32 of the canonical text of every value but the tensors' bytes (format version 3)."""
    out: list[str] = []
    _canonical({k: v for k, v in record.items() if k != "meta_checksum"}, out)
    return zlib.crc32("".join(out).encode("utf-8", "surrogatepass"))


def _verify_meta_checksum(record: Mapping[str, Any], source: Path) -> None:
    if record.get("meta_checksum") != _meta_crc(record):
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt: its plain values (keys, numbers, strings, "
            "flags such as learning rates, the loss scale or the step count) do not match the "
            "checksum recorded when it was saved (flipped bits or a damaged disk); restore it "
            "from a backup or an earlier checkpoint"
        )


# -- loading --------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Every tensor is checked against the checksum recorded when it was saved (version 2 files;
    version 1 files carry none), and the plain values against theirs (version 3). Stale
    temporary files of this checkpoint are removed.

    Raises:
        CheckpointError: the file is missing, corrupt or truncated (a damaged tensor is named),
            holds Python objects ``weights_only`` loading refuses, or is not a mixprec
            checkpoint of a version this mixprec reads.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist or is not a file")
    _remove_stale_temporaries(source)
    try:
        record = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise _unreadable(source, err) from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(source)!r} is not a mixprec checkpoint (no 'format': {CHECKPOINT_FORMAT!r})"
        )
    version = record.get("version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {str(source)!r} has format version {version!r}; this mixprec reads "
            f"versions {', '.join(map(str, _READABLE_VERSIONS))}: load it with the mixprec that "
            "wrote it"
        )
    if (version >= 3) != ("meta_checksum" in record):
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt: format version {version} "
            f"{'lacks' if version >= 3 else 'cannot hold'} a 'meta_checksum' (a damaged "
            "version number or key); restore it from a backup or an earlier checkpoint"
        )
    if version >= 3:
        _verify_meta_checksum(record, source)
    if version >= 2:
        _verify_checksums(record, source)
    record.pop("checksums", None)
    record.pop("meta_checksum", None)
    return record


def _unreadable(source: Path, err: Exception) -> CheckpointError:
    """The error for a file ``torch.load`` failed on: refused objects (named), or damage."""
    message = str(err)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    # a zip archive whose CRCs hold is intact; torch's older, non-zip format has no CRCs, but
    # a refused global that names a real type is an object, not damage
    if "Weights only load failed" in message and (
        _zip_intact(source) or (refused is not None and not zipfile.is_zipfile(source))
    ):
        detail = next(
            (line.strip() for line in message.splitlines() if "WeightsUnpickler error" in line),
            message.splitlines()[0],
        )
        what = f" (one of type {refused.group(1)})" if refused else ""
        return CheckpointError(
            f"checkpoint {str(source)!r} is intact but holds Python objects{what} that "
            f"torch.load(weights_only=True) refuses to build ({detail[:200]}); mixprec's save "
            "now refuses such values, so another program or an older mixprec wrote it. If you "
            "trust its source, read it with torch.load(path, weights_only=False) and save its "
            "values again as plain data"
        )
    first = message.splitlines()[0] if message else "no detail"
    return CheckpointError(
        f"checkpoint {str(source)!r} is corrupt or truncated and cannot be read "
        f"({type(err).__name__}: {first[:200]})"
    )


def _zip_intact(source: Path) -> bool:
    """Whether ``source`` is a zip archive whose every member matches its CRC."""
    try:
        with zipfile.ZipFile(source) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
