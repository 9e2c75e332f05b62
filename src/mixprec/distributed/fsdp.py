"""FSDP2 ``fully_shard`` with a ``MixedPrecisionPolicy`` derived from the policy, per module.

Design note: FSDP2 keeps each parameter as a sharded DTensor in its storage dtype and all-gathers
it before a module's forward in ``param_dtype``; gradients are reduce-scattered in
``reduce_dtype`` and the module's outputs are cast to ``output_dtype``. A mixprec policy says the
same things, so the mapping is direct:

============================  ==================================================================
FSDP2                         mixprec policy of the module (``policy.for_module(name, module)``)
============================  ==================================================================
sharded storage dtype         ``params`` (fp32 for ``*-mixed``: the shards are the fp32 masters)
``param_dtype``               ``compute`` when it is 16-bit and differs from ``params``, else None
                              (and None for an ``Fp8Linear``: it casts to FP8 from the stored
                              format, as in one process)
``reduce_dtype``              ``reduce`` (always explicit: FSDP2 would otherwise reduce in
                              ``param_dtype``, less precision than ``*-mixed`` asks for)
``output_dtype``              ``output`` when it differs from the compute format, else None
============================  ==================================================================

Gathering in the compute format rounds each weight once, as autocast would, and halves the
all-gather. FSDP2 applies one ``MixedPrecisionPolicy`` per ``fully_shard`` call, so a module
whose rule gives it another mapping (an fp32 island such as a norm) is sharded on its own, before
its parents; modules listed in ``wrap`` (transformer blocks, for overlap) too. Parameters are cast
to their storage format *before* sharding, the one order that works: recasting a DTensor's
``.data`` afterwards leaves the optimizer and FSDP's buffers disagreeing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as _torch_fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from mixprec import _dist
from mixprec.distributed.ddp import check_reducible
from mixprec.optim import cast_module
from mixprec.policy import Policy

__all__ = ["fully_shard", "mixed_precision_policy", "reduce_bytes_per_step"]

# Sharded root module -> {reduce dtype: bytes each rank hands to the reduce-scatter per backward}.
_REDUCE_BYTES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mixed_precision_policy(
    policy: Policy | str, name: str = "", module: nn.Module | None = None
) -> MixedPrecisionPolicy:
    """FSDP2's ``MixedPrecisionPolicy`` for module ``name`` under ``policy`` (see the table).

    Args:
        policy: the precision policy, with its per-module rules.
        name: the module's dotted name in the model ("" for the root).
        module: the module (for ``class:`` rules).

    Returns:
        The ``MixedPrecisionPolicy`` for that module.

    Example:
        >>> mixed_precision_policy("bf16-mixed")
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, \
output_dtype=torch.float32, cast_forward_inputs=True)
    """
    from mixprec.compute.fp8_linear import Fp8Linear

    sub = Policy.parse(policy).for_module(name, module)
    compute = sub.compute.dtype
    low = sub.compute.bits <= 16 and compute != sub.param.dtype
    gathered = compute if low and not isinstance(module, Fp8Linear) else None
    in_forward = gathered if gathered is not None else sub.param.dtype
    output = sub.output.dtype if sub.output.dtype != in_forward else None
    return MixedPrecisionPolicy(
        param_dtype=gathered, reduce_dtype=sub.reduce.dtype, output_dtype=output
    )


def fully_shard(
    model: nn.Module,
    policy: Policy | str,
    *,
    mesh: Any = None,
    wrap: Iterable[type[nn.Module]] = (),
    **kwargs: Any,
) -> nn.Module:
    """Cast ``model`` to the policy's storage formats, then shard it with FSDP2, per module.

    Args:
        model: the plain model (not wrapped in DDP, not sharded yet).
        policy: the precision policy.
        mesh: the ``DeviceMesh`` to shard over (None: FSDP2's default, the world).
        wrap: module classes to shard on their own as well (e.g. the transformer block), so
            their all-gathers overlap with compute.
        kwargs: passed to ``torch.distributed.fsdp.fully_shard`` (``reshard_after_forward``...).

    Returns:
        ``model``, now an ``FSDPModule`` with DTensor parameters. Build the optimizer on its
        parameters after this call.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised, or ``model`` is wrapped in DDP
            or already sharded.
        ValueError: the backend cannot reduce a reduce format of the policy, or ``mp_policy`` was
            passed (it is derived from ``policy``).
    """
    if not _dist.initialized():
        raise RuntimeError(
            "fully_shard needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )
    if isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            "fully_shard was given a DistributedDataParallel model; FSDP2 shards and reduces "
            "gradients itself and does not stack on DDP. Pass the plain module instead: "
            "model = mp.fully_shard(ddp_model.module) (and drop the DDP wrapper)"
        )
    if isinstance(model, FSDPModule):
        raise RuntimeError(
            "the model is already sharded by fully_shard; shard a plain model once, with "
            "mixprec's fully_shard, so the mixed precision policy of each module is derived"
        )
    if "mp_policy" in kwargs:
        raise ValueError(
            f"mp_policy={kwargs['mp_policy']!r} was passed, but it is derived from the "
            "precision policy; set params/compute/output/reduce in the policy instead"
        )
    policy = Policy.parse(policy)
    wrap_classes = tuple(wrap)
    plans = [
        (name, sub, mixed_precision_policy(policy, name, sub))
        for name, sub in model.named_modules()
    ]
    group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
    for _, _, mp_policy in plans:
        if mp_policy.reduce_dtype is not None:
            check_reducible(_format_of(mp_policy.reduce_dtype, policy), group)
    cast_module(model, policy, buffers=False)  # buffers keep their dtype, as in prepare
    root = plans[0][2]
    claimed: dict[int, tuple[int, torch.dtype]] = {}  # param -> (trainable numel, reduce dtype)

    def claim(sub: nn.Module, mp_policy: MixedPrecisionPolicy) -> None:
        for param in sub.parameters():
            dtype = mp_policy.reduce_dtype or mp_policy.param_dtype or param.dtype
            claimed.setdefault(id(param), (param.numel() if param.requires_grad else 0, dtype))

    for _, sub, mp_policy in reversed(plans[1:]):  # children before their parents
        if not any(True for _ in sub.parameters()):
            continue
        if mp_policy != root or isinstance(sub, wrap_classes):
            claim(sub, mp_policy)
            _torch_fully_shard(sub, mesh=mesh, mp_policy=mp_policy, **kwargs)
    claim(model, root)
    _torch_fully_shard(model, mesh=mesh, mp_policy=root, **kwargs)
    traffic: dict[torch.dtype, int] = {}
    for numel, dtype in claimed.values():
        traffic[dtype] = traffic.get(dtype, 0) + numel * dtype.itemsize
    _REDUCE_BYTES[model] = traffic
    return model


def reduce_bytes_per_step(model: nn.Module) -> dict[torch.dtype, int]:
    """Bytes each rank hands to FSDP2's gradient reduce-scatter per backward, by reduce dtype.

    Every trainable parameter's whole (unsharded) gradient goes into the reduce-scatter in the
    ``reduce_dtype`` of the ``fully_shard`` call that holds it, so the figure is its global
    element count times that dtype's size, summed per dtype — the counterpart of what DDP's
    reduce hook counts (``ReduceState.bytes_reduced``). The all-gathers of the parameters are
    not included.

    Args:
        model: a model sharded by :func:`fully_shard` (mixprec's, which records the mapping).

    Returns:
        ``{dtype: bytes}``.

    Raises:
        ValueError: ``model`` was not sharded by :func:`fully_shard`.
    """
    if model not in _REDUCE_BYTES:
        raise ValueError(
            f"{type(model).__name__} was not sharded by mixprec.distributed.fully_shard (or "
            "mp.fully_shard), which records each parameter's reduce format; shard it with that"
        )
    return dict(_REDUCE_BYTES[model])


def _format_of(dtype: torch.dtype, policy: Policy) -> Any:
    """The policy's reduce format that has ``dtype`` (for the error message's name)."""
    for fmt in (policy.reduce, *(rule.policy.reduce for rule in policy.rules)):
        if fmt.dtype == dtype:
            return fmt
    return policy.reduce
