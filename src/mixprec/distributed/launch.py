"""Where a command runs under ``torchrun``: the process group, this rank, the batch slice.

Design note: ``torchrun`` starts one process per rank and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). The command
(``mixprec train``/``compare``) opens the default process group from it for the length of the
command — gloo for CPU training, nccl for CUDA, each rank on the GPU of its ``LOCAL_RANK`` — and
the runner trains data-parallel over the world: every rank builds the same global batch (batches
are a pure function of the seed and the step) and takes its own contiguous slice of it, so a run
on N ranks computes the gradient of the same global batch as one process does. Without
``torchrun`` nothing changes: one process, no group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from mixprec import _dist

__all__ = ["check_divisible", "local_slice", "rank", "torchrun_group", "world_size"]


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return _dist.rank()


def world_size() -> int:
    """The number of ranks in the default group (1 without one)."""
    return _dist.world_size()


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextlib.contextmanager
def torchrun_group(device: str) -> Iterator[str]:
    """Open the default process group when launched by ``torchrun``; yield this rank's device.

    Does nothing without torchrun's environment or when a group is already open (the caller's).

    Args:
        device: the device the command was given (``cpu``, ``cuda``, ``cuda:1``...).

    Yields:
        ``device``, except that a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun.
    """
    if not _launched_by_torchrun() or _dist.initialized():
        yield device
        return
    kind = torch.device(device).type
    if kind == "cuda" and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def check_divisible(batch_size: int, world: int) -> None:
    """Refuse a global batch that ``world`` ranks cannot split into equal slices.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world``; the message gives the nearest
            batch sizes that are.

    Example:
        >>> check_divisible(64, 4)
        >>> check_divisible(10, 4)
        Traceback (most recent call last):
        ...
        ValueError: batch size 10 cannot be split over 4 ranks (each rank trains on an equal slice of the global batch); use a multiple of 4, e.g. --batch-size 8 or 12, or another --nproc-per-node
    """  # noqa: E501
    if batch_size % world == 0:
        return
    below = max(world, batch_size // world * world)
    above = (batch_size // world + 1) * world
    choices = f"{below} or {above}" if below != above else f"{above}"
    raise ValueError(
        f"batch size {batch_size!r} cannot be split over {world} ranks (each rank trains on an "
        f"equal slice of the global batch); use a multiple of {world}, e.g. --batch-size "
        f"{choices}, or another --nproc-per-node"
    )


def local_slice(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``tensor``'s first dimension, one of ``world``.

    Example:
        >>> local_slice(torch.arange(6), 1, 3).tolist()
        [2, 3]
    """
    per_rank = tensor.shape[0] // world
    return tensor[rank * per_rank : (rank + 1) * per_rank]
