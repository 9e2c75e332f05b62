"""Finite checks on tensors and gradients: pure functions the tracer and the session call.

``nonfinite_grads`` is what a training session calls when a step is skipped: it names the
parameters whose gradients hold inf or NaN from the gradients already computed, with one host
sync per device in the common case.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["floating_tensors", "in_range", "nonfinite_grads", "tensor_range"]


def tensor_range(tensors: Iterable[torch.Tensor]) -> tuple[float, bool, bool]:
    """Largest non-NaN magnitude among ``tensors``, and whether any holds inf, any NaN.

    Args:
        tensors: floating tensors (others are skipped).

    Returns:
        ``(absmax, has_inf, has_nan)``; absmax is 0.0 for no elements and inf if any is inf.

    Example:
        >>> tensor_range([torch.tensor([1.0, -3.0, float("nan")])])
        (3.0, False, True)
    """
    absmax, has_inf, has_nan = 0.0, False, False
    for t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        a = t.detach().abs()
        nan = torch.isnan(a)
        stats = torch.stack([torch.where(nan, 0, a).amax().float(), nan.any().float()]).tolist()
        absmax = max(absmax, stats[0])
        has_inf = has_inf or math.isinf(stats[0])
        has_nan = has_nan or bool(stats[1])
    return absmax, has_inf, has_nan


def in_range(tensors: list[torch.Tensor], limit: float) -> bool:
    """Whether every element is finite and at most ``limit`` in magnitude (one host sync).

    The tracer's hot path: one ``aminmax`` reduction per tensor, no temporary of its size.

    Example:
        >>> in_range([torch.tensor([1.0, -70000.0])], limit=65504.0)
        False
    """
    if not tensors:
        return True
    bounds = torch.stack([torch.stack(torch.aminmax(t.detach())).float() for t in tensors])
    low, high = bounds.min().item(), bounds.max().item()  # NaN propagates through min/max
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) <= limit


def floating_tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The non-empty floating tensors in nested lists, tuples and dicts, depth first."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.numel():
            yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from floating_tensors(item)
    elif isinstance(tree, Mapping):
        for item in tree.values():
            yield from floating_tensors(item)


def nonfinite_grads(
    params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[str]:
    """Names of the parameters whose ``.grad`` holds inf or NaN, from gradients already computed.

    Cheap enough for every skipped step: one fp32 sum per gradient and one host sync per device;
    the full element-wise check runs only for gradients whose sum is not finite (a sum can
    overflow although every element is finite).

    DTensor gradients (FSDP2) are checked on this rank's local shard, and the verdicts are
    reduced (``max``) over each parameter's device mesh, so every rank names the same
    parameters, also those whose inf sits in another rank's shard. With DTensor gradients this
    is a collective: call it on every rank of the mesh (as a session does on a skipped step,
    which the scaler's agreement makes the same step on all of them).

    Args:
        params: a model (its ``named_parameters()``), a mapping or an iterable of
            ``(name, parameter)`` pairs. Parameters without a gradient are skipped.

    Returns:
        The names, in the order given.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> model.weight.grad = torch.tensor([[1.0, float("inf")]])
        >>> model.bias.grad = torch.zeros(1)
        >>> nonfinite_grads(model)
        ['weight']
    """
    if isinstance(params, nn.Module):
        named: list[tuple[str, torch.Tensor]] = list(params.named_parameters())
    elif isinstance(params, Mapping):
        named = list(params.items())
    else:
        named = list(params)
    with_grads = [(n, p.grad) for n, p in named if p.grad is not None]
    meshes = {n: cast("DTensor", g).device_mesh for n, g in with_grads if _is_dtensor(g)}
    grads = [(n, _dense(g)) for n, g in with_grads]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, grad in grads:
        by_device.setdefault(grad.device, []).append((name, grad))
    suspects: set[str] = set()
    for items in by_device.values():
        sums = torch.stack([g.sum(dtype=torch.float32) for _, g in items])
        finite = torch.isfinite(sums).tolist()
        suspects.update(name for (name, _), ok in zip(items, finite, strict=True) if not ok)
    found = {n for n, g in grads if n in suspects and not bool(torch.isfinite(g).all())}
    if meshes:
        found = _agree_on_shards(found, meshes)
    return [n for n, _ in grads if n in found]


def _agree_on_shards(found: set[str], meshes: Mapping[str, Any]) -> set[str]:
    """Add the sharded parameters that another rank of their mesh found non-finite."""
    import torch.distributed as dist

    by_mesh: dict[int, tuple[Any, list[str]]] = {}
    for name, mesh in meshes.items():
        by_mesh.setdefault(id(mesh), (mesh, []))[1].append(name)
    for mesh, names in by_mesh.values():
        flags = torch.tensor([float(n in found) for n in names], device=mesh.device_type)
        for group in mesh.get_all_groups():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        found |= {n for n, flag in zip(names, flags.tolist(), strict=True) if flag}
    return found


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # No tensor is a DTensor before its module is imported, and importing it costs seconds.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(grad):
        grad = cast("DTensor", grad).to_local()
    return grad.coalesce().values() if grad.is_sparse else grad.detach()
