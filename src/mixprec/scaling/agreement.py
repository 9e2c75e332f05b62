"""The scaler's one distributed hook: agree on found-inf across processes, where it is needed.

Every rank must skip (or take) a step together, otherwise replicas drift apart. Each rank checks
the gradients it holds; when its verdict may differ from another rank's, the verdict is reduced
with ``all_reduce(MAX)`` right after it is computed for each optimizer, so every value later used
to skip a step or update the scale is the same on all ranks.

Which ranks must agree is the question, because an agreement is a collective: a rank that calls it
while the others do not waits forever. ``process_group="auto"`` (the default) therefore agrees
only over groups it can prove are stepping together, read from the optimizer's parameters:

* parameters registered with :func:`mark_replicas` (``mixprec.distributed.ddp`` and
  ``MixedPrecision.ddp`` register a DDP model's parameters with its process group): the ranks of
  that group hold replicas whose gradients are checked separately;
* DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism): each rank checks only its local
  shard, so the ranks of the parameter's device mesh agree (they all run the sharded step, which
  is itself a collective).

Anything else stays local, so a scaler used on one rank only (a side model, an evaluation helper)
never waits for the others. ``"world"`` or a ``ProcessGroup`` agree over that group always (all of
its ranks must then call ``unscale_``/``step`` for the same optimizers in the same order), and
None never agrees (torch's behaviour).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from mixprec._dist import initialized, is_dtensor

__all__ = [
    "agree_found_inf_",
    "agreement_groups",
    "check_process_group",
    "is_dtensor",
    "mark_replicas",
]

ProcessGroupArg = Literal["auto", "world"] | Any | None
"""``"auto"``, ``None`` (no agreement, torch's behaviour), ``"world"`` or a ``ProcessGroup``."""

_CHOICES = "'auto' (agree where the parameters are DDP replicas or DTensor shards), None, 'world'"
# Parameter -> the process group of the DDP model it is a replica in. Weak: a model that is
# dropped leaves nothing behind.
_REPLICAS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_process_group(group: object) -> None:
    """Validate the ``process_group`` argument of the scaler.

    Raises:
        ValueError: For a string other than ``"auto"`` or ``"world"``.
        TypeError: For anything that is not None, a valid string or a ``ProcessGroup``.
    """
    if group is None:
        return
    if isinstance(group, str):
        if group not in ("auto", "world"):
            raise ValueError(
                f"process_group must be {_CHOICES} or a torch.distributed.ProcessGroup, "
                f"got {group!r}."
            )
        return
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return
    raise TypeError(
        f"process_group must be {_CHOICES} or a torch.distributed.ProcessGroup, got "
        f"{group!r} of type {type(group).__name__}."
    )


def mark_replicas(params: Iterable[torch.Tensor], group: Any = None) -> None:
    """Register ``params`` as replicas kept in sync over ``group`` (None: the world).

    A scaler with ``process_group="auto"`` then agrees on found-inf over ``group`` for any
    optimizer holding one of them. Call it on every rank of ``group``, for the same model.

    Args:
        params: The parameters of a data-parallel (DDP) model.
        group: Its process group; None for the default (world) group.
    """
    for param in params:
        _REPLICAS[param] = group


def agreement_groups(params: Iterable[torch.Tensor], setting: ProcessGroupArg) -> list[Any]:
    """The process groups a found-inf verdict over ``params`` is reduced over (maybe none).

    Args:
        params: The optimizer's parameters.
        setting: The scaler's ``process_group``.

    Returns:
        A list of groups (None in it stands for the world group); empty when nothing is agreed:
        ``setting`` is None, ``torch.distributed`` is not initialised, or ``"auto"`` found
        neither registered replicas nor DTensor parameters.
    """
    if setting is None or not initialized():
        return []
    if setting == "world":
        return [None]
    if setting != "auto":
        return [setting]
    groups: dict[int, Any] = {}
    meshes: dict[int, Any] = {}
    for param in params:
        if param in _REPLICAS:
            group = _REPLICAS[param]
            groups.setdefault(id(group), group)
        mesh = getattr(param, "device_mesh", None) if is_dtensor(param) else None
        if mesh is not None and id(mesh) not in meshes:
            meshes[id(mesh)] = mesh
            for group in mesh.get_all_groups():
                groups.setdefault(id(group), group)
    return list(groups.values())


def agree_found_inf_(found_inf: torch.Tensor, groups: Iterable[Any]) -> torch.Tensor:
    """Make ``found_inf`` the maximum over the ranks of every group in ``groups``, in place.

    Args:
        found_inf: This rank's 0-dim flag (non-zero: non-finite gradients were seen).
        groups: From :func:`agreement_groups` (None in it: the world group).

    Returns:
        ``found_inf``.
    """
    for group in groups:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf
