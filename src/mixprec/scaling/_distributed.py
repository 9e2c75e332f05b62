"""The scaler's one distributed hook: agree on found-inf across processes.

Every rank must skip (or take) a step together, otherwise replicas drift apart. Under DDP the
gradients are already identical after the all-reduce and ranks agree by construction; with
sharded gradients (FSDP, ZeRO), tensor or pipeline parallelism each rank sees only part of the
gradients and must share its verdict. The verdict is reduced with ``all_reduce(MAX)`` right after
it is computed for each optimizer, so every value later used to skip a step or update the scale
is the same on all ranks. All ranks must therefore call ``unscale_``/``step`` for the same
optimizers in the same order, as with any collective.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

ProcessGroupArg = Literal["world"] | Any | None
"""``None`` (no agreement, torch's behaviour), ``"world"`` or a ``ProcessGroup``."""


def check_process_group(group: object) -> None:
    """Validate the ``process_group`` argument of the scaler.

    Raises:
        ValueError: For a string other than ``"world"``.
        TypeError: For anything that is not None, ``"world"`` or a ``ProcessGroup``.
    """
    if group is None:
        return
    if isinstance(group, str):
        if group != "world":
            raise ValueError(
                f"process_group must be None, 'world' or a torch.distributed.ProcessGroup, "
                f"got {group!r}."
            )
        return
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return
    raise TypeError(
        f"process_group must be None, 'world' or a torch.distributed.ProcessGroup, got "
        f"{group!r} of type {type(group).__name__}."
    )


def agree_found_inf_(found_inf: torch.Tensor, group: ProcessGroupArg) -> torch.Tensor:
    """Make ``found_inf`` the maximum over the ranks of ``group``, in place.

    With ``group=None``, or with ``"world"`` while ``torch.distributed`` is not initialised (a
    single process), this does nothing, so the same script runs under ``python`` and
    ``torchrun``.

    Args:
        found_inf: This rank's 0-dim flag (non-zero: non-finite gradients were seen).
        group: None, ``"world"`` or a ``ProcessGroup``.

    Returns:
        ``found_inf``.
    """
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return found_inf
    dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=None if group == "world" else group)
    return found_inf
