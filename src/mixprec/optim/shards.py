"""The wrappers' view of DTensor parameters (FSDP2, tensor parallelism): their local shards.

Design note: a wrapper's copies (widen, unscale, round back) are elementwise, so on a DTensor they
are the same copies on each rank's local shard: no communication, and no sharding rule needed
(DTensor has none for ``aten._foreach_copy_``). The tensors the inner optimizer steps (fp32
masters, the fp32 scratch of the pure 16-bit wrappers) and their gradients are DTensors with the
parameter's mesh, placements and global shape, built on local buffers with
``DTensor.from_local``: the inner optimizer runs on DTensors as it does under plain FSDP2, its
state tensors are DTensors, and ``torch.distributed.checkpoint`` saves and re-shards them by
their global shapes. A global-norm clip inside the step reduces over the mesh, as torch's
``clip_grad_norm_`` does on DTensors.

Stochastic rounding draws its bits by element position (:mod:`mixprec.stochastic`); a
shard's elements are given their *global* positions (:func:`flat_offset`), so a sharded step
rounds every element with the bits of the one-process step, and replicas (the replicate
dimensions of a mesh) draw the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixprec._dist import flat_offset, is_dtensor, local, local_numel

__all__ = [
    "empty_of_kind",
    "flat_offset",
    "is_dtensor",
    "local",
    "local_numel",
    "set_tensor",
    "wrap_like",
]


def wrap_like(shard: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``shard`` (a local tensor shaped like ``ref``'s shard) as a DTensor laid out like ``ref``;
    ``shard`` itself when ``ref`` is a plain tensor."""
    if not is_dtensor(ref):
        return shard
    from torch.distributed.tensor import DTensor

    spec: Any = ref
    return DTensor.from_local(
        shard,
        spec.device_mesh,
        spec.placements,
        run_check=False,
        shape=ref.shape,
        stride=ref.stride(),
    )


def empty_of_kind(ref: torch.Tensor) -> torch.Tensor:
    """An empty fp32 tensor of ``ref``'s kind: (0,)-shaped, or a replicated (0,)-shaped DTensor
    on ``ref``'s mesh. Holds the place of a tensor that exists only inside ``step``."""
    empty = torch.empty((0,), device=ref.device)
    if is_dtensor(ref):
        from torch.distributed.tensor import DTensor, Replicate

        mesh: Any = ref.device_mesh  # type: ignore[attr-defined]
        empty = DTensor.from_local(empty, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return empty


def set_tensor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``param`` (keeping its identity, so optimizer state keyed on it stays) hold ``value``.

    A plain parameter takes ``value`` as its ``.data``; a DTensor parameter is swapped with a new
    one (``.data`` cannot change a DTensor's local shard or layout).
    """
    if is_dtensor(param) or is_dtensor(value):
        torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))
    else:
        param.data = value
