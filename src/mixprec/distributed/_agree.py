"""Settings every rank must share, checked once when a model is wrapped for data parallelism."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["check_same_seed"]


def check_same_seed(seed: int, group: Any = None) -> None:
    """Refuse ranks that round stochastically with different seeds (a collective over ``group``).

    Stochastic rounding draws its bits from the seed and each element's global position, so
    replicas stay identical and shards round as one process would only if every rank uses the
    same seed; different ones make DDP replicas drift apart without any error.

    Raises:
        ValueError: the seeds differ (every rank raises, naming each rank's seed).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    seeds: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seeds, seed, group=group)
    if len(set(seeds)) > 1:
        raise ValueError(
            f"the ranks round stochastically with different seeds {seeds!r} (rank: seed, in rank "
            "order); replicas would drift apart and shards would not round as one process "
            "does. Pass the same seed=... to MixedPrecision on every rank (e.g. a constant, not "
            "one derived from the rank)"
        )
