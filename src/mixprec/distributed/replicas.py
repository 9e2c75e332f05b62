"""Replica drift: do the ranks that should hold the same weights hold them, bit for bit?

Design note: data-parallel ranks keep replicas in sync only by doing the same thing; a rank with
its own stochastic-rounding seed, a skipped step the others took, or a write to one rank's
weights makes them drift apart silently. :func:`check_replicas` tells, cheaply:

* **The hash.** Each parameter's local tensor is read as its bit patterns (``view`` as an integer
  type of the same width) and reduced to two int64 numbers: the sum of the patterns and a sum
  weighted by an odd multiplier per position, both wrapping modulo 2^64. Integer sums are exact,
  so any one changed element changes the first number (a float sum could round a difference
  away), and the weighted one catches changes that cancel in the plain sum (two elements
  swapped). It is a check, not a proof: two different tensors can share both numbers, with a
  chance of about 2^-64 per changed tensor for changes not crafted to collide.
* **One collective.** Every rank ``all_gather``\\ s one small int64 tensor, two numbers per
  parameter, over ``group``; each rank then compares the rows itself, so every rank gets the
  same verdict and can raise together.
* **What is compared.** Only what should be replicated. A plain tensor (a DDP replica) is
  compared across all ranks of ``group``. A DTensor is compared over its mesh's ``Replicate``
  dims only: ranks whose mesh coordinates differ only in those dims must hold the same local
  tensor. A ``Shard`` (or ``Partial``) dim is not a replica: FSDP2's shards on a 1-D mesh are
  skipped (listed in :attr:`ReplicaCheck.skipped`), and an HSDP mesh ``(Replicate, Shard)`` is
  compared over its replicate dim, shard by shard.

Every rank of ``group`` must call it with the same model (the same parameters in the same
order), as for any collective. Outside a process group it is a no-op that reports no replicas.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec import _dist
from mixprec.optim.shards import local
from mixprec.scaling.agreement import is_dtensor

__all__ = [
    "ReplicaCheck",
    "ReplicaDifference",
    "check_replicas",
    "check_replicas_every_arg",
    "tensor_hash",
]

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64  # an odd 64-bit constant (the golden ratio's), as int64
_CHUNK = 1 << 20  # elements hashed at a time: 8 MiB of int64 weights and scratch
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def tensor_hash(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers that change when any bit of ``tensor`` changes (see the design note).

    Args:
        tensor: a plain tensor of any dtype whose element size is 1, 2, 4 or 8 bytes.

    Returns:
        A CPU tensor of shape ``(2,)`` and dtype int64: the wrapping sum of the bit patterns and
        their wrapping sum weighted by ``(2 * index + 1) * M`` for an odd constant ``M``.

    Example:
        >>> a = torch.tensor([1.0, 2.0, 3.0])
        >>> b = a.clone()
        >>> b.view(torch.int32)[1] ^= 1  # the lowest mantissa bit of one element
        >>> torch.equal(tensor_hash(a), tensor_hash(a.clone())), torch.equal(tensor_hash(a), tensor_hash(b))
        (True, False)
    """  # noqa: E501
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.int8)
    size = flat.element_size()
    if size not in _BITS:
        raise TypeError(
            f"tensor_hash reads bit patterns of 1-, 2-, 4- or 8-byte elements, got dtype "
            f"{tensor.dtype!r} ({size} bytes per element); cast a copy to a supported dtype "
            "first, e.g. tensor.double()"
        )
    patterns = flat.view(_BITS[size])
    weights = _weights(patterns.device)
    plain = weighted = 0  # Python ints, reduced modulo 2**64 at the end
    for start in range(0, patterns.numel(), _CHUNK):  # bounded scratch for huge tensors
        bits = patterns[start : start + _CHUNK]
        chunk_sum = int(bits.sum(dtype=torch.int64))
        # sum_i b_i (2 (start + i) + 1) M = sum_i b_i (2 i + 1) M + 2 start M sum_i b_i
        plain += chunk_sum
        weighted += (
            int((bits * weights[: bits.numel()]).sum()) + 2 * start * _MULTIPLIER * chunk_sum
        )
    return torch.tensor([_signed64(plain), _signed64(weighted)], dtype=torch.int64)


def _weights(device: torch.device) -> torch.Tensor:
    """``(2 i + 1) * M`` (wrapping int64) for ``i < _CHUNK``, made once per device."""
    if device not in _WEIGHTS:
        odd = torch.arange(1, 2 * _CHUNK, 2, dtype=torch.int64, device=device)
        _WEIGHTS[device] = odd.mul_(_MULTIPLIER)
    return _WEIGHTS[device]


def _signed64(value: int) -> int:
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


@dataclass(frozen=True)
class ReplicaDifference:
    """A parameter whose replicas differ.

    Attributes:
        name: the parameter's name in the model (without DDP's ``module.`` prefix).
        ranks: the ranks that should hold the same tensor, grouped by the value they hold
            (global ranks; e.g. ``((0,), (1,))``: rank 0 and rank 1 hold different values).
    """

    name: str
    ranks: tuple[tuple[int, ...], ...]

    def __str__(self) -> str:
        return f"{self.name!r} (ranks {' vs '.join(str(list(r)) for r in self.ranks)})"


@dataclass(frozen=True)
class ReplicaCheck:
    """What :func:`check_replicas` found; true when every replica agrees.

    Attributes:
        world: the ranks of the group compared over (1: no process group, nothing compared).
        compared: parameters that have replicas, compared.
        skipped: parameters with no replica to compare with (sharded on every mesh dim).
        differences: the compared parameters whose replicas differ.
    """

    world: int
    compared: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    differences: tuple[ReplicaDifference, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every compared parameter is identical on its replicas."""
        return not self.differences

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.world == 1:
            return "no replicas: not under a process group (nothing to compare)"
        head = (
            f"{len(self.compared)} parameter(s) compared over {self.world} ranks, "
            f"{len(self.skipped)} sharded ones skipped"
        )
        if self.ok:
            return f"{head}: all replicas identical"
        return f"{head}: replicas differ in " + ", ".join(map(str, self.differences))

    def raise_if_differ(self) -> None:
        """Raise when a replica differs.

        Raises:
            RuntimeError: naming each differing parameter and how the ranks split.
        """
        if self.ok:
            return
        shown = ", ".join(map(str, self.differences[:5]))
        more = f" and {len(self.differences) - 5} more" if len(self.differences) > 5 else ""
        raise RuntimeError(
            f"replicas have drifted apart: {len(self.differences)} of {len(self.compared)} "
            f"replicated parameter(s) differ across ranks: {shown}{more}. Ranks that should hold "
            "the same weights do not; look for a per-rank seed (give every rank the same "
            "MixedPrecision seed for stochastic rounding), a step one rank skipped or took "
            "alone, or a write to one rank's weights; restore the replicas from rank 0 (e.g. "
            "reload the last checkpoint) before training on"
        )


def _named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return inner.named_parameters()


def _replica_classes(param: torch.Tensor, ranks: list[int]) -> list[list[int]] | None:
    """Which of ``ranks`` (the group's global ranks) must hold the same local tensor of
    ``param``: lists of two or more ranks, or None when no rank has a replica."""
    if not is_dtensor(param):
        return [ranks] if len(ranks) > 1 else None
    from torch.distributed.tensor import Replicate

    mesh = param.device_mesh  # type: ignore[attr-defined]
    replicate = [isinstance(p, Replicate) for p in param.placements]  # type: ignore[attr-defined]
    layout = mesh.mesh
    members = set(ranks)
    classes: dict[tuple[int, ...], list[int]] = {}
    for coord in itertools.product(*(range(n) for n in layout.shape)):
        rank = int(layout[coord])
        if rank in members:
            key = tuple(c for c, rep in zip(coord, replicate, strict=True) if not rep)
            classes.setdefault(key, []).append(rank)
    found = [sorted(c) for c in classes.values() if len(c) > 1]
    return found or None


def check_replicas(model: nn.Module, group: Any = None) -> ReplicaCheck:
    """Compare every replicated parameter of ``model`` across the ranks, bit for bit.

    A collective over ``group``: every rank calls it with the same model. Plain tensors are
    compared across all ranks of ``group``; DTensors over their ``Replicate`` mesh dims only
    (FSDP2's shards are skipped). See the module's design note.

    Args:
        model: the model (plain, DDP-wrapped or sharded by ``fully_shard``).
        group: the process group of the replicas (None: the world).

    Returns:
        A :class:`ReplicaCheck`, the same on every rank; without a process group one that
        compared nothing (``world == 1``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the ranks' models have different parameters (counts, names or shapes;
            every rank raises, with the difference).

    Example:
        >>> check_replicas(nn.Linear(2, 2))  # no process group: nothing to compare
        ReplicaCheck(world=1, compared=(), skipped=(), differences=())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"check_replicas expects an nn.Module, got {type(model).__name__} {model!r}"
        )
    if not _dist.initialized():
        return ReplicaCheck(world=1)
    world = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    named = list(_named_parameters(model))
    _check_same_parameters(named, world, group)
    if not named:
        return ReplicaCheck(world=world)
    device = named[0][1].device
    mine = torch.stack([tensor_hash(local(p)) for _, p in named]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()  # (group rank, parameter, 2)
    index = {rank: i for i, rank in enumerate(ranks)}
    compared, skipped, differences = [], [], []
    for j, (name, param) in enumerate(named):
        classes = _replica_classes(param, ranks)
        if classes is None:
            skipped.append(name)
            continue
        compared.append(name)
        for members in classes:
            by_value: dict[tuple[int, ...], list[int]] = {}
            for rank in members:
                by_value.setdefault(tuple(table[index[rank], j].tolist()), []).append(rank)
            if len(by_value) > 1:
                split = tuple(sorted(tuple(r) for r in by_value.values()))
                differences.append(ReplicaDifference(name, split))
    return ReplicaCheck(world, tuple(compared), tuple(skipped), tuple(differences))


def _check_same_parameters(named: list[tuple[str, Any]], world: int, group: Any) -> None:
    """Refuse ranks whose models differ in parameter names or (global) shapes before the hashes
    are gathered: an ``all_gather`` of tensors of different sizes aborts the process in gloo."""
    mine = [(name, tuple(param.shape)) for name, param in named]  # global shapes
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    if all(other == everyone[0] for other in everyone):
        return
    counts = [len(other) for other in everyone]
    first = set(everyone[0])
    notes = []
    for rank, other in enumerate(everyone[1:], start=1):
        only_first = [name for name, _ in everyone[0] if (name, _) not in set(other)]
        only_here = [name for name, shape in other if (name, shape) not in first]
        if only_first or only_here:
            notes.append(
                f"group rank {rank} lacks {only_first[:3]!r} and has {only_here[:3]!r} that "
                "group rank 0 does not (or with other shapes)"
            )
    raise ValueError(
        f"the ranks' models differ: parameter counts {counts!r} (in group rank order); "
        f"{'; '.join(notes[:3]) or 'the same parameters in another order'}. check_replicas "
        "compares replicas of one model: call it with the same model on every rank"
    )


def check_replicas_every_arg(every: object) -> int | None:
    """Validate a ``check_replicas_every`` setting: None (never) or an int >= 1 (steps).

    Raises:
        TypeError: not None and not an int.
        ValueError: an int below 1.

    Example:
        >>> check_replicas_every_arg(100)
        100
    """
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int):
        raise TypeError(
            f"check_replicas_every must be an int (steps between checks) or None, got "
            f"{type(every).__name__} {every!r}; e.g. check_replicas_every=100"
        )
    if every < 1:
        raise ValueError(
            f"check_replicas_every must be >= 1 (steps between checks) or None (never), got "
            f"{every!r}; e.g. check_replicas_every=100"
        )
    return every
