"""The one order that works: cast the parameters, then wrap (DDP) or shard (FSDP2)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec.policy import Policy
from mixprec.scaling.agreement import is_dtensor

__all__ = ["check_prepare_order", "would_recast"]


def would_recast(model: nn.Module, policy: Policy | str) -> list[str]:
    """The floating parameters whose dtype casting ``model`` to ``policy`` would change.

    Example:
        >>> would_recast(nn.Linear(2, 2), "bf16-pure")
        ['weight', 'bias']
    """
    policy = Policy.parse(policy)
    names: list[str] = []
    for prefix, sub in model.named_modules():
        dtype = policy.for_module(prefix, sub).param.dtype
        for local, param in sub._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                names.append(f"{prefix}.{local}" if prefix else local)
    return names


def check_prepare_order(model: nn.Module, policy: Policy | str) -> None:
    """Refuse to prepare a DDP or FSDP2 model whose parameters the policy would recast.

    Recasting ``param.data`` of a DDP model detaches DDP's gradient hooks (the ranks stop
    all-reducing); recasting FSDP2's DTensor parameters leaves its buffers and the optimizer
    disagreeing. Both work in the other order, which the message spells out.

    Raises:
        RuntimeError: ``model`` is wrapped in DDP or holds DTensor parameters, and the policy
            changes the dtype of some of them.
    """
    recast = would_recast(model, policy)
    if not recast:
        return
    shown = ", ".join(map(repr, recast[:3])) + (" ..." if len(recast) > 3 else "")
    if isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            f"prepare was given a DistributedDataParallel model whose parameters the policy "
            f"recasts ({shown}); recasting param.data detaches DDP's gradient hooks and the "
            "ranks would stop all-reducing. Prepare the plain model first, then wrap it: "
            "model, opt = mp.prepare(model, opt); model = mp.ddp(model)"
        )
    if any(is_dtensor(p) for p in model.parameters()):
        raise RuntimeError(
            f"prepare was given a model sharded by fully_shard whose parameters the policy "
            f"recasts ({shown}); DTensor parameters cannot be recast after sharding. Shard "
            "with mp.fully_shard(model), which casts before sharding, then build the "
            "optimizer on model.parameters() and call mp.prepare(model, opt)"
        )
