"""The step's fp32 scratch on CPUs: flat buffers kept between steps, one per purpose.

Design note: the wrappers widen 16-bit weights and gradients into fp32 tensors that live only
during ``step``. On CPUs a fresh multi-MiB tensor costs a page fault per 4 KiB at every step
(glibc hands freed ``mmap`` chunks straight back to the kernel), which can cost more than the
arithmetic; a chunk-sized buffer kept between steps costs none and is still in cache when the
inner optimizer reads it. It is bounded by the chunk size whatever the model's size, and
:func:`mixprec.optim.memory_report` shows it apart as the fixed *workspace*.
"""

from __future__ import annotations

import torch

__all__ = ["Scratch"]


class Scratch:
    """Reusable flat buffers for a step's scratch tensors, one per purpose, dtype and device.

    On CPUs a fresh multi-MiB tensor costs a page fault per 4 KiB at every step (glibc hands
    freed ``mmap`` chunks straight back to the kernel), which can cost more than the arithmetic.
    A buffer of at most ``limit`` elements is therefore kept and handed out again (as a view of
    its first elements); larger requests, and every request on other devices (whose caching
    allocators already reuse memory), get a fresh tensor freed after use. So what is kept is
    bounded by ``limit`` per purpose, whatever the model's size.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(
        self, name: str, numel: int, dtype: torch.dtype, device: torch.device, limit: int | None
    ) -> torch.Tensor:
        """A flat tensor of ``numel`` elements, uninitialised; valid until the next ``take``
        of the same ``name``."""
        if device.type != "cpu" or limit is None or numel > limit:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    def like(self, name: str, tensors: list[torch.Tensor], limit: int | None) -> list[torch.Tensor]:
        """Uninitialised contiguous fp32 tensors shaped like ``tensors``, carved from one buffer."""
        if not tensors:
            return []
        device = tensors[0].device
        if any(t.device != device for t in tensors):
            return [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
        sizes = [t.numel() for t in tensors]
        flat = self.take(name, sum(sizes), torch.float32, device, limit)
        return [piece.view(t.shape) for piece, t in zip(flat.split(sizes), tensors, strict=True)]

    def tensors(self) -> list[torch.Tensor]:
        """The buffers kept (for memory accounting)."""
        return list(self._buffers.values())
