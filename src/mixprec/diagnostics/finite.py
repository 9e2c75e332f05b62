"""Finite checks on tensors and gradients: pure functions the tracer and the session call.

``nonfinite_grads`` is what a training session calls when a step is skipped: it names the
parameters whose gradients hold inf or NaN from the gradients already computed, with one host
sync per device in the common case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

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
    grads = [(n, _dense(p.grad)) for n, p in named if p.grad is not None]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, grad in grads:
        by_device.setdefault(grad.device, []).append((name, grad))
    suspects: set[str] = set()
    for items in by_device.values():
        sums = torch.stack([g.sum(dtype=torch.float32) for _, g in items])
        finite = torch.isfinite(sums).tolist()
        suspects.update(name for (name, _), ok in zip(items, finite, strict=True) if not ok)
    return [n for n, g in grads if n in suspects and not bool(torch.isfinite(g).all())]


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad.detach()
