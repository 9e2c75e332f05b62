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

import math
from typing import Any

import torch
from torch import nn

from mixprec.scaling._distributed import is_dtensor

__all__ = [
    "empty_of_kind",
    "flat_offset",
    "is_dtensor",
    "local",
    "local_numel",
    "set_tensor",
    "wrap_like",
]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: writing into it writes the DTensor), else
    ``tensor`` itself."""
    if is_dtensor(tensor):
        return tensor.to_local()  # type: ignore[attr-defined,no-any-return]
    return tensor


def local_numel(tensor: torch.Tensor) -> int:
    """How many elements this rank holds of ``tensor``."""
    return local(tensor).numel()


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


def flat_offset(tensor: torch.Tensor) -> int | None:
    """Where this rank's shard of ``tensor`` starts in the global tensor's row-major order.

    0 for a plain tensor. For a DTensor, the flat global index of its first local element when
    the shard is one contiguous run of the global order (every ``Shard(0)`` layout, FSDP2's, and
    replicated ones); None when it is not (a ``Shard(1)`` of a matrix, for example).
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
