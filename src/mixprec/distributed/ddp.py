"""DDP with the policy's ``reduce`` format on the wire.

Design note: DDP all-reduces gradient buckets in the dtype the gradients have, whatever the
policy says. A communication hook is torch's own way to change that (the pattern of
``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook``): each bucket is
divided by the world size in its own precision, cast to the reduce format, all-reduced (summed
by the backend in that format) and cast back into the bucket, which DDP then writes into the
parameters' gradients, where micro-batches accumulate (fp32 for fp32 parameters). The division
comes first so a sum of fp16 buckets cannot overflow where the mean would not. A reduce format
wider than the gradients (``params=bf16,reduce=fp32``) is honoured the same way: the bf16 bucket
is widened, reduced in fp32, and rounded once on the way back. A reduce format equal to the
gradients' dtype moves the bucket as it is.

The hook also counts the bytes it hands to the backend (:attr:`ReduceState.bytes_reduced`), the
figure a benchmark or a memory report shows per reduce format.

Order: wrap with DDP *after* the parameters have their final dtype (``MixedPrecision.prepare``
casts them): recasting ``param.data`` of a DDP model detaches DDP's gradient hooks, after which
the ranks no longer all-reduce. :func:`mixprec.distributed.check_prepare_order` refuses that order.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec import _dist
from mixprec.formats import Format
from mixprec.policy import Policy
from mixprec.scaling.agreement import is_dtensor, mark_replicas

__all__ = [
    "REDUCIBLE_DTYPES",
    "ReduceState",
    "check_reducible",
    "ddp",
    "reduce_hook",
]

REDUCIBLE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "gloo": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "nccl": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "mpi": (torch.float32, torch.float64),
}
"""The floating dtypes each backend sums in an all-reduce (others are refused up front)."""


@dataclass
class ReduceState:
    """The state of :func:`reduce_hook`: the reduce dtype, the group and a byte counter.

    Attributes:
        dtype: the dtype buckets are all-reduced in.
        group: the process group (None: the world).
        bytes_reduced: bytes handed to the all-reduce so far (numel × element size per bucket).
    """

    dtype: torch.dtype
    group: Any = None
    bytes_reduced: int = 0


def reduce_hook(state: ReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of the bucket over the ranks, reduced in ``state.dtype``.

    Register with ``ddp_model.register_comm_hook(ReduceState(torch.bfloat16), reduce_hook)``.

    Args:
        state: the reduce dtype, the group and the byte counter.
        bucket: the gradient bucket DDP hands over.

    Returns:
        A future holding the averaged bucket in the bucket's own dtype.
    """
    group = state.group if state.group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    world = dist.get_world_size(group)
    wire = buffer.div(world).to(state.dtype) if buffer.dtype != state.dtype else buffer.div_(world)
    state.bytes_reduced += wire.numel() * wire.element_size()
    future = dist.all_reduce(wire, group=group, async_op=True).get_future()  # type: ignore[union-attr]

    def write_back(fut: torch.futures.Future[Any]) -> torch.Tensor:
        reduced = fut.value()[0]
        if reduced.data_ptr() != buffer.data_ptr():
            buffer.copy_(reduced)
        return buffer

    return future.then(write_back)


def check_reducible(fmt: Format, group: Any = None) -> torch.dtype:
    """The dtype to all-reduce ``fmt`` in over ``group``; refuse formats its backend cannot sum.

    Args:
        fmt: the policy's reduce format.
        group: the process group (None: the world).

    Returns:
        The torch dtype (tf32 is reduced as the float32 it is stored in).

    Raises:
        ValueError: the backend cannot all-reduce that format (fp8 on every backend).
    """
    backend = str(dist.get_backend(group)).lower()
    dtype = fmt.dtype
    # A group may hold one backend per device type: "cpu:gloo,cuda:nccl". All must sum it.
    names = [part.split(":")[-1] for part in backend.split(",")]
    tables = [REDUCIBLE_DTYPES.get(name, REDUCIBLE_DTYPES["gloo"]) for name in names]
    choices = tuple(d for d in tables[0] if all(d in table for table in tables))
    if dtype not in choices:
        summed = ", ".join(str(d).removeprefix("torch.") for d in choices)
        raise ValueError(
            f"reduce format {fmt.name!r} cannot be all-reduced by backend {backend!r}: it sums "
            f"{summed}. Set the policy's reduce to one of them, e.g. 'reduce=bf16' or "
            "'reduce=fp32'."
        )
    return dtype


def ddp(model: nn.Module, policy: Policy | str, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap ``model`` in DDP whose gradients are all-reduced in the policy's reduce format.

    Also registers the parameters as replicas over DDP's process group, so a scaler with
    ``process_group="auto"`` makes all ranks skip or step together. DDP reduces whole buckets,
    so the base policy's reduce format is used for all of them (per-module reduce formats
    apply under :func:`mixprec.distributed.fully_shard`).

    Args:
        model: the model, its parameters already in their training dtype.
        policy: the precision policy (its ``reduce`` format is used).
        ddp_kwargs: passed to ``DistributedDataParallel`` (``process_group``,
            ``device_ids``, ``bucket_cap_mb`` ...).

    Returns:
        The DDP model; its hook state is ``model.mixprec_reduce`` (a :class:`ReduceState`).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised, or ``model`` is already wrapped
            in DDP or sharded by FSDP2.
        ValueError: the backend cannot all-reduce the policy's reduce format.
    """
    if not _dist.initialized():
        raise RuntimeError(
            "ddp needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )
    if isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            "the model is already wrapped in DistributedDataParallel; pass the plain module "
            "(ddp_model.module) to ddp, which wraps it once with the reduce hook"
        )
    if any(is_dtensor(p) for p in model.parameters()):
        raise RuntimeError(
            "the model's parameters are DTensors (sharded with fully_shard); FSDP2 reduces "
            "gradients itself, so do not wrap it in DDP as well: use fully_shard alone"
        )
    policy = Policy.parse(policy)
    group = ddp_kwargs.get("process_group")
    dtype = check_reducible(policy.reduce, group)
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    state = ReduceState(dtype=dtype, group=group)
    wrapped.register_comm_hook(state, reduce_hook)  # type: ignore[arg-type]
    wrapped.mixprec_reduce = state  # type: ignore[assignment]
    mark_replicas(wrapped.parameters(), group)
    return wrapped
