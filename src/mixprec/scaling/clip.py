"""Global-norm gradient clipping with the unscale folded in.

The usual recipe (``scaler.unscale_(opt)`` then ``torch.nn.utils.clip_grad_norm_``) reads the
gradients three times and writes them twice: unscale, norm, clip. Here the norm is taken on the
still-scaled gradients (dividing a norm by the scale gives the norm of the unscaled gradients),
and one multiplication by ``clip_coef / scale`` unscales, clips and checks for infs/NaNs at
once: two reads, one write. With a power-of-two scale (the default rule only produces those)
the result is bit-identical to the usual recipe.

Optimizers that unscale inside their own step (``fused=True``, mixprec's master-weight wrapper)
need no write pass at all: the clip coefficient is folded into the scale they divide by
(:func:`clip_coefficient` then ``grad_scale = scale / clip_coef``), so clipping costs one read.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from mixprec import _dist
from mixprec._dist import is_dtensor
from mixprec.scaling._grads import GradGroups, unscale_and_check_

__all__ = ["clip_coefficient", "clip_grad_norm_", "global_norm", "unscale_and_clip_"]


def global_norm(grads: GradGroups, norm_type: float, device: torch.device) -> torch.Tensor:
    """The norm of all gradients viewed as one vector, as ``clip_grad_norm_`` computes it.

    DTensor gradients (FSDP2, tensor parallelism) count with their global values: the norm of
    each local shard is taken on this rank, the partial norms are reduced over the mesh
    dimensions the tensor is sharded on (``sum |x|^p``, or ``max`` for the max-norm) and the
    result is the same plain tensor on every rank, equal to the norm one process holding the
    whole tensors computes. That reduction is a collective: all ranks of the mesh call it.

    Args:
        grads: Gradients grouped by (device, dtype).
        norm_type: The p of the p-norm; ``math.inf`` for the max-norm.
        device: Where the result lives.

    Returns:
        A plain 0-dim float32 tensor (0 when there are no gradients).
    """
    norms: list[torch.Tensor] = []
    sharded: list[torch.Tensor] = []
    for (_, dtype), tensors in grads.items():
        local = [t for t in tensors if not is_dtensor(t)]
        sharded.extend(t for t in tensors if is_dtensor(t))
        if not local:
            continue
        if dtype == torch.float32:
            norms.extend(torch._foreach_norm(local, norm_type))
        else:  # accumulate and return in fp32: an fp16 norm of scaled gradients overflows
            norms.extend(torch._foreach_norm(local, norm_type, dtype=torch.float32))
    if sharded:
        norms.append(_sharded_norm(sharded, norm_type))
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def _sharded_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The global p-norm of DTensor gradients, from their local shards and one reduction each
    (mesh, sharded dimensions)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    maximum = math.isinf(norm_type)
    partials: dict[tuple[int, tuple[int, ...]], tuple[Any, torch.Tensor]] = {}
    for tensor in grads:
        grad = cast(DTensor, tensor)
        if any(p.is_partial() for p in grad.placements):  # pending sums: finish them first
            grad = grad.redistribute(
                placements=[Replicate() if p.is_partial() else p for p in grad.placements]
            )
        mesh = grad.device_mesh
        dims = tuple(i for i, p in enumerate(grad.placements) if p.is_shard())
        local = torch.linalg.vector_norm(grad.to_local(), norm_type, dtype=torch.float32)
        part = local if maximum else local.pow(norm_type)
        key = (id(mesh), dims)
        if key in partials:
            previous = partials[key][1]
            part = torch.maximum(previous, part) if maximum else previous + part
        partials[key] = (mesh, part)
    op = dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for (_, dims), (mesh, part) in partials.items():
        for dim in dims:
            dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        total = torch.maximum(total, part) if maximum else total + part
    return total if maximum else total.pow(1.0 / norm_type)


def clip_grad_norm_(tensors: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``tensors`` to the total 2-norm ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=True)`` does (the same bits),
    DTensor gradients included (their local shards are scaled, the norm is global).

    Returns:
        The total norm before clipping (a plain 0-dim float32 tensor, the same on every rank).

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm_([w], 1.0), w.grad
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    groups: GradGroups = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norm = global_norm(groups, 2.0, grads[0].device)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([_dist.local(g) for g in grads], coefficient)
    return norm


def clip_coefficient(
    grads: GradGroups,
    inv_scale: torch.Tensor,
    max_norm: float,
    norm_type: float,
    found_inf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The true norm of scaled gradients and the factor that clips them; reads, never writes.

    A non-finite norm (from non-finite gradients, which always make it so, or from squares too
    large for float32) sets ``found_inf`` to 1: the step is then skipped and a dynamic scale
    backs off.

    Args:
        grads: Scaled gradients grouped by (device, dtype).
        inv_scale: A 0-dim float32 tensor holding ``1 / scale``.
        max_norm: The largest allowed norm of the unscaled gradients.
        norm_type: The p of the p-norm; ``math.inf`` for the max-norm.
        found_inf: A 0-dim float32 flag on ``inv_scale``'s device, updated in place.

    Returns:
        ``(norm, clip_coef)``: the norm of the unscaled gradients and
        ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` computes it.
    """
    norm = global_norm(grads, norm_type, inv_scale.device) * inv_scale
    clip_coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # Flags stay 0 or 1: fused optimizers compare found_inf with 1 and subtract it from steps.
    found_inf.copy_(torch.maximum(found_inf, torch.logical_not(torch.isfinite(norm)).float()))
    return norm, clip_coef


def unscale_and_clip_(
    grads: GradGroups,
    inv_scale: torch.Tensor,
    max_norm: float,
    norm_type: float,
    found_inf: torch.Tensor,
) -> torch.Tensor:
    """Unscale gradients and clip them to ``max_norm`` in one write pass; flag infs/NaNs.

    ``found_inf`` is set by a non-finite gradient value or norm (see :func:`clip_coefficient`).

    Args:
        grads: Scaled gradients grouped by (device, dtype); modified in place.
        inv_scale: A 0-dim float32 tensor holding ``1 / scale``.
        max_norm: The largest allowed norm of the unscaled gradients.
        norm_type: The p of the p-norm; ``math.inf`` for the max-norm.
        found_inf: A 0-dim float32 flag on ``inv_scale``'s device, updated in place.

    Returns:
        The norm of the unscaled gradients before clipping (a 0-dim float32 tensor).

    Example:
        >>> g = torch.tensor([30.0, 40.0])  # scaled by 10: the true norm is 5
        >>> found = torch.zeros(())
        >>> unscale_and_clip_({(g.device, g.dtype): [g]}, torch.tensor(0.1), 1.0, 2.0, found)
        tensor(5.)
        >>> g
        tensor([0.6000, 0.8000])
    """
    norm, clip_coef = clip_coefficient(grads, inv_scale, max_norm, norm_type, found_inf)
    unscale_and_check_(grads, inv_scale * clip_coef, found_inf)
    return norm


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}.")
    return float(value)


def check_clip_args(max_norm: object, norm_type: object) -> tuple[float, float]:
    """Validate clip arguments; return them as floats.

    Raises:
        TypeError: If either is not a number.
        ValueError: If ``max_norm`` is not finite and positive or ``norm_type`` is not >= 1 or
            ``inf``.
    """
    max_norm = _number("max_norm", max_norm)
    norm_type = _number("norm_type", norm_type)
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite float > 0, e.g. 1.0; got {max_norm!r}.")
    if not (norm_type >= 1 or norm_type == math.inf):
        raise ValueError(
            f"norm_type must be a float >= 1 (2.0 for the Euclidean norm) or math.inf, "
            f"got {norm_type!r}."
        )
    return max_norm, norm_type
