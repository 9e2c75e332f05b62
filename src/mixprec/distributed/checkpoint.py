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

Loading checks the saved global shapes against the model's before anything is loaded, and gives
each rank the RNG state of the same rank (a rank the checkpoint has no file for, after growing
the world, keeps its own and gets rank 0's plain values).
"""

from __future__ import annotations

import contextlib
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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mixprec.checkpoint import CheckpointError, check_loadable, load_checkpoint, save_checkpoint
from mixprec.optim.wrapper import WrappedOptimizer

__all__ = ["is_sharded_checkpoint", "load", "read_state", "save"]

_LATEST = "LATEST"


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it assumes one process: without a group, that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _barrier() -> None:
    if _distributed():
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

    A collective: every rank calls it with the same ``path``.

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
    """
    root = Path(path)
    if root.exists() and not root.is_dir():  # every rank sees it: all raise, none waits
        raise ValueError(
            f"checkpoint path {str(root)!r} is a file; a sharded checkpoint is a folder: give a "
            "folder path (or remove the file)"
        )
    torch_opts, wrapped = _split(optimizers)
    record = {
        "rank": _rank(),
        "world_size": _world(),
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
    token = _shared_token()
    tmp = root / f".tmp-{token}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    with _one_process_is_intended():
        dcp.save(
            _dcp_state(model, torch_opts, wrapped),
            checkpoint_id=str(tmp),
            no_dist=not _distributed(),
        )
    save_checkpoint(tmp / f"rank{_rank()}.pt", record)
    _barrier()
    final = root / f"v-{token}"
    if _rank() == 0:
        _publish(root, tmp, final)
    _barrier()
    return final


def _agree_or_raise(refused: TypeError | None) -> None:
    """Raise on every rank if any rank's values are refused (no rank writes then)."""
    bad = torch.tensor([0.0 if refused is None else 1.0])
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if refused is not None:
        raise refused
    if bad.item():
        raise TypeError(
            "another rank's checkpoint values cannot be loaded with weights_only=True (see its "
            "error); nothing was written and the previous checkpoint is unchanged"
        )


def _shared_token() -> str:
    token = [secrets.token_hex(6) if _rank() == 0 else ""]
    if _distributed():
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished version into place, point LATEST at it, then drop the old ones."""
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
    for old in root.iterdir():  # previous versions and the leftovers of killed saves
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


def _check_shapes(version: Path, expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose saved global shapes differ from the model's (nothing loaded)."""
    metadata = dcp.FileSystemReader(str(version)).read_metadata().state_dict_metadata
    problems: list[str] = []
    for name, tensor in expected.get("model", {}).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        saved = metadata.get(f"model.{name}")
        if saved is None:
            problems.append(f"{name!r} is missing")
        elif isinstance(saved, TensorStorageMetadata) and tuple(saved.size) != tuple(tensor.shape):
            problems.append(
                f"{name!r} was saved with global shape {tuple(saved.size)}, the model has "
                f"{tuple(tensor.shape)}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {str(version.parent)!r} does not fit this model: "
            f"{'; '.join(problems[:5])}. Nothing was loaded; build the same model as was saved"
        )


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    check_state: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`, on any number of ranks; return this rank's
    plain values (the ``state`` given to :func:`save`).

    Everything is checked before anything is loaded: the saved global shapes, the number of
    optimizer wrappers, and ``state`` by ``check_state`` (which raises to refuse).

    Args:
        path: the checkpoint folder.
        model: the model to load into (plain, DDP or FSDP2, any world size).
        optimizers: the same kinds of optimizers, in the same order, as were saved.
        check_state: called with the saved ``state`` before anything is loaded.

    Returns:
        The saved ``state`` of this rank (of rank 0 for a rank that has none).

    Raises:
        CheckpointError: not a checkpoint, damaged, of other shapes or other optimizers, or a
            ``state`` that ``check_state`` refuses (named in the message).
    """
    root = Path(path)
    version = _current_version(root)
    torch_opts, wrapped = _split(optimizers)
    own = version / f"rank{_rank()}.pt"
    record = load_checkpoint(own if own.is_file() else version / "rank0.pt")
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
    target = _dcp_state(model, torch_opts)
    _check_shapes(version, target)
    fresh = [
        (opt, getattr(opt, "rounding_step", None)) for opt in wrapped if not opt.optimizer.state
    ]
    try:
        for opt in wrapped:
            _create_state(opt)
        if wrapped:  # their state tensors exist only now
            target["wrapped"] = [opt.state_dict() for opt in wrapped]
        with _one_process_is_intended():
            dcp.load(target, checkpoint_id=str(version), no_dist=not _distributed())
        for opt, saved in zip(wrapped, target.get("wrapped", []), strict=True):
            opt.load_state_dict(saved)
    except Exception:
        for opt, counter in fresh:  # as they were: no state, the counter not advanced
            opt.optimizer.state.clear()
            if counter is not None:
                opt.rounding_step = counter  # type: ignore[attr-defined]
        raise
    set_state_dict(
        model,
        torch_opts,
        model_state_dict=target["model"],
        optim_state_dict=target.get("optim", {}),
    )
    if own.is_file():
        torch.set_rng_state(record["rng"])
    return state
