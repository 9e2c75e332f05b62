"""How many bytes each parameter costs: parameters, gradients, master copy, optimizer state.

The figures are read from the tensors that exist when :func:`memory_report` is called (each counted
once, ``numel * element_size``), not from a formula, so they show what a run really holds. Call it
after a step to include the optimizer state, which torch optimizers create lazily. Activations are
not model state and are not counted. Neither is the wrappers' *workspace*: the fp32 scratch of one
chunk of the step that they keep between steps on CPUs (at most ``chunk_numel`` elements per
buffer, whatever the model's size), the part a GPU caching allocator keeps for a torch optimizer
without being counted either. It is reported on its own, outside ``total``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.optim._wrapper import WrappedOptimizer

__all__ = ["MemoryReport", "memory_report"]

PARTS = ("params", "grads", "master", "optimizer_state", "compensation")


@dataclass(frozen=True)
class MemoryReport:
    """Model-state memory in bytes, split by part; ``per_param`` divides by the parameter count.

    Attributes:
        num_params: number of parameter elements of the model.
        params: bytes of the model's parameters.
        grads: bytes of gradients (the model's, and fp32 master gradients if any are alive).
        master: bytes of fp32 master copies kept by :class:`MasterWeightOptimizer`.
        optimizer_state: bytes of the optimizer's state tensors (Adam moments, step counters...).
        compensation: bytes of Kahan compensation buffers.
        workspace: bytes of scratch buffers a wrapper keeps between steps; a fixed amount, not
            model state, so not part of ``total`` or ``per_param``.
    """

    num_params: int
    params: int
    grads: int
    master: int
    optimizer_state: int
    compensation: int
    workspace: int = 0

    @property
    def total(self) -> int:
        """All model-state bytes."""
        return self.params + self.grads + self.master + self.optimizer_state + self.compensation

    @property
    def per_param(self) -> dict[str, float]:
        """Bytes per parameter of each part and of the ``total``."""
        n = max(self.num_params, 1)
        figures = {part: getattr(self, part) / n for part in PARTS}
        figures["total"] = self.total / n
        return figures

    def __str__(self) -> str:
        per_param = self.per_param
        lines = [
            f"model state for {self.num_params:,} parameters",
            f"{'':16}{'bytes':>16}  B/param",
        ]
        for part in (*PARTS, "total"):
            value = self.total if part == "total" else getattr(self, part)
            lines.append(f"{part:16}{value:>16,}  {per_param[part]:7.2f}")
        lines.append(f"{'workspace':16}{self.workspace:>16,}  (fixed, not in total)")
        return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Measure the model-state memory of ``model`` and ``optimizer`` in bytes per parameter.

    Args:
        model: the module whose parameters (and their ``.grad``) are counted.
        optimizer: a torch optimizer or one of the wrappers of :mod:`mixprec.optim`; its state
            tensors (and masters, compensation buffers) are counted. None counts the model only.

    Returns:
        A :class:`MemoryReport`; ``str()`` of it is a small table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` not a torch optimizer.

    Example:
        >>> model = torch.nn.Linear(1000, 1000)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> model(torch.randn(2, 1000)).sum().backward()
        >>> opt.step()
        >>> round(memory_report(model, opt).per_param["total"], 2)
        16.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_report expects an nn.Module, got {type(model).__name__} {model!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"memory_report expects a torch.optim.Optimizer (or None), got "
            f"{type(optimizer).__name__} {optimizer!r}"
        )
    params: list[torch.Tensor] = list(model.parameters())
    parts: dict[str, list[torch.Tensor]] = {
        "params": params,
        "grads": [p.grad for p in params if p.grad is not None],
    }
    if isinstance(optimizer, WrappedOptimizer):
        for part, tensors in optimizer._tensors_by_part().items():
            parts[part] = parts.get(part, []) + tensors
    elif optimizer is not None:
        parts["optimizer_state"] = [
            t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        ]
    seen: set[int] = set()
    sizes = {part: _bytes(parts.get(part, []), seen) for part in PARTS}
    workspace = _bytes(parts.get("workspace", []), seen)
    return MemoryReport(num_params=sum(p.numel() for p in params), workspace=workspace, **sizes)


def _bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the tensors not counted yet (by identity), ``numel * element_size`` each."""
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
