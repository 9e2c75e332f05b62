"""How many bytes each parameter costs: parameters, gradients, master copy, optimizer state.

The figures are read from the tensors that exist when :func:`memory_report` is called (each counted
once, ``numel * element_size``), not from a formula, so they show what a run really holds. Call it
after a step to include the optimizer state, which torch optimizers create lazily. Activations are
not model state and are not counted. Neither is the wrappers' *workspace*: the fp32 scratch of one
chunk of the step that they keep between steps on CPUs (at most ``chunk_numel`` elements per
buffer, whatever the model's size), the part a GPU caching allocator keeps for a torch optimizer
without being counted either. It is reported on its own, outside ``total``.

Design note, per rank and global: under FSDP2 (or any DTensor parameters) each rank holds only
its shards, so the main figures count a DTensor by its local shard (``to_local()``): the bytes
*this rank* holds, what :func:`mixprec.distributed.memory_plan` predicts per rank. The global
figures beside them (:attr:`MemoryReport.global_`) count every tensor by its global shape, the
state of one unsharded copy of the model — what one process would hold, and the sum of the
shards over the ranks. They are computed from the shapes, without a collective, so a report can
be made on one rank alone (``if rank == 0: print(memory_report(model, opt))``). A plain tensor
(a DDP replica, a step counter) is the same in both; so is a tensor a wrapper keeps for a local
shard without being a DTensor itself. ``num_params`` is the global count in both, so
``per_param`` gives bytes per parameter per rank (16/N for bf16-mixed AdamW over N FSDP2 ranks).

The optimizer state is also split by what its tensors are (:attr:`MemoryReport.state_parts`):
per-element states by their stored format (``fp32``, ``bf16``, ``fp16``, ``int8 codes``,
``fp8 codes``), the ``block scales`` of the 8-bit formats, the ``draw counters`` of stochastic
state rounding and the ``step counters``, so a policy's ``state=int8`` shows as 1 byte per
moment element plus 4 per block of 256.

The gradient reduction a data-parallel step makes is shown too: each rank hands the backend one
gradient per trainable parameter element, all-reduced (DDP) or reduce-scattered (FSDP2) in the
policy's reduce format, so the bytes per step and rank are that count times the format's size
(:attr:`MemoryReport.reduce_bytes_per_step`, for fp32, bf16 and fp16 side by side; DDP's reduce
hook counts the same figure as it runs, ``ReduceState.bytes_reduced``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mixprec.optim.quantized_states import ROUNDING_KEY, SCALE_SUFFIX
from mixprec.optim.shards import local
from mixprec.optim.wrapper import WrappedOptimizer

__all__ = ["MemoryReport", "memory_report"]

PARTS = ("params", "grads", "master", "optimizer_state", "compensation")
REDUCE_FORMATS = {"fp32": 4, "bf16": 2, "fp16": 2}
"""The reduce formats a report shows the gradient traffic of, with their bytes per element."""


@dataclass(frozen=True)
class MemoryReport:
    """Model-state memory in bytes, split by part; ``per_param`` divides by the parameter count.

    The parts are the bytes this rank holds (DTensors by their local shards); :attr:`global_`
    holds the same parts counted by global shapes.

    Attributes:
        num_params: number of parameter elements of the model (global: the whole model).
        params: bytes of the model's parameters.
        grads: bytes of gradients (the model's, and fp32 master gradients if any are alive).
        master: bytes of fp32 master copies kept by :class:`MasterWeightOptimizer`.
        optimizer_state: bytes of the optimizer's state tensors (Adam moments, step counters...).
        compensation: bytes of Kahan compensation buffers.
        workspace: bytes of scratch buffers a wrapper keeps between steps; a fixed amount, not
            model state, so not part of ``total`` or ``per_param``.
        local_params: parameter elements this rank holds (``num_params`` without DTensors).
        grad_elements: elements of the trainable parameters (global): the gradient elements a
            data-parallel step reduces.
        global_: the same figures counted by global shapes (one unsharded copy); None in the
            global report itself.
        state_parts: ``optimizer_state`` bytes by kind, in order of size: per-element states
            by stored format, block scales, draw counters, step counters.
    """

    num_params: int
    params: int
    grads: int
    master: int
    optimizer_state: int
    compensation: int
    workspace: int = 0
    local_params: int | None = None
    grad_elements: int = 0
    global_: MemoryReport | None = None
    state_parts: tuple[tuple[str, int], ...] = field(default=())

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

    @property
    def sharded(self) -> bool:
        """Whether this rank holds less than the global figures (DTensor shards)."""
        return self.global_ is not None and self.global_.total != self.total

    @property
    def reduce_bytes_per_step(self) -> dict[str, int]:
        """Bytes each rank hands to the gradient reduction per step, by reduce format."""
        return {name: size * self.grad_elements for name, size in REDUCE_FORMATS.items()}

    def __str__(self) -> str:
        per_param = self.per_param
        glob = self.global_ if self.sharded else None
        lines = [
            f"model state for {self.num_params:,} parameters"
            + (f" ({self.local_params:,} held by this rank)" if glob is not None else ""),
            f"{'':16}{'bytes/rank' if glob else 'bytes':>16}  B/param"
            + (f"{'global bytes':>16}" if glob else ""),
        ]
        for part in (*PARTS, "total"):
            value = self.total if part == "total" else getattr(self, part)
            line = f"{part:16}{value:>16,}  {per_param[part]:7.2f}"
            if glob is not None:
                line += f"{glob.total if part == 'total' else getattr(glob, part):>16,}"
            lines.append(line)
        if self.state_parts:
            kinds = ", ".join(f"{kind} {size:,}" for kind, size in self.state_parts)
            lines.append(f"optimizer_state by kind, bytes: {kinds}")
        lines.append(f"{'workspace':16}{self.workspace:>16,}  (fixed, not in total)")
        if self.grad_elements:
            moved = ", ".join(f"{k} {v:,}" for k, v in self.reduce_bytes_per_step.items())
            lines.append(f"gradient reduction per step and rank, bytes by reduce format: {moved}")
        return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Measure the model-state memory of ``model`` and ``optimizer`` in bytes per parameter.

    Per rank: a DTensor (FSDP2) counts by the shard this rank holds; ``report.global_`` counts
    global shapes. Needs no collective (see the module's design note).

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
        >>> report = memory_report(model, opt)
        >>> round(report.per_param["total"], 2), report.global_.total == report.total  # no shards
        (16.0, True)
        >>> report.reduce_bytes_per_step["bf16"]
        2002000
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
        for part, tensors in optimizer.memory_parts().items():
            parts[part] = parts.get(part, []) + tensors
    elif optimizer is not None:
        parts["optimizer_state"] = [
            t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        ]
    num_params = sum(p.numel() for p in params)
    grad_elements = sum(p.numel() for p in params if p.requires_grad)
    reports: list[MemoryReport] = []
    for scope in ("global", "local"):
        seen: set[int] = set()
        size = {part: _bytes(parts.get(part, []), seen, scope) for part in PARTS}
        reports.append(
            MemoryReport(
                num_params,
                params=size["params"],
                grads=size["grads"],
                master=size["master"],
                optimizer_state=size["optimizer_state"],
                compensation=size["compensation"],
                workspace=_bytes(parts.get("workspace", []), seen, scope),
                local_params=sum(local(p).numel() for p in params) if scope == "local" else None,
                grad_elements=grad_elements,
                global_=reports[0] if reports else None,
                state_parts=_state_parts(optimizer, scope),
            )
        )
    return reports[-1]


def _bytes(tensors: Iterable[torch.Tensor], seen: set[int], scope: str) -> int:
    """Bytes of the tensors not counted yet (by identity), ``numel * element_size`` each:
    DTensors by their local shard (``scope="local"``) or their global shape."""
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            counted = local(t) if scope == "local" else t
            total += counted.numel() * counted.element_size()
    return total


_STORED = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "int8 codes",
    torch.float8_e4m3fn: "fp8 codes",
}


def _state_parts(
    optimizer: torch.optim.Optimizer | None, scope: str
) -> tuple[tuple[str, int], ...]:
    """Bytes of the optimizer's state tensors by kind (see the module), largest first."""
    if optimizer is None:
        return ()
    inner = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for state in inner.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or id(value) in seen:
                continue
            seen.add(id(value))
            if str(key).endswith(SCALE_SUFFIX):
                kind = "block scales"
            elif key == ROUNDING_KEY:
                kind = "draw counters"
            elif key == "step":
                kind = "step counters"
            else:
                kind = _STORED.get(value.dtype, str(value.dtype).removeprefix("torch."))
            counted = local(value) if scope == "local" else value
            sizes[kind] = sizes.get(kind, 0) + counted.numel() * counted.element_size()
    return tuple(sorted(sizes.items(), key=lambda item: -item[1]))
