"""The same precision policy under torch.distributed: DDP, FSDP2, sharded checkpoints, a plan.

mixprec adds precision to torch.distributed and no communication layer of its own:

* :func:`ddp` wraps a model in ``DistributedDataParallel`` with a communication hook that
  all-reduces in the policy's ``reduce`` format (:func:`reduce_hook`);
* :func:`fully_shard` shards with FSDP2 under a ``MixedPrecisionPolicy`` derived per module from
  the policy (:func:`mixed_precision_policy`);
* :mod:`mixprec.distributed.checkpoint` saves and loads sharded, re-shardable checkpoints with
  ``torch.distributed.checkpoint``;
* :func:`memory_plan` gives bytes per parameter per rank, before renting the machines;
* :func:`check_replicas` tells whether the ranks' replicas of the weights are still identical
  (one all-gather of two hash numbers per parameter).

The session's ``MixedPrecision.ddp``, ``MixedPrecision.fully_shard`` and
``MixedPrecision.check_replicas`` call these.
"""

from __future__ import annotations

import importlib
from typing import Any

from mixprec.distributed._order import check_prepare_order, would_recast
from mixprec.distributed.ddp import REDUCIBLE_DTYPES, ReduceState, check_reducible, ddp, reduce_hook
from mixprec.distributed.replicas import ReplicaCheck, ReplicaDifference, check_replicas

# FSDP2, DTensor and torch.distributed.checkpoint take seconds to import: loaded on first use.
_LAZY = {
    "fully_shard": "mixprec.distributed.fsdp",
    "mixed_precision_policy": "mixprec.distributed.fsdp",
    "memory_plan": "mixprec.distributed.plan",
    "MemoryPlan": "mixprec.distributed.plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixprec.distributed' has no attribute {name!r}")


__all__ = [
    "REDUCIBLE_DTYPES",
    "MemoryPlan",
    "ReduceState",
    "ReplicaCheck",
    "ReplicaDifference",
    "check_prepare_order",
    "check_reducible",
    "check_replicas",
    "ddp",
    "fully_shard",
    "memory_plan",
    "mixed_precision_policy",
    "reduce_hook",
    "would_recast",
]
