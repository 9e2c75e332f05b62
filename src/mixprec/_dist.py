"""Leaf helpers for code that may run under ``torch.distributed``: is a process group up, is a
tensor a DTensor, its local shard, and where that shard starts in the global order.

Design note: every layer needs these few questions answered (the scaler agrees on found-inf, the
wrappers step local shards, checkpoints and metrics write from one rank), so they live in one
leaf module that imports nothing of mixprec, instead of being written out in each. Nothing here
communicates. ``torch.distributed.tensor`` is never imported by these checks: no tensor is a
DTensor before that module is loaded, and loading it costs seconds.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["flat_offset", "initialized", "is_dtensor", "local", "local_numel", "rank", "world_size"]


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up (False where distributed is absent)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The default group's size (1 without one)."""
    return dist.get_world_size() if initialized() else 1


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (False without distributed)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: writing into it writes the DTensor), else
    ``tensor`` itself."""
    if is_dtensor(tensor):
        return tensor.to_local()  # type: ignore[attr-defined,no-any-return]
    return tensor


def local_numel(tensor: torch.Tensor) -> int:
    """How many elements this rank holds of ``tensor``."""
    return local(tensor).numel()


def flat_offset(tensor: torch.Tensor) -> int | None:
    """Where this rank's shard of ``tensor`` starts in the global tensor's row-major order.

    0 for a plain tensor. For a DTensor, the flat global index of its first local element when
    the shard is one contiguous run of the global order (every ``Shard(0)`` layout, FSDP2's, and
    replicated ones); None when it is not (a ``Shard(1)`` of a matrix, for example).

    Example:
        >>> flat_offset(torch.zeros(3, 4))
        0
    """
    if not is_dtensor(tensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    spec: Any = tensor
    shape = tuple(tensor.shape)
    local_shape, offset = compute_local_shape_and_global_offset(
        shape, spec.device_mesh, spec.placements
    )
    if math.prod(local_shape) == 0:
        return 0
    # Contiguous: the dims before the first partial one hold one index, the ones after are whole.
    partial = [d for d, (n, full) in enumerate(zip(local_shape, shape, strict=True)) if n != full]
    if partial:
        first = partial[0]
        if any(local_shape[d] != 1 for d in range(first)) or any(
            local_shape[d] != shape[d] for d in range(first + 1, len(shape))
        ):
            return None
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    return sum(o * s for o, s in zip(offset, strides, strict=True))
