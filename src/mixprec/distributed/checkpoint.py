"""Sharded, re-shardable, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP).

Design note: a checkpoint is a folder. The model and the torch optimizers go through DCP
(``get_state_dict``/``set_state_dict`` name every tensor by its fully qualified parameter name,
without DDP's ``module.`` prefix, and store DTensors by their global shape), so each rank writes
only its own shards and a checkpoint written by N ranks loads on M ranks, or in one process
without a process group, with the same global weights. What differs per rank — the RNG state —
and the plain values beside (the session's precision state, ``extra``) go to one small file per
rank, ``rank<r>.pt``, written with :func:`mixprec.checkpoint.save_checkpoint` (checksums,
``weights_only`` loading). mixprec's optimizer wrappers go through DCP too, under ``wrapped``:
their fp32 masters, Kahan buffers and inner optimizer states are DTensors over DTensor
parameters (each rank writes its shards, and they re-shard by global shape) and replicas over
DDP ones (written once). DCP can only load into tensors that exist, so a wrapper that has not
stepped yet first takes one step with zero gradients and a learning rate of 0, which changes no
weight and creates every state tensor (the load then overwrites them), as
``torch.distributed.checkpoint.state_dict`` does for torch optimizers.

Atomicity: all ranks write into ``<path>/.tmp-<token>/``; after a barrier rank 0 renames it to
``<path>/v-<token>/`` and then points ``<path>/LATEST`` at it with ``os.replace`` (fsyncing files
and folders), and only then removes the previous version. A process killed at any moment leaves
``LATEST`` naming a complete version: the previous one or the new one. Values that
``torch.load(weights_only=True)`` would refuse are found on every rank before anything is
written. The folder must be on a file system every rank sees (as DCP's ``FileSystemWriter``
assumes).

One writer at a time: rank 0 holds an advisory lock on ``<path>/.lock`` for the whole save, so
a second process saving into the same folder is refused instead of deleting the first one's
versions. A save that fails on any rank (a full disk) fails on all of them as a
:class:`~mixprec.checkpoint.CheckpointError`, and its temporary folder is removed.

Loading checks everything before anything is loaded, on every rank (one rank's refusal makes all
raise): the rank files the saved world size names, the CRC-32 of ``.metadata`` and of every
stored item (``manifest.pt``, see :mod:`mixprec.distributed._dcp_io`), the metadata itself read
without running code, and the saved global shapes against the model's. DCP then reads into
copies, which are copied in only once all of it was read, so a failed load changes nothing. Each
rank gets the RNG state of the same rank (a rank the checkpoint has no file for, after growing
the world, keeps its own and gets rank 0's plain values). Folders written before the manifest
load with every check but the CRCs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mixprec import _dist
from mixprec.checkpoint import CheckpointError, check_loadable, load_checkpoint, save_checkpoint
from mixprec.distributed._dcp_io import (
    MANIFEST,
    METADATA,
    SafeLoadPlanner,
    SafeReader,
    check_extents,
    check_files,
    describe,
    file_crc,
    item_checksums,
    read_metadata,
    release_lock,
    take_lock,
    translated,
    verify_items,
)
from mixprec.optim.wrapper import WrappedOptimizer

__all__ = ["is_sharded_checkpoint", "load", "read_state", "save"]

_LATEST = "LATEST"


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it assumes one process: without a group, that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _barrier() -> None:
    if _dist.initialized():
        dist.barrier()


def _split(
    optimizers: Sequence[torch.optim.Optimizer],
) -> tuple[list[torch.optim.Optimizer], list[WrappedOptimizer]]:
    """(torch optimizers, saved through DCP; mixprec wrappers, saved per rank)."""
    torch_opts = [o for o in optimizers if not isinstance(o, WrappedOptimizer)]
    wrapped = [o for o in optimizers if isinstance(o, WrappedOptimizer)]
    return torch_opts, wrapped


def _dcp_state(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    wrapped: Sequence[WrappedOptimizer] = (),
) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizers)
    state: dict[str, Any] = {"model": model_state}
    if optimizers:
        state["optim"] = optim_state
    if wrapped:
        state["wrapped"] = [opt.state_dict() for opt in wrapped]
    return state


@torch.no_grad()
def _create_state(optimizer: WrappedOptimizer) -> None:
    """Give a wrapper that has not stepped its state tensors: one step with zero gradients and a
    learning rate of 0 (no weight changes), leaving the gradients as they were."""
    if len(optimizer.optimizer.state) > 0:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    grads = {p: p.grad for p in params}
    rates = [g["lr"] for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].clone().zero_()
            else:
                group["lr"] = 0.0
        optimizer.step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        for p, grad in grads.items():
            p.grad = grad


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint folder written by :func:`save`."""
    return (Path(path) / _LATEST).is_file()


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sharded checkpoint of ``model`` and ``optimizers`` to the folder ``path``.

    A collective: every rank calls it with the same ``path``. One save at a time writes into a
    folder: rank 0 holds ``<path>/.lock`` while it saves, and a second writer is refused.

    Args:
        path: the checkpoint folder (created if missing).
        model: a plain, DDP or FSDP2 model.
        optimizers: torch optimizers or mixprec's optimizer wrappers (both sharded through
            DCP).
        state: plain values of this rank to keep beside (the session state, ``extra``...).

    Returns:
        The folder of the version written.

    Raises:
        TypeError: a ``state`` value ``torch.load(weights_only=True)`` would refuse (on any
            rank): nothing is written and the previous checkpoint stays.
        ValueError: ``path`` is a file.
        CheckpointError: another process is saving into ``path``, or the save failed on some
            rank (a full disk...): its temporary folder is removed and the previous checkpoint
            stays.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():  # every rank sees it: all raise, none waits
        raise ValueError(
            f"checkpoint path {str(root)!r} is a file; a sharded checkpoint is a folder: give a "
            "folder path (or remove the file)"
        )
    torch_opts, wrapped = _split(optimizers)
    record = {
        "rank": _dist.rank(),
        "world_size": _dist.world_size(),
        "rng": torch.get_rng_state(),
        "wrapped_in_dcp": len(wrapped),  # how many wrapper states the DCP files hold
        "state": dict(state or {}),
    }
    refused: TypeError | None = None
    try:
        check_loadable(record)
    except TypeError as err:
        refused = err
    _agree_or_raise(refused)
    lock = None
    token, problem = secrets.token_hex(6), None
    if _dist.rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = take_lock(root)
            (root / f".tmp-{token}").mkdir()
        except (CheckpointError, OSError) as err:
            problem = str(err) if isinstance(err, CheckpointError) else _cannot_write(root, err)
    token, problem = _from_rank0(token, problem)
    try:
        if problem is not None:
            raise CheckpointError(problem)
        tmp = root / f".tmp-{token}"
        final = _write_version(root, tmp, model, torch_opts, wrapped, record)
    finally:
        release_lock(lock)
    return final


def _write_version(
    root: Path,
    tmp: Path,
    model: nn.Module,
    torch_opts: list[torch.optim.Optimizer],
    wrapped: Sequence[WrappedOptimizer],
    record: Mapping[str, Any],
) -> Path:
    """All ranks write into ``tmp``; rank 0 adds the manifest and publishes it (or removes it)."""
    rows: list[list[Any]] = []
    problem: str | None = None
    try:
        with _one_process_is_intended(), translated(tmp, "saving"):
            metadata = dcp.save(
                _dcp_state(model, torch_opts, wrapped),
                checkpoint_id=str(tmp),
                no_dist=not _dist.initialized(),
            )
        try:
            save_checkpoint(tmp / f"rank{_dist.rank()}.pt", record)
        except OSError as err:
            raise CheckpointError(_cannot_write(tmp / f"rank{_dist.rank()}.pt", err)) from None
        own = [f.name for f in tmp.iterdir() if f.name.startswith(f"__{_dist.rank()}_")]
        rows = item_checksums(tmp, metadata, own)
    except Exception as err:  # every rank must reach the gather below, or the others hang
        problem = str(err) if isinstance(err, CheckpointError) else describe(err)
    results = _gather((problem, rows))
    problems = [
        f"rank {r}: {p}" if _dist.initialized() else p for r, (p, _) in enumerate(results) if p
    ]
    if problems:
        if _dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(
            f"saving checkpoint {str(root)!r} failed ({problems[0]}); its temporary folder was "
            "removed and the previous checkpoint is kept"
        )
    final = root / f"v-{tmp.name[len('.tmp-') :]}"
    if _dist.rank() == 0:
        manifest = {
            "world_size": _dist.world_size(),
            "rank_files": [f"rank{r}.pt" for r in range(_dist.world_size())],
            "metadata_crc": file_crc(tmp / METADATA),
            "items": [row for _, part in results for row in part],
        }
        try:
            save_checkpoint(tmp / MANIFEST, manifest)
            _publish(root, tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            problem = _cannot_write(root, err)
    (problem,) = _from_rank0(problem)
    if problem is not None:
        raise CheckpointError(problem)
    return final


def _cannot_write(path: Path, err: OSError) -> str:
    cause = "no space left on device" if err.errno == errno.ENOSPC else f"{err}"
    return f"cannot write checkpoint {str(path)!r}: {cause}; the previous checkpoint is kept"


def _from_rank0(*values: Any) -> list[Any]:
    """Rank 0's ``values`` on every rank."""
    box = list(values)
    if _dist.initialized():
        dist.broadcast_object_list(box, src=0)
    return box


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not _dist.initialized():
        return [value]
    values: list[Any] = [None] * _dist.world_size()
    dist.all_gather_object(values, value)
    return values


def _agree(problem: str | None) -> None:
    """Raise CheckpointError on every rank if any rank found a problem (none goes on alone)."""
    found = [(r, p) for r, p in enumerate(_gather(problem)) if p is not None]
    if not found:
        return
    if problem is not None:
        raise CheckpointError(problem)
    rank, text = found[0]
    raise CheckpointError(f"rank {rank} refused the checkpoint: {text}")


def _agree_or_raise(refused: TypeError | None) -> None:
    """Raise on every rank if any rank's values are refused (no rank writes then)."""
    bad = torch.tensor([0.0 if refused is None else 1.0])
    if _dist.initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if refused is not None:
        raise refused
    if bad.item():
        raise TypeError(
            "another rank's checkpoint values cannot be loaded with weights_only=True (see its "
            "error); nothing was written and the previous checkpoint is unchanged"
        )


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished version into place, point LATEST at it, then drop the old ones.

    Only the writer holding the folder's lock publishes, so every other ``v-*``/``.tmp-*``
    folder is an older version or the leftover of a killed or failed save.
    """
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    os.rename(tmp, final)
    _fsync(root)
    pointer = root / f".{_LATEST}.{final.name}.tmp"
    pointer.write_text(final.name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / _LATEST)
    _fsync(root)
    for old in root.iterdir():
        if old != final and old.is_dir() and old.name.startswith(("v-", ".tmp-")):
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_version(root: Path) -> Path:
    try:
        name = (root / _LATEST).read_text().strip()
    except OSError as err:
        raise CheckpointError(
            f"{str(root)!r} is not a sharded mixprec checkpoint (no readable {_LATEST} file: "
            f"{err}); write one with mixprec.distributed.checkpoint.save"
        ) from None
    version = root / name
    if not version.is_dir():
        raise CheckpointError(f"checkpoint {str(root)!r}: {_LATEST} names {name!r}, not found")
    return version


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain values rank 0 saved (``state`` of :func:`save`), loading nothing else.

    What a caller checks before it builds anything to load into (the run a checkpoint is of).

    Raises:
        CheckpointError: not a sharded checkpoint, or a damaged rank file.
    """
    return dict(load_checkpoint(_current_version(Path(path)) / "rank0.pt").get("state", {}))


def _check_shapes(root: Path, metadata: Metadata, model: nn.Module) -> None:
    """Refuse a checkpoint whose saved global shapes differ from the model's (nothing loaded)."""
    saved_entries = metadata.state_dict_metadata
    problems: list[str] = []
    for name, tensor in get_model_state_dict(model).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        saved = saved_entries.get(f"model.{name}")
        if saved is None:
            problems.append(f"{name!r} is missing")
        elif isinstance(saved, TensorStorageMetadata) and tuple(saved.size) != tuple(tensor.shape):
            problems.append(
                f"{name!r} was saved with global shape {tuple(saved.size)}, the model has "
                f"{tuple(tensor.shape)}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {str(root)!r} does not fit this model: "
            f"{'; '.join(problems[:5])}. Nothing was loaded; build the same model as was saved"
        )


def _check_version(root: Path, version: Path) -> tuple[dict[str, Any], Metadata]:
    """Check a version's files before any of it is loaded; return this rank's record and the
    DCP metadata.

    The files the saved world size names must all exist; with a manifest (written since
    per-item checksums), ``.metadata`` must match its CRC before it is read, and every stored
    item its own (the ranks share the reading). Versions without one are checked as far as they
    allow: rank files by their own checksums, metadata read without running code.
    """
    first = load_checkpoint(version / "rank0.pt")
    world = first.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointError(
            f"checkpoint {str(version / 'rank0.pt')!r} is malformed: its world size is {world!r}"
        )
    missing = [f"rank{r}.pt" for r in range(world) if not (version / f"rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(root)!r} was written by {world} ranks but {', '.join(missing)} "
            f"is missing from {str(version)!r}; a rank would resume with its own RNG state. "
            "Restore the missing files or an earlier checkpoint"
        )
    manifest = None
    problem = check_files(version, [METADATA])
    if problem is not None:
        raise CheckpointError(f"{problem}; restore it from a backup or an earlier checkpoint")
    if (version / MANIFEST).is_file():
        manifest = load_checkpoint(version / MANIFEST)
        if file_crc(version / METADATA) != manifest.get("metadata_crc"):
            raise CheckpointError(
                f"checkpoint file {str(version / METADATA)!r} is corrupt: it does not match the "
                "checksum recorded when it was saved; restore it from a backup or an earlier "
                "checkpoint"
            )
    metadata = read_metadata(version)
    files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    problem = check_files(version, sorted(files)) or check_extents(version, metadata)
    if problem is None and manifest is not None:
        rows = manifest.get("items", [])
        problem = verify_items(version, rows[_dist.rank() :: _dist.world_size()])
    if problem is not None:
        raise CheckpointError(f"{problem}; restore it from a backup or an earlier checkpoint")
    own = version / f"rank{_dist.rank()}.pt"
    record = load_checkpoint(own) if _dist.rank() < world else first
    return record, metadata


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    check_state: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`, on any number of ranks; return this rank's
    plain values (the ``state`` given to :func:`save`).

    Everything is checked before anything is loaded, on every rank, and every rank raises if
    one refuses: the files the saved world size names, the checksums of the metadata and of
    every stored item, the saved global shapes, the number of optimizer wrappers, and ``state``
    by ``check_state`` (which raises to refuse). DCP then loads into copies of the model's and
    optimizers' state, which are copied in only when all of it was read: a load that fails
    changes nothing (at the cost of one more copy of the state while loading).

    Args:
        path: the checkpoint folder.
        model: the model to load into (plain, DDP or FSDP2, any world size).
        optimizers: the same kinds of optimizers, in the same order, as were saved.
        check_state: called with the saved ``state`` before anything is loaded.

    Returns:
        The saved ``state`` of this rank (of rank 0 for a rank that has none).

    Raises:
        CheckpointError: not a checkpoint, damaged or incomplete, of other shapes or other
            optimizers, or a ``state`` that ``check_state`` refuses (named in the message).
    """
    root = Path(path)
    torch_opts, wrapped = _split(optimizers)
    problem: str | None = None
    try:
        version = _current_version(root)
        record, metadata = _check_version(root, version)
        saved_wrapped = record.get("wrapped_in_dcp", 0)
        if saved_wrapped != len(wrapped):
            raise CheckpointError(
                f"checkpoint {str(root)!r} holds {saved_wrapped} mixprec optimizer wrapper "
                f"states; {len(wrapped)} were given. Pass the same optimizers as were saved"
            )
        state = dict(record.get("state", {}))
        if check_state is not None:
            try:
                check_state(state)
            except ValueError as err:
                raise CheckpointError(f"checkpoint {str(root)!r}: {err}") from None
        _check_shapes(root, metadata, model)
    except Exception as err:  # every rank must reach the agreement below, or the others hang
        problem = (
            str(err) if isinstance(err, CheckpointError) else f"{str(root)!r}: {describe(err)}"
        )
    _agree(problem)
    staged = _read_staged(version, model, torch_opts, wrapped)
    set_state_dict(
        model,
        torch_opts,
        model_state_dict=staged["model"],
        optim_state_dict=staged.get("optim", {}),
    )
    for opt, saved in zip(wrapped, staged.get("wrapped", []), strict=True):
        opt.load_state_dict(saved)
    if _dist.rank() < record["world_size"]:
        torch.set_rng_state(record["rng"])
    return state


def _read_staged(
    version: Path,
    model: nn.Module,
    torch_opts: list[torch.optim.Optimizer],
    wrapped: Sequence[WrappedOptimizer],
) -> dict[str, Any]:
    """DCP's load into copies of the live state; the optimizers that had no state before get
    theirs only to name their tensors, and lose it again if the read fails."""
    fresh_torch = [opt for opt in torch_opts if not opt.state]
    fresh = [
        (opt, getattr(opt, "rounding_step", None)) for opt in wrapped if not opt.optimizer.state
    ]
    try:
        target = _dcp_state(model, torch_opts)
        for opt in wrapped:
            _create_state(opt)
        if wrapped:  # their state tensors exist only now
            target["wrapped"] = [opt.state_dict() for opt in wrapped]
        staged = _copy(target)
        with _one_process_is_intended(), translated(version, "loading"):
            dcp.load(
                staged,
                storage_reader=SafeReader(str(version)),
                planner=SafeLoadPlanner(),
                no_dist=not _dist.initialized(),
            )
    except BaseException:
        for torch_opt in fresh_torch:  # torch's get_state_dict gave them zero state: drop it
            torch_opt.state.clear()
        for opt, counter in fresh:  # as they were: no state, the counter not advanced
            opt.optimizer.state.clear()
            if counter is not None:
                opt.rounding_step = counter  # type: ignore[attr-defined]
        raise
    return staged


def _copy(value: Any) -> Any:
    """``value`` with every tensor copied (DTensors stay DTensors), so a load writes no live one."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((key, _copy(item)) for key, item in value.items())
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy(item) for item in value)
    return value
