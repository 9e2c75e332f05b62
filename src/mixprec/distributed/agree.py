"""Settings every rank must share, checked once when a model is wrapped for data parallelism."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from mixprec import _dist

__all__ = ["check_same_seed", "check_same_settings"]


def check_same_settings(
    policy: str, update: str, seed: int | None = None, group: Any = None
) -> None:
    """Refuse ranks with different precision policies, update modes or rounding seeds.

    One ``all_gather_object`` over ``group`` (a collective). Ranks with different policies
    (``bf16-mixed`` on one, ``fp16-mixed`` on another) average scaled with unscaled gradients,
    or gradients of different formats, and the replicas drift apart without any error; so do
    ranks with different update modes. Stochastic rounding draws its bits from the seed and each
    element's global position, so replicas stay identical and shards round as one process would
    only if every rank uses the same seed.

    Args:
        policy: the session's policy string (``str(policy)``).
        update: the session's update mode, ``"auto"`` resolved.
        seed: the stochastic-rounding seed, or None where nothing rounds stochastically.
        group: the process group (None: the world).

    Raises:
        ValueError: the ranks differ (every rank raises, naming each rank's value).
    """
    if not _dist.initialized():
        return
    settings: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(settings, (policy, update, seed), group=group)
    policies = [entry[0] for entry in settings]
    if len(set(policies)) > 1:
        raise ValueError(
            f"the ranks use different precision policies {policies!r} (in rank order); their "
            "gradients would be averaged across formats and loss scales and the replicas would "
            "drift apart. Pass the same policy to MixedPrecision on every rank"
        )
    updates = [entry[1] for entry in settings]
    if len(set(updates)) > 1:
        raise ValueError(
            f"the ranks use different update modes {updates!r} (in rank order); the replicas "
            "would drift apart. Pass the same update=... to MixedPrecision on every rank"
        )
    seeds = [entry[2] for entry in settings]
    if len(set(seeds)) > 1:
        raise ValueError(
            f"the ranks round stochastically with different seeds {seeds!r} (rank: seed, in rank "
            "order); replicas would drift apart and shards would not round as one process "
            "does. Pass the same seed=... to MixedPrecision on every rank (e.g. a constant, not "
            "one derived from the rank)"
        )


def check_same_seed(seed: int, group: Any = None) -> None:
    """Refuse ranks that round stochastically with different seeds (a collective over ``group``).

    Raises:
        ValueError: the seeds differ (every rank raises, naming each rank's seed).
    """
    check_same_settings("", "", seed, group)
